"""Recording findings: queued for SQLite and counted."""

from __future__ import annotations

from proxy_addons.recording import record_findings
from rules.findings import Finding, Rule, Severity
from tests.proxy_addons.conftest import recorded_findings


def test_findings_with_lone_surrogates_are_stored_escaped(make_runtime):
    """Text from traffic may hold lone surrogates (a JSON escape, or a path's invalid
    bytes as mitmproxy decodes them). Found by fuzzing: sqlite3 raised UnicodeEncodeError
    in the store's writer thread, which died, and no finding was stored after it."""
    holder = make_runtime()
    finding = Finding(
        Rule.MALFORMED_PDU,
        Severity.WARNING,
        "detail \ud800",
        room_id="!\ud800:hs.test",
        event_id="$\udcff",
        event_type="m.\ud800",
        sender="@\ud800:good.test",
        origin="good.test",
    )
    runtime = holder.runtime
    record_findings(runtime, [finding], action="rejected", endpoint="send", txn_id="t\udcff")
    record_findings(
        runtime,
        [Finding(Rule.ACL_ORIGIN, Severity.WARNING, "later")],
        action="rejected",
        endpoint="send",
    )
    rows = recorded_findings(holder)
    assert [(r["room_id"], r["event_id"], r["sender"], r["txn_id"], r["detail"]) for r in rows] == [
        ("!\\ud800:hs.test", "$\\udcff", "@\\ud800:good.test", "t\\udcff", "detail \\ud800"),
        (None, None, None, None, "later"),
    ]
