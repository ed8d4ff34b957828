"""Turning findings into stored records and metrics."""

from __future__ import annotations

import time
from collections.abc import Iterable

from proxy_addons.runtime import Runtime
from proxy_addons.store import FindingRecord
from rules.findings import Finding

__all__ = ["record_findings"]


def record_findings(
    runtime: Runtime,
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
        for r in records:
            runtime.metrics.findings.labels(r.rule, r.action, r.severity).inc()
    return len(records)
