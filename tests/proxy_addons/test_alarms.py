"""Alarms for the management room: raised when a condition of the Grafana alerts first
holds over a window, cleared when it no longer does."""

import pytest
from prometheus_client import CollectorRegistry

from proxy_addons.alarms import Alarm, Counters, evaluate, read_counters
from proxy_addons.metrics import Metrics


@pytest.mark.parametrize(
    ("after", "holding"),
    [
        (Counters(state_ok=10, state_errors=2), set()),  # 2 errors: too few to say
        (Counters(state_ok=10, state_errors=3), {Alarm.STATE_SOURCE}),  # 3 of 13: 23%
        (Counters(state_ok=100, state_errors=10), set()),  # 10 of 110: 9%
        (Counters(fail_open=1), {Alarm.FAIL_OPEN}),
        (Counters(key_errors=4), {Alarm.SIGNATURE_KEYS}),
        (Counters(dropped=7), {Alarm.WRITER_DROPPING}),
        (Counters(state_ok=500), set()),
    ],
)
def test_conditions(after, holding):
    changes, active = evaluate(Counters(), after, set())
    assert active == holding
    assert {c.alarm for c in changes if c.raised} == holding


def test_an_alarm_is_raised_once_and_cleared_once():
    """Fail-open passes in two windows in a row: one raise; a quiet window: one clear."""
    first = Counters(fail_open=2)
    changes, active = evaluate(Counters(), first, set())
    assert [(c.alarm, c.raised, c.detail) for c in changes] == [
        (Alarm.FAIL_OPEN, True, "2 item(s) let through unchecked")
    ]
    second = Counters(fail_open=5)
    changes, active = evaluate(first, second, active)
    assert changes == [] and active == {Alarm.FAIL_OPEN}
    changes, active = evaluate(second, second, active)
    assert [(c.alarm, c.raised) for c in changes] == [(Alarm.FAIL_OPEN, False)]
    assert active == set()


def test_read_counters_sums_modguds_own_metrics():
    """From a real Metrics registry: the counters the alarms read, over their labels."""
    registry = CollectorRegistry()
    metrics = Metrics(registry)
    metrics.observe_state_fetch("ok", 0.01)
    metrics.observe_state_fetch("error", 0.01)
    metrics.observe_state_fetch("error", 0.01)
    metrics.fail_open.labels("state").inc(3)
    metrics.fail_open.labels("hook").inc()
    metrics.observe_key_fetch("error", 0.1)
    assert read_counters(registry) == Counters(
        state_ok=1, state_errors=2, fail_open=4, key_errors=1, dropped=0
    )
