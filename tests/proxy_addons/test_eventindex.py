"""The event index's in-memory dedupe: a delivery already recorded is not queued again,
memory is bounded by max_seen, and a delivery forgotten is recorded again (a second row
is an UPSERT: deliveries + 1, never a loss)."""

from __future__ import annotations

from proxy_addons.eventindex import EventIndex, IndexBatch
from rules.federation import parse_pdu
from tests.proxy_addons.conftest import pdu


def _pdus(n, start=0):
    return [
        parse_pdu(pdu("@a:good.test", body=f"m{i}"), i, "good.test")
        for i in range(start, start + n)
    ]


def test_deliveries_are_queued_once_and_the_memory_is_bounded():
    queued: list[IndexBatch] = []
    index = EventIndex(queued.extend, max_seen=10)
    first = _pdus(4)
    assert index.see(first, "good.test") == 4
    assert index.see(first, "good.test") == 0  # the same deliveries again
    assert index.see(first, "relay.test") == 4  # another deliverer is news
    assert index.see(_pdus(40, 100), "good.test") == 40
    assert len(index) <= 10
    assert index.see(first, "good.test") == 4  # long forgotten: recorded again (upsert)
    assert sum(len(b.rows) for b in queued) == 4 + 4 + 40 + 4
