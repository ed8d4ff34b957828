"""How many records the store's batching writer takes per second, on each engine:
`python -m tests.bench.store` (part of `make bench`).

The records a busy edge makes: event-index rows (one per PDU, queued as one batch per
transaction of 50 PDUs) and findings (here one per 10 PDUs: a room under attack), into
an SQLite file (WAL, on the bench directory's disk) and into a throwaway PostgreSQL
cluster (proxy_addons.testbed.postgres; fsync on, as in production). Reported: rows per
second from the first record to the last commit, and the writer's queue at its highest —
what `record()` never waits for (the event loop only queues; beyond `max_pending` rows
are dropped and counted, never blocking).
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from pathlib import Path

from proxy_addons.eventindex import IndexBatch
from proxy_addons.store import FindingRecord, FindingStore
from proxy_addons.testbed.homeserver import free_port
from proxy_addons.testbed.postgres import Postgres
from tests.bench.results import record

TRANSACTIONS = int(os.environ.get("BENCH_STORE_TRANSACTIONS", "2000"))
PDUS = 50


def finding(n: int) -> FindingRecord:
    return FindingRecord(
        time.time(),
        "acl.sender",
        "dropped",
        "high",
        "inbound",
        f"!room{n % 50}:bench.test",
        f"$event{n}",
        "m.room.message",
        "@u:denied.test",
        "denied.test",
        "relay.test",
        "relay.test",
        "high",
        "send",
        f"txn{n}",
        "event written by denied.test: denied by the room's server ACL",
    )


def run(target: str) -> tuple[float, float, int]:
    """(index rows per second, findings per second, the queue's highest) into `target`."""
    store = FindingStore(target)
    highest = 0
    started = time.perf_counter()
    findings = 0
    for t in range(TRANSACTIONS):
        now = time.time()
        rows = [
            (
                f"!room{t % 50}:bench.test",
                f"hash{t}-{p}",
                None,
                "remote.test",
                "relay.test",
                "relay.test",
                "inbound",
                "send",
                now,
                now,
            )
            for p in range(PDUS)
        ]
        batch: list[object] = [IndexBatch(rows)]
        batch += [finding(t * PDUS + p) for p in range(0, PDUS, 10)]
        findings += PDUS // 10
        store.record(batch)  # type: ignore[arg-type]
        highest = max(highest, store.pending)
    assert store.flush(600), "the writer did not catch up"
    took = time.perf_counter() - started
    store.close()
    return TRANSACTIONS * PDUS / took, findings / took, highest


def main() -> None:
    workdir = Path(tempfile.mkdtemp(prefix="modgud-bench-store-"))
    try:
        sqlite = run(str(workdir / "bench.db"))
        # Durability on, as a production server runs (the tests' clusters turn it off).
        with Postgres(workdir / "pg", free_port(), durable=True) as server:
            postgresql = run(server.create_database("bench"))
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    print(
        f"The store's writer, {TRANSACTIONS} transactions of {PDUS} PDUs "
        f"(an index row each, a finding per 10): rows per second"
    )
    for name, (rows, found, highest) in (("SQLite", sqlite), ("PostgreSQL", postgresql)):
        print(
            f"  {name:<11} {rows:>9,.0f} index rows/s  {found:>8,.0f} findings/s  "
            f"queue at most {highest:,}"
        )
        record(
            18,
            f"store writer, {name}: index rows per second",
            rows,
            None,
            unit="/s",
            higher_is_better=True,
            note=f"{found:,.0f} findings/s alongside; queue at most {highest:,}",
        )


if __name__ == "__main__":
    main()
