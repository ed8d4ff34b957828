"""`modgud history` without a homeserver: its arguments, its errors, and the cursor and
findings it keeps (the audit against real Synapse is tests/e2e/test_history.py)."""

import asyncio

import pytest

from proxy_addons.cli import main
from proxy_addons.config import load_config
from proxy_addons.history import HistoryError, audit_room, history_findings
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
