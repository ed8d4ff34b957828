"""The metric catalogue: what a scrape shows after real addon traffic, the leak and
per-server counters, what is read from SQLite at scrape time, and that README's catalogue
names exactly what modgud exports. Room state from a static table (a test double);
tests/e2e/test_prometheus.py has a real Prometheus scrape a live modgud."""

from __future__ import annotations

import re
import time
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from proxy_addons.metrics import DatabaseCollector, ModuleMetrics
from proxy_addons.store import KnockRecord
from tests.proxy_addons.conftest import (
    ROOM,
    StaticStateSource,
    pdu,
    policy,
    run_edge,
    send_flow,
)

README = Path(__file__).resolve().parents[2] / "README.md"


def scrape(holder) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = generate_latest(holder.runtime.metrics.registry).decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def value(samples, name, **labels):
    return samples.get((name, tuple(sorted(labels.items()))))


def exported_names(holder) -> set[str]:
    text = generate_latest(holder.runtime.metrics.registry).decode()
    return {f.name for f in text_string_to_metric_families(text)}


async def test_traffic_shows_in_requests_pdus_findings_leaks_and_timings(make_runtime):
    holder = make_runtime(mode="enforce")
    await run_edge(
        holder, send_flow("good.test", [pdu("@a:good.test"), pdu("@b:good.test", body="x")])
    )
    await run_edge(holder, send_flow("relay.test", [pdu("@evil:denied.test")], txn_id="t2"))
    samples = scrape(holder)
    assert (
        value(
            samples,
            "modgud_requests_total",
            direction="inbound",
            endpoint="send",
            outcome="forwarded",
        )
        == 1
    )
    assert (
        value(
            samples,
            "modgud_requests_total",
            direction="inbound",
            endpoint="send",
            outcome="refused",
        )
        == 1
    )
    assert (
        value(samples, "modgud_pdus_total", direction="inbound", action="allowed", rule="none") == 2
    )
    assert (
        value(
            samples, "modgud_pdus_total", direction="inbound", action="rejected", rule="acl.sender"
        )
        == 1
    )
    leaks = {
        dict(k[1])["confidence"]: v for k, v in samples.items() if k[0] == "modgud_leaks_total"
    }
    assert sum(leaks.values()) == 1 and set(leaks) <= {"low", "medium", "high"}
    assert value(samples, "modgud_transaction_seconds_count", direction="inbound") == 2
    assert value(samples, "modgud_pdu_seconds_count", direction="inbound") == 2
    assert value(samples, "modgud_state_fetches_total", outcome="ok") == 1
    assert value(samples, "modgud_cache_entries", cache="rooms") == 1
    assert (
        value(
            samples,
            "modgud_build_info",
            version=_version(samples),
            mitmproxy=_label(samples, "mitmproxy"),
            python=_label(samples, "python"),
            mode="enforce",
        )
        == 1
    )
    assert value(samples, "process_resident_memory_bytes") > 0
    # No server name appears as a label unless the operator listed it.
    assert not [k for k in samples if k[0].startswith("modgud_server_")]


def _label(samples, name):
    (info,) = [dict(k[1]) for k in samples if k[0] == "modgud_build_info"]
    return info[name]


def _version(samples):
    return _label(samples, "version")


async def test_listed_servers_get_their_own_labels_and_no_other(make_runtime):
    holder = make_runtime(extra="metrics: {servers: [relay.test]}\n")
    await run_edge(holder, send_flow("relay.test", [pdu("@evil:denied.test")]))
    await run_edge(holder, send_flow("good.test", [pdu("@a:good.test")], txn_id="t2"))
    samples = scrape(holder)
    assert (
        value(samples, "modgud_server_findings_total", server="relay.test", rule="acl.sender") == 1
    )
    assert (
        value(samples, "modgud_server_requests_total", server="relay.test", outcome="refused") == 1
    )
    servers = {dict(k[1]).get("server") for k in samples if k[0].startswith("modgud_server_")}
    assert servers == {"relay.test"}


async def test_acl_size_and_rooms_that_allow_nobody(make_runtime):
    big = policy(deny=tuple(f"bad{i}.example.org" for i in range(2000)))
    source = StaticStateSource({ROOM: big, "!nobody:hs.test": policy("!nobody:hs.test", allow=())})
    holder = make_runtime(source=source)
    await holder.runtime.state.get_many({ROOM, "!nobody:hs.test"}, 1)
    samples = scrape(holder)
    assert value(samples, "modgud_rooms_acl_allow_empty") == 1
    # policy() builds the ACL from content, not from state: the size comes from state.
    from rules.roomstate import room_policy_from_state

    content = {"allow": ["*"], "deny": [f"bad{i}.example.org" for i in range(3000)]}
    state = [
        {"type": "m.room.create", "state_key": "", "content": {"room_version": "10"}},
        {"type": "m.room.server_acl", "state_key": "", "content": content},
    ]
    source.rooms["!big:hs.test"] = room_policy_from_state("!big:hs.test", state)
    await holder.runtime.state.get("!big:hs.test", 1)
    size = value(scrape(holder), "modgud_acl_largest_bytes")
    assert 60_000 < size < 65_536, size


