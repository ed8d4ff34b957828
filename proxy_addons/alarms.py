"""Operational alarms for the management room: the conditions of the Grafana alert rules
(grafana/alerts/modgud.rules.yaml) that a moderator can act on, read from this process's
own counters.

Every `management.alarm_window_seconds` (a minute) the management room takes a snapshot of the counters
(`read_counters`) and compares it with the last one (`evaluate`): an alarm is raised in the
window its condition first holds and cleared in the first window it no longer does, so the
room gets one message when trouble starts and one when it ends, not one per minute. Each
replica watches its own counters (they are per process, as Prometheus sees them).
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from prometheus_client import CollectorRegistry

__all__ = ["Alarm", "AlarmState", "Counters", "evaluate", "read_counters"]

# As ModgudStateSourceFailing: more than 20% of the window's fetches failed, and enough of
# them that one timeout among two fetches is not an alarm.
STATE_ERROR_SHARE = 0.2
STATE_ERRORS_AT_LEAST = 3


class Alarm(enum.StrEnum):
    STATE_SOURCE = "state_source"
    FAIL_OPEN = "fail_open"
    SIGNATURE_KEYS = "signature_keys"
    WRITER_DROPPING = "writer_dropping"


TITLES = {
    Alarm.STATE_SOURCE: "room-state source failing",
    Alarm.FAIL_OPEN: "events let through unchecked (on_error: open)",
    Alarm.SIGNATURE_KEYS: "signature keys unavailable",
    Alarm.WRITER_DROPPING: "findings database writer dropping records",
}
WHAT_TO_DO = {
    Alarm.STATE_SOURCE: "check the homeserver and homeserver.access_token_file; rooms with "
    "unknown state are let through (on_error: open) or answered 503 (closed)",
    Alarm.FAIL_OPEN: "a check could not be made and on_error: open let the items through; "
    "modgud's log names each one",
    Alarm.SIGNATURE_KEYS: "origin servers' keys could not be fetched: requests are checked "
    "but blame no one; check the homeserver's key API and trusted_key_servers",
    Alarm.WRITER_DROPPING: "the database cannot keep up or is unwritable: findings are being "
    "lost; check the disk and the database",
}


@dataclass(frozen=True, slots=True)
class Counters:
    state_ok: float = 0.0
    state_errors: float = 0.0
    fail_open: float = 0.0
    key_errors: float = 0.0
    dropped: float = 0.0


def read_counters(registry: CollectorRegistry) -> Counters:
    """The counters the alarms read, summed over their labels."""
    sums: dict[str, float] = {}
    for family in registry.collect():
        for sample in family.samples:
            if not sample.name.endswith("_total"):
                continue
            key = sample.name
            if sample.name in ("modgud_state_fetches_total", "modgud_key_fetches_total"):
                key = f"{sample.name}:{sample.labels.get('outcome')}"
            sums[key] = sums.get(key, 0.0) + sample.value
    return Counters(
        state_ok=sums.get("modgud_state_fetches_total:ok", 0.0),
        state_errors=sums.get("modgud_state_fetches_total:error", 0.0),
        fail_open=sums.get("modgud_fail_open_total", 0.0),
        key_errors=sums.get("modgud_key_fetches_total:error", 0.0),
        dropped=sums.get("modgud_store_dropped_total", 0.0),
    )


@dataclass(frozen=True, slots=True)
class AlarmState:
    """A change of an alarm: raised (with what was seen in the window) or cleared."""

    alarm: Alarm
    raised: bool
    detail: str


def _holding(before: Counters, after: Counters) -> dict[Alarm, str]:
    """The alarms whose condition holds over the window, with what was seen."""
    out: dict[Alarm, str] = {}
    errors = after.state_errors - before.state_errors
    fetches = errors + after.state_ok - before.state_ok
    if errors >= STATE_ERRORS_AT_LEAST and errors > STATE_ERROR_SHARE * fetches:
        out[Alarm.STATE_SOURCE] = f"{errors:g} of {fetches:g} room-state fetches failed"
    passed = after.fail_open - before.fail_open
    if passed > 0:
        out[Alarm.FAIL_OPEN] = f"{passed:g} item(s) let through unchecked"
    keys = after.key_errors - before.key_errors
    if keys > 0:
        out[Alarm.SIGNATURE_KEYS] = f"{keys:g} server-key fetch(es) failed"
    dropped = after.dropped - before.dropped
    if dropped > 0:
        out[Alarm.WRITER_DROPPING] = f"{dropped:g} record(s) dropped"
    return out


def evaluate(
    before: Counters, after: Counters, active: Iterable[Alarm]
) -> tuple[list[AlarmState], set[Alarm]]:
    """What changed over one window, given the alarms active before it; and the alarms
    active after it."""
    holding: Mapping[Alarm, str] = _holding(before, after)
    was = set(active)
    changes = [AlarmState(a, True, holding[a]) for a in Alarm if a in holding and a not in was]
    changes += [AlarmState(a, False, "") for a in Alarm if a in was and a not in holding]
    return changes, set(holding)
