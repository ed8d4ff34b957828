"""Prometheus metrics: the catalogue (README "Metrics" lists each with its meaning).

Prefix modgud_, counters end in _total (prometheus_client adds it), label sets bounded:
rule, action, direction, endpoint class, outcome, cache — never room IDs, and server
names only for the servers the operator lists in `metrics.servers` (like Synapse's
federation_metrics_domains). Counts that live in SQLite (knocks waiting, the database's
size) are read when Prometheus scrapes, by DatabaseCollector.
"""

from __future__ import annotations

import logging
import platform
import time
from bisect import bisect_left
from collections.abc import Callable, Iterator, Mapping
from typing import Protocol

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    Info,
    PlatformCollector,
    ProcessCollector,
    disable_created_metrics,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from proxy_addons.database import DatabaseError, open_db, reading

__all__ = [
    "CallTally",
    "DatabaseCollector",
    "FindingMetrics",
    "LEAK_KINDS",
    "Metrics",
    "ModuleMetrics",
    "StoreCollector",
]

logger = logging.getLogger(__name__)

# No `_created` series beside every counter and histogram: nobody graphs them.
disable_created_metrics()

# Latency buckets from 0.25 ms (a decided transaction) to 5 s (a state fetch timing out).
_FAST = (0.00025, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
_PER_PDU = (0.000005, 0.00001, 0.000025, 0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.005, 0.05)

# The findings that count as leaks (modgud_leaks_total{kind}): the rule names.
LEAK_KINDS = frozenset(
    {
        "acl.sender",
        "policy.sender",
        "participation.sender",
        "policy.user",
        "leak.relayed",
        "leak.reference",
        "leak.outbound",
        "leak.pulled",
        "edu.impersonation",
    }
)


# The time of one module callback, from a few microseconds (a cached room) up.
_MODULE = (
    0.000005,
    0.00001,
    0.000025,
    0.00005,
    0.000075,
    0.0001,
    0.00015,
    0.0002,
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.01,
    0.05,
    0.25,
    1.0,
)


class FindingMetrics:
    """What recording a finding counts, and what every part of modgud that judges
    exports the same way — the edge and the event hook in modgud's process, the Synapse
    module in Synapse's (on Synapse's registry): the same names and label sets, so the
    dashboards and alerts read both."""

    def __init__(self, registry: CollectorRegistry, servers: tuple[str, ...] = ()) -> None:
        self.registry = registry
        self.servers = frozenset(s.lower() for s in servers)  # may appear as a label
        c = self._counter
        self.findings = c(
            "modgud_findings",
            "Findings recorded, by rule, action and severity",
            ["rule", "action", "severity"],
        )
        self.leaks = c(
            "modgud_leaks",
            "Leak findings, by kind (the rule) and confidence",
            ["kind", "confidence"],
        )
        self.server_findings = c(
            "modgud_server_findings",
            "Findings blamed on a server the operator listed in metrics.servers, by rule",
            ["server", "rule"],
        )
        self.fail_open = c(
            "modgud_fail_open",
            "Items let through because a check could not be made (on_error: open), by place",
            ["where"],
        )
        self.internal_errors = c(
            "modgud_internal_errors", "Internal errors caught by modgud, by place", ["where"]
        )
        self.state_fetches = c(
            "modgud_state_fetches",
            "Room-state fetches from the homeserver, by outcome",
            ["outcome"],
        )
        self.state_fetch_seconds = Histogram(
            "modgud_state_fetch_seconds",
            "Room-state fetch latency",
            buckets=_FAST,
            registry=registry,
        )
        self.cache_entries = Gauge(
            "modgud_cache_entries",
            "Entries in modgud's bounded caches, by cache",
            ["cache"],
            registry=registry,
        )
        self.policy_rules = Gauge(
            "modgud_policy_list_rules",
            "Ban rules (servers and users) from the subscribed policy lists",
            registry=registry,
        )
        self.store_queue = Gauge(
            "modgud_store_queue",
            "Records waiting for the SQLite writer",
            registry=registry,
        )
        self.build = Info("modgud_build", "modgud build information", registry=registry)

    def _counter(self, name: str, documentation: str, labels: list[str]) -> Counter:
        return Counter(name, documentation, labels, registry=self.registry)

    def server_label(self, server: str | None) -> str | None:
        """The server as a label value when the operator listed it, else None."""
        if not server or not self.servers:
            return None
        name = server.lower()
        if name in self.servers:
            return name
        host = name.rsplit(":", 1)[0] if not name.endswith("]") else name
        return host if host in self.servers else None

    def observe_state_fetch(self, outcome: str, seconds: float) -> None:
        self.state_fetches.labels(outcome).inc()
        self.state_fetch_seconds.observe(seconds)

    def set_build(self, mode: str, *, distribution: str = "modgud") -> None:
        """modgud_build_info. `distribution`: modgud-synapse for the Synapse module, whose
        `mitmproxy` label says `none` (it runs in Synapse, without mitmproxy)."""
        from importlib.metadata import PackageNotFoundError, version

        def of(package: str) -> str:
            try:
                return version(package)
            except PackageNotFoundError:
                return "unknown"

        self.build.info(
            {
                "version": of(distribution),
                "mitmproxy": of("mitmproxy") if distribution == "modgud" else "none",
                "python": platform.python_version(),
                "mode": mode,
            }
        )

    def watch_caches(self, sizes: Mapping[str, Callable[[], float]]) -> None:
        for cache, size in sizes.items():
            self.cache_entries.labels(cache).set_function(size)


class Metrics(FindingMetrics):
    """All of modgud's metrics on one registry (injectable, so tests read samples)."""

    def __init__(self, registry: CollectorRegistry, servers: tuple[str, ...] = ()) -> None:
        super().__init__(registry, servers)
        c = self._counter
        self.requests = c(
            "modgud_requests",
            "Federation requests, by direction, endpoint class and outcome",
            ["direction", "endpoint", "outcome"],
        )
        self.pdus = c(
            "modgud_pdus",
            "PDUs checked, by direction, action and deciding rule (none: nothing found)",
            ["direction", "action", "rule"],
        )
        self.edus = c(
            "modgud_edus",
            "EDUs checked, by direction, action and deciding rule (none: nothing found)",
            ["direction", "action", "rule"],
        )
        self.server_requests = c(
            "modgud_server_requests",
            "Inbound requests from a server listed in metrics.servers, by outcome",
            ["server", "outcome"],
        )
        self.hook_calls = c(
            "modgud_hook_calls",
            "Event hook (synapse-http-antispam) calls, by callback, answer and decider",
            ["callback", "answer", "decided_by"],
        )
        self.key_fetches = c(
            "modgud_key_fetches",
            "Server-key fetches (homeserver notary, then trusted key servers), by outcome",
            ["outcome"],
        )
        self.knocks = c(
            "modgud_knocks",
            "Knocks (m.server.knock) from servers not yet permitted, queued for approval",
            [],
        )
        self.hook_seconds = Histogram(
            "modgud_hook_seconds",
            "Event hook answer time, by callback",
            ["callback"],
            buckets=_FAST,
            registry=registry,
        )
        self.transaction_seconds = Histogram(
            "modgud_transaction_seconds",
            "Time modgud spends deciding one request (not counting the homeserver), by direction",
            ["direction"],
            buckets=_FAST,
            registry=registry,
        )
        self.pdu_seconds = Histogram(
            "modgud_pdu_seconds",
            "Decision time per PDU: one observation per /send, its time over its PDUs",
            ["direction"],
            buckets=_PER_PDU,
            registry=registry,
        )
        self.key_fetch_seconds = Histogram(
            "modgud_key_fetch_seconds", "Server-key fetch latency", buckets=_FAST, registry=registry
        )
        self.acl_largest_bytes = Gauge(
            "modgud_acl_largest_bytes",
            "The largest m.room.server_acl content among cached rooms, in canonical JSON bytes "
            "(events are capped at 65536)",
            registry=registry,
        )
        self.rooms_acl_allow_empty = Gauge(
            "modgud_rooms_acl_allow_empty",
            "Cached rooms whose server ACL allows no server at all (redacted, or emptied)",
            registry=registry,
        )
        self.start_time = Gauge(
            "modgud_start_time_seconds", "When modgud started (Unix time)", registry=registry
        )
        self.start_time.set(time.time())
        # process_* (memory, CPU, open files) and python_info, on modgud's own registry
        ProcessCollector(registry=registry)
        PlatformCollector(registry=registry)

    def observe_key_fetch(self, outcome: str, seconds: float) -> None:
        self.key_fetches.labels(outcome).inc()
        self.key_fetch_seconds.observe(seconds)


class ModuleMetrics(FindingMetrics):
    """The Synapse module's metrics, on Synapse's own registry (served by Synapse's metrics
    listener): the shared ones, and its callbacks with the hook's label sets."""

    def __init__(self, registry: CollectorRegistry, servers: tuple[str, ...] = ()) -> None:
        super().__init__(registry, servers)
        self.calls = CallTally(
            "modgud_module",
            "Synapse module callbacks, by callback, answer and decider",
            "Synapse module callback time, by callback and where the room's state came from "
            "(cached; read from Synapse, the read included; none needed)",
            _MODULE,
        )
        registry.register(self.calls)

    def count_call(
        self, callback: str, answer: str, decided_by: str, room: str, seconds: float
    ) -> None:
        """One callback answered: counted by answer and decider, its time observed by
        where the room's state came from (`cached`, `read`, `none`)."""
        self.calls.count(callback, answer, decided_by, room, seconds)


class CallTally(Collector):
    """A callback counter and time histogram for a hot path inside someone else's process
    (the Synapse module's callbacks): `NAME_calls_total{callback,answer,decided_by}` and
    `NAME_seconds{callback,room}`, the series a Counter and a Histogram with those labels
    would export, counted into plain integers and read at scrape.

    Inside Synapse, caches are cold between two events and prometheus_client's
    Counter.inc and Histogram.observe (a lock and a bucket walk each) cost tens of
    microseconds; a count here is one dict lookup and one bisect. Counted from one
    thread (Synapse's reactor); a scrape from another reads what is there. One cell per
    label combination; a scrape adds the cells up into the two metrics' series."""

    def __init__(self, name: str, calls_doc: str, seconds_doc: str, bounds: tuple[float, ...]):
        self.name = name
        self.calls_doc = calls_doc
        self.seconds_doc = seconds_doc
        self.bounds = bounds
        # (callback, answer, decided_by, room) -> the count in each bucket (not cumulative;
        # the last but one: +Inf), then the sum of the seconds
        self._cells: dict[tuple[str, str, str, str], list[float]] = {}

    def count(self, callback: str, answer: str, decided_by: str, room: str, seconds: float) -> None:
        key = (callback, answer, decided_by, room)
        cell = self._cells.get(key)
        if cell is None:
            cell = self._cells[key] = [0] * (len(self.bounds) + 2)
        cell[bisect_left(self.bounds, seconds)] += 1  # le: the first bound >= seconds
        cell[-1] += seconds

    def describe(self) -> Iterator[CounterMetricFamily | HistogramMetricFamily]:
        yield from self._families()

    def collect(self) -> Iterator[CounterMetricFamily | HistogramMetricFamily]:
        calls, seconds = self._families()
        counted: dict[tuple[str, str, str], float] = {}
        timed: dict[tuple[str, str], list[float]] = {}
        for (callback, answer, decided_by, room), cell in list(self._cells.items()):
            cell = list(cell)
            key = (callback, answer, decided_by)
            counted[key] = counted.get(key, 0) + sum(cell[:-1])
            into = timed.setdefault((callback, room), [0] * len(cell))
            for i, value in enumerate(cell):
                into[i] += value
        for key, count in counted.items():
            calls.add_metric(list(key), count)
        for labels, cell in timed.items():
            cumulative, total = [], 0.0
            for bound, count in zip((*self.bounds, float("inf")), cell[:-1], strict=True):
                total += count
                cumulative.append((floatToGoString(bound), total))
            seconds.add_metric(list(labels), cumulative, sum_value=cell[-1])
        yield calls
        yield seconds

    def _families(self) -> tuple[CounterMetricFamily, HistogramMetricFamily]:
        return (
            CounterMetricFamily(
                f"{self.name}_calls", self.calls_doc, labels=["callback", "answer", "decided_by"]
            ),
            HistogramMetricFamily(
                f"{self.name}_seconds", self.seconds_doc, labels=["callback", "room"]
            ),
        )


class StoreCollector:
    """The SQLite writer's counts, read from it at scrape: failed write attempts (each
    retried until it succeeds), records dropped because too many were held unwritten, and
    event-index rows pruned as older than the retention."""

    def __init__(self, store: StoreCounts) -> None:
        self.store = store

    def describe(self) -> Iterator[CounterMetricFamily]:
        return iter(())

    def collect(self) -> Iterator[CounterMetricFamily]:
        yield CounterMetricFamily(
            "modgud_store_write_failures",
            "Failed SQLite write attempts (locked, disk full, I/O); the records are kept and "
            "retried",
            self.store.write_errors,
        )
        yield CounterMetricFamily(
            "modgud_store_dropped",
            "Records never written: refused while too many were held unwritten, or unwritable",
            self.store.dropped,
        )
        yield CounterMetricFamily(
            "modgud_store_index_pruned",
            "Event-index rows deleted as not seen within index_retention_days",
            self.store.pruned,
        )


class StoreCounts(Protocol):
    write_errors: int
    dropped: int
    pruned: int


class DatabaseCollector(Collector):
    """What lives in the database, read at scrape time: knocks waiting for a decision, how
    long the oldest has waited, and the database's size (on disk, WAL included, for
    SQLite; pg_database_size for PostgreSQL). One short read-only query per scrape; an
    unreadable database yields no samples rather than an error."""

    def __init__(self, target: str, clock: Callable[[], float] = time.time) -> None:
        self.db = open_db(target)
        self._clock = clock

    def describe(self) -> Iterator[GaugeMetricFamily]:
        return iter(())  # collected lazily: no samples are read at registration

    def collect(self) -> Iterator[GaugeMetricFamily]:
        size = self.db.size_bytes()
        if size is not None:
            yield GaugeMetricFamily(
                "modgud_database_bytes", "The findings database's size, WAL included", size
            )
        try:
            with reading(self.db.target, timeout=1) as conn:
                row = conn.one(
                    "SELECT COUNT(*), MIN(first_seen) FROM knocks WHERE status = 'pending'"
                )
        except DatabaseError as e:
            logger.debug("knocks unreadable at scrape: %s", e)
            return
        pending, oldest = row if row is not None else (0, None)
        yield GaugeMetricFamily(
            "modgud_knocks_pending", "Knocks waiting for an approve or deny", pending
        )
        yield GaugeMetricFamily(
            "modgud_knock_oldest_pending_seconds",
            "How long the oldest pending knock has waited (0: none waiting)",
            max(0.0, self._clock() - oldest) if oldest is not None else 0.0,
        )