def test_knocks_pending_and_the_oldest_wait_are_read_from_sqlite(make_runtime):
    holder = make_runtime()
    runtime = holder.runtime
    now = time.time()
    runtime.store.record(
        [
            KnockRecord(now - 7200, ROOM, "a.test"),
            KnockRecord(now - 60, ROOM, "b.test"),
        ]
    )
    assert runtime.store.flush(5)
    samples = scrape(holder)
    assert value(samples, "modgud_knocks_pending") == 2
    assert 7100 < value(samples, "modgud_knock_oldest_pending_seconds") < 7400
    assert value(samples, "modgud_database_bytes") > 0
    # A database that cannot be read gives the size only, never a failed scrape.
    broken = list(DatabaseCollector("/nonexistent/modgud.db").collect())
    assert [f.name for f in broken] == ["modgud_database_bytes"]


def test_readme_catalogue_names_exactly_what_modgud_exports(make_runtime):
    """Every modgud_ metric in README's catalogue is exported by modgud or its Synapse
    module, and every exported one is in the catalogue (so the dashboards' reference list
    stays true)."""
    holder = make_runtime(extra="metrics: {servers: [relay.test]}\n")
    module = generate_latest(ModuleMetrics(CollectorRegistry()).registry).decode()
    exported = {n for n in exported_names(holder) if n.startswith("modgud_")} | {
        f.name for f in text_string_to_metric_families(module)
    }
    text = README.read_text()
    section = text[text.index("## Metrics") :]
    section = section[: section.index("\n## ", 4)]
    documented = {
        re.sub(r"_(total|bucket|sum|count|info)$", "", m)
        for m in re.findall(r"`(modgud_[a-z_]*[a-z])`", section)
    }
    exported = {re.sub(r"_info$", "", n) for n in exported}
    assert documented == exported, (documented - exported, exported - documented)


def test_the_modules_calls_are_counted_and_timed_by_their_labels():
    """The module's calls by callback, answer and decider, and its time by callback and
    where the room's state came from (a value on a bucket's bound counts in it)."""
    registry = CollectorRegistry()
    metrics = ModuleMetrics(registry)
    for seconds in (0.00004, 0.0001, 0.3):
        metrics.count_call("check_event_for_spam", "allow", "module", "cached", seconds)
    metrics.count_call("check_event_for_spam", "refuse", "module", "read", 0.002)
    metrics.count_call("user_may_invite", "allow", "local", "none", 0.00001)

    def calls(*labels: str) -> float | None:
        keys = dict(zip(("callback", "answer", "decided_by"), labels, strict=True))
        return registry.get_sample_value("modgud_module_calls_total", keys)

    assert calls("check_event_for_spam", "allow", "module") == 3
    assert calls("check_event_for_spam", "refuse", "module") == 1
    assert calls("user_may_invite", "allow", "local") == 1
    cached = {"callback": "check_event_for_spam", "room": "cached"}
    sample = registry.get_sample_value
    assert sample("modgud_module_seconds_count", cached) == 3
    assert sample("modgud_module_seconds_bucket", {**cached, "le": "0.0001"}) == 2
    assert sample("modgud_module_seconds_bucket", {**cached, "le": "0.25"}) == 2
    assert sample("modgud_module_seconds_bucket", {**cached, "le": "+Inf"}) == 3
    assert sample("modgud_module_seconds_sum", cached) == pytest.approx(0.30014)
    read = {"callback": "check_event_for_spam", "room": "read"}
    assert sample("modgud_module_seconds_bucket", {**read, "le": "0.001"}) == 0
    assert sample("modgud_module_seconds_bucket", {**read, "le": "0.0025"}) == 1


def test_the_modules_tally_exports_what_prometheus_clients_metrics_would():
    """The module counts into plain integers (cheap inside Synapse); what a scrape reads
    is the series a Counter and a Histogram with the same labels export."""
    observed = [
        ("check_event_for_spam", "allow", "module", "cached", 0.000031),
        ("check_event_for_spam", "allow", "module", "cached", 0.00005),
        ("check_event_for_spam", "refuse", "module", "read", 0.0042),
        ("federated_user_may_invite", "allow", "malformed", "none", 2.0),
    ]
    tallied = CollectorRegistry()
    metrics = ModuleMetrics(tallied)
    reference = CollectorRegistry()
    calls = Counter(
        "modgud_module_calls", "", ["callback", "answer", "decided_by"], registry=reference
    )
    seconds = Histogram(
        "modgud_module_seconds",
        "",
        ["callback", "room"],
        buckets=metrics.calls.bounds,
        registry=reference,
    )
    for callback, answer, decided_by, room, took in observed:
        metrics.count_call(callback, answer, decided_by, room, took)
        calls.labels(callback, answer, decided_by).inc()
        seconds.labels(callback, room).observe(took)

    def samples(registry, prefix):
        return sorted(
            (s.name, tuple(sorted(s.labels.items())), s.value)
            for family in registry.collect()
            for s in family.samples
            if s.name.startswith(prefix) and not s.name.endswith("_created")
        )

    for prefix in ("modgud_module_calls", "modgud_module_seconds"):
        assert samples(tallied, prefix) == samples(reference, prefix)
