"""Turning findings into stored records and metrics: the one effect every judge's
verdict has, the edge's, the hook's and the Synapse module's alike."""

from __future__ import annotations

import collections
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Protocol

from prometheus_client import Counter

from proxy_addons.metrics import LEAK_KINDS, FindingMetrics
from proxy_addons.store import FindingRecord, Record
from rules.checks import ItemVerdict
from rules.findings import Finding

__all__ = ["Recorder", "count_items", "describe_refusal", "record_findings", "record_verdict"]


class _Store(Protocol):
    def record(self, records: Iterable[Record]) -> None: ...


class Recorder(Protocol):
    """Where findings go: modgud's Runtime, or the Synapse module's judge."""

    @property
    def store(self) -> _Store: ...

    @property
    def metrics(self) -> FindingMetrics: ...


def record_findings(
    runtime: Recorder,
    findings: Iterable[Finding],
    *,
    action: str,
    endpoint: str,
    txn_id: str | None = None,
    direction: str = "inbound",
) -> int:
    """Queue findings for SQLite and count them; returns how many."""
    now = time.time()
    records = [
        FindingRecord(
            ts=now,
            rule=str(f.rule),
            action=action,
            severity=str(f.severity),
            direction=direction,
            room_id=f.room_id,
            event_id=f.event_id,
            event_type=f.event_type,
            sender=f.sender,
            sender_server=f.sender_server,
            origin=f.origin,
            attributed_to=f.attributed_to,
            confidence=str(f.confidence),
            endpoint=endpoint,
            txn_id=txn_id,
            detail=f.detail,
        )
        for f in findings
    ]
    if records:
        runtime.store.record(records)
        metrics = runtime.metrics
        for r in records:
            metrics.findings.labels(r.rule, r.action, r.severity).inc()
            if r.rule in LEAK_KINDS:
                metrics.leaks.labels(r.rule, r.confidence).inc()
            server = metrics.server_label(r.attributed_to)
            if server is not None:
                metrics.server_findings.labels(server, r.rule).inc()
    return len(records)


def count_items(
    counter: Counter,
    direction: str,
    items: Sequence[ItemVerdict],
    action_of: Callable[[ItemVerdict], str],
) -> None:
    """Count a transaction's PDUs or EDUs by action and deciding rule: one increment per
    label set, not per item (a transaction has up to 150 items)."""
    if not items:
        return
    if not any(i.findings for i in items):
        counter.labels(direction, "allowed", "none").inc(len(items))
        return
    counts = collections.Counter(
        (action_of(i), str(i.findings[0].rule) if i.findings else "none") for i in items
    )
    for (action, rule), n in counts.items():
        counter.labels(direction, action, rule).inc(n)


def record_verdict(
    recorder: Recorder, verdict: ItemVerdict, *, enforcing: bool, endpoint: str
) -> bool:
    """The effect of a homeserver judge's verdict (the hook's, the module's) on one event
    or invite: its findings recorded, `dropped` when refused in enforce mode, `flagged`
    otherwise. Returns whether the homeserver is to refuse it."""
    refuse = verdict.refused and enforcing
    if verdict.findings:
        record_findings(
            recorder, verdict.findings, action="dropped" if refuse else "flagged", endpoint=endpoint
        )
    return refuse


def describe_refusal(event: Mapping[str, object], findings: Iterable[Finding]) -> str:
    """A judge's refusal of an event for its log, the same from every judge:
    `$event in !room [rule,…]: detail; …` (the hook's and the module's can be compared)."""
    found = list(findings)
    rules = ",".join(sorted({f.rule for f in found}))
    details = "; ".join(f.detail for f in found)
    return f"{event.get('event_id')} in {event.get('room_id')} [{rules}]: {details}"
