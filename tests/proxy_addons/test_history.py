"""`modgud history` without a homeserver: its arguments, its errors, and the cursor and
findings it keeps (the audit against real Synapse is tests/e2e/test_history.py)."""

import asyncio

import pytest

from proxy_addons.cli import main
from proxy_addons.config import load_config
from proxy_addons.history import HistoryError, audit_room, history_findings
from proxy_addons.store import FINDING_COLUMNS
from rules.policy import OperatorPolicy


@pytest.fixture
def config_path(tmp_path):
    (tmp_path / "admin.token").write_text("t")
    path = tmp_path / "modgud.yaml"
    # Port 9 (discard): nothing answers there.
    path.write_text(
        "server_name: hs.test\nupstream: http://127.0.0.1:9\n"
        "homeserver: {access_token_file: admin.token}\n"
        f"database: {tmp_path / 'm.db'}\n"
    )
    return path


@pytest.mark.parametrize("args", [[], ["!r:hs.test", "--all"]])
def test_a_room_or_all_but_not_both(config_path, args, capsys):
    assert main(["history", *args, "--config", str(config_path)]) == 2
    assert "give a room ID or --all" in capsys.readouterr().err


def test_an_unreachable_homeserver_is_a_clear_error(config_path, capsys):
    assert main(["history", "!r:hs.test", "--config", str(config_path)]) == 2
    assert "modgud history: homeserver unreachable" in capsys.readouterr().err


def test_no_cursor_and_no_findings_before_a_run(config_path):
    config = load_config(config_path)
    with pytest.raises(HistoryError):
        asyncio.run(audit_room(config, "!r:hs.test", OperatorPolicy(local_server="hs.test")))
    assert history_findings(config.database, "!r:hs.test") == []


def test_the_progress_bar():
    from proxy_addons.history import HistoryRun

    run = HistoryRun("!r:hs.test", judged=2_500, position=5_000, found=3, seconds=2.5, total=10_000)
    assert run.progress(10) == "[#####.....]  50% 5,000/10,000 events, 3 findings, 1,000/s"
    run.position = 12_000  # events stored since the walk back
    assert run.progress(10).startswith("[##########] 100% 12,000/10,000")
    assert HistoryRun("!r:hs.test").progress(4) == "[....]   0% 0/0 events, 0 findings, 0/s"


def test_starting_over_forgets_the_rooms_cursor_and_history_findings_only(config_path):
    """--restart: the room's cursor and history findings go (a run from the start records
    them again, and what no longer holds is not left behind); other rooms' and the
    edge's findings stay."""
    from proxy_addons.database import reading, writing
    from proxy_addons.history import _checkpoint, _row, forget_history
    from proxy_addons.store import insert_findings
    from rules.findings import Confidence, Finding, Rule, Severity
    from rules.history import HistoryAudit

    config = load_config(config_path)

    def finding(room_id, event_id, rule=Rule.HISTORY_ACL):
        f = Finding(
            rule,
            Severity.WARNING,
            "refused",
            room_id=room_id,
            event_id=event_id,
            sender="@e:evil.test",
            sender_server="evil.test",
            confidence=Confidence.LOW,
        )
        return _row(f, {}, 1.0)

    for room_id in ("!a:hs.test", "!b:hs.test"):
        audit = HistoryAudit(room_id, "hs.test", OperatorPolicy(local_server="hs.test"))
        found = [finding(room_id, f"$1{room_id[1]}")]
        _checkpoint(config.database, room_id, "t", audit, found, True)
    edge = list(finding("!a:hs.test", "$2", Rule.ACL_SENDER))
    edge[FINDING_COLUMNS.index("endpoint")] = "send"
    with writing(config.database) as db:
        insert_findings(db, [tuple(edge)])
    forget_history(config.database, "!a:hs.test")
    assert history_findings(config.database, "!a:hs.test") == []
    assert [r["event_id"] for r in history_findings(config.database, "!b:hs.test")] == ["$1b"]
    with reading(config.database) as conn:
        assert conn.tuples("SELECT room_id FROM history_cursors") == [("!b:hs.test",)]
        assert conn.tuples("SELECT event_id FROM findings WHERE endpoint = 'send'") == [("$2",)]
