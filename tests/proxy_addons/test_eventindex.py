"""The event index's in-memory dedupe: a delivery already recorded is not queued again,
memory is bounded by max_seen, and a delivery forgotten is recorded again (a second row
is an UPSERT: deliveries + 1, never a loss)."""

from __future__ import annotations

from proxy_addons.eventindex import EventIndex, IndexBatch, lookup_events, storable
from proxy_addons.store import FindingStore
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


def test_storable_keeps_text_and_escapes_lone_surrogates():
    """SQLite stores UTF-8: a lone surrogate is kept as its escape, other text as it is."""
    assert storable("!room:hs.test") == "!room:hs.test"
    assert storable("caf\u00e9 \U0001f600") == "caf\u00e9 \U0001f600"
    assert storable("!\ud800:x\udcff") == "!\\ud800:x\\udcff"


def test_a_pdu_with_lone_surrogates_is_indexed_and_the_writer_lives_on(tmp_path):
    """A room ID, content hash and (room v1) event ID with lone surrogates, as a JSON
    escape gives them (found by fuzzing: sqlite3 raised UnicodeEncodeError in the store's
    writer thread, which died, and nothing was recorded after it)."""
    event = {"room_id": "!\ud800:hs.test", "sender": "@a:good.test", "type": "m.room.message"}
    hostile = parse_pdu({**event, "hashes": {"sha256": "\udcff"}}, 0, "good.test", check_size=False)
    store = FindingStore(str(tmp_path / "m.db"))
    try:
        index = EventIndex(store.record)
        assert index.see([hostile], "good.test", event_ids={0: "$\ud800"}) == 1
        assert index.see(_pdus(1), "good.test") == 1
        assert store.flush(5)
    finally:
        store.close()
    rows = lookup_events(str(tmp_path / "m.db"), "!\\ud800:hs.test", ["\\udcff"])
    assert rows["\\udcff"]["event_id"] == "$\\ud800"
