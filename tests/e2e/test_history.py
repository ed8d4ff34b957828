"""The history audit against real Synapse: a room on hs2 — a Synapse *without* modgud in
its path, no module, no hook — leaked to the way the gap allows (a permitted server relays
a denied server's events straight to Synapse, and builds on them); `modgud history` run
afterwards against hs2's admin API finds exactly those events, blames as far as history
can, ignores what the denied server said before the ACL existed, redacts the leaked events
when confirmed, follows policy lists and spaces along their own histories, audits every
room with --all, and resumes a large room's audit after modgud is killed in the middle.
A benign room has no finding."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import pty
import sqlite3
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote

import aiohttp
import pytest

from proxy_addons.config import load_config
from proxy_addons.history import audit_room, history_findings, list_rooms
from proxy_addons.testbed.homeserver import free_port
from proxy_addons.testbed.pastleak import UnguardedRoom, leak_before_modgud, relay_history
from proxy_addons.testbed.scenarios import SCENARIOS, run_scenario
from rules.policy import OperatorPolicy

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def leaked(enforce_topology, tmp_path_factory):
    return leak_before_modgud(enforce_topology, tmp_path_factory.mktemp("history"))


def test_the_audit_finds_exactly_the_leak_and_what_was_built_on_it(leaked):
    """Exit 1; the relayed event (history.acl, blamed on the only other server in the
    room then, low confidence) and the event built on it (history.reference, blamed on
    its author); nothing for what the denied server said before the ACL."""
    topo = leaked.topo
    result = leaked.history(leaked.room_id, "--json", "--restart")
    assert result.returncode == 1, result.stderr
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    assert [(r["event_id"], r["rule"], r["attributed_to"], r["confidence"]) for r in lines] == [
        (leaked.leaked, "history.acl", topo.leaky.name, "low"),
        (leaked.built, "history.reference", topo.leaky.name, "medium"),
    ]
    first = lines[0]
    assert first["sender_server"] == topo.denied.name and first["endpoint"] == "history"
    assert first["action"] == "flagged" and first["position"] > 0
    assert lines[1]["position"] > first["position"]
    # The same store and views as live findings.
    db = str(load_config(leaked.config).database)
    shown = topo.cli("findings", "--db", db, "--rule", "history", "--json")
    assert {json.loads(x)["event_id"] for x in shown.stdout.splitlines()} == {
        leaked.leaked,
        leaked.built,
    }
    leaks = topo.cli("leaks", "--db", db, "--json")
    (group,) = [json.loads(x) for x in leaks.stdout.splitlines()]
    assert group["blamed"] == topo.leaky.name
    assert group["events"] == sorted([leaked.leaked, leaked.built])
    # Run again: the cursor is at the end, nothing is judged twice or recorded twice.
    again = leaked.history(leaked.room_id)
    assert again.returncode == 1 and "0 new findings, 2 in all" in again.stdout, again.stdout


def test_redact_is_a_dry_run_until_confirmed_then_the_leak_is_gone(leaked):
    topo = leaked.topo
    dry = leaked.history(leaked.room_id, "--redact")  # no terminal, no --yes: a dry run
    assert "dry run: nothing redacted" in dry.stdout and leaked.leaked in dry.stdout
    assert "relayed after the ACL" in _bodies(leaked)
    done = leaked.history(leaked.room_id, "--redact", "--yes")
    assert f"redacted {leaked.leaked}" in done.stdout, done.stdout + done.stderr
    assert f"redacted {leaked.built}" not in done.stdout  # the permitted server's own event
    assert "relayed after the ACL" not in _bodies(leaked)
    assert "built on it" in _bodies(leaked)
    assert topo  # the topology stays up for the other tests


def _bodies(room: UnguardedRoom) -> list[str]:
    return [
        e["content"].get("body")
        for e in room.admin.messages(room.room_id)
        if e.get("type") == "m.room.message"
    ]


def test_a_run_cut_short_resumes_where_it_stopped(leaked):
    """An audit stopped after its first page (a restart, in effect) and run again goes
    on from there: the same findings as one run, none twice."""
    config = load_config(leaked.config)
    policy = OperatorPolicy(local_server=config.server_name)
    for n in range(30):  # more pages of history
        leaked.admin.send_message(leaked.room_id, f"filler {n}")
    cut = asyncio.run(
        audit_room(config, leaked.room_id, policy, restart=True, stop_after=2, page_events=10)
    )
    assert cut.position == 20 and cut.judged == 20
    rest = leaked.history(leaked.room_id)
    assert rest.returncode == 1
    assert "resumed at 20" in rest.stdout, rest.stdout
    events = sorted(r["event_id"] for r in history_findings(str(config.database), leaked.room_id))
    assert events == sorted([leaked.leaked, leaked.built])


def test_a_benign_room_has_no_finding(enforce_topology):
    """The benign corpus story through modgud, then its room's history: exit 0."""
    topo = enforce_topology
    (benign,) = [s for s in SCENARIOS if s.name == "benign_chat"]
    outcome = run_scenario(topo, benign)
    assert outcome.ok
    audited = topo.cli("history", outcome.room_id)
    assert audited.returncode == 0, audited.stdout + audited.stderr
    assert "0 new findings, 0 in all" in audited.stdout


def test_a_policy_list_ban_counts_from_its_rule_until_its_removal(leaked):
    """hs2 enforces no policy list: a server banned in the operator's list keeps posting
    straight to hs2. Only what it said while the rule stood is found, blamed on itself."""
    topo = leaked.topo
    room_id = leaked.admin.create_room(room_version="10", name="policy history")
    spam = leaked.join(topo.spammer, "spam", room_id)
    send = leaked.send
    before = send(topo.spammer, topo.spammer, spam, "before the ban", room_id=room_id)
    rule = {"entity": topo.spammer.name, "recommendation": "m.ban", "reason": "spam"}
    time.sleep(0.1)
    leaked.admin.send_state(leaked.policy_room, "m.policy.rule.server", "rule:spam", rule)
    time.sleep(0.1)
    during = send(topo.spammer, topo.spammer, spam, "while banned", room_id=room_id)
    time.sleep(0.1)
    leaked.admin.send_state(leaked.policy_room, "m.policy.rule.server", "rule:spam", {})
    time.sleep(0.1)
    after = send(topo.spammer, topo.spammer, spam, "after the ban", room_id=room_id)
    result = leaked.history(room_id, "--json")
    assert result.returncode == 1, result.stderr
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    assert [(r["event_id"], r["rule"], r["attributed_to"]) for r in lines] == [
        (during, "history.policy_list", topo.spammer.name),
        # Built on the banned event (its prev_event), though sent after the ban ended.
        (after, "history.reference", topo.spammer.name),
    ]
    assert before not in {r["event_id"] for r in lines}


def test_a_space_acl_counts_while_the_space_held_the_room(leaked):
    """MSC3216 along the history: hs2 enforces no space's policy. The space's ACL denies
    the server from when the space links the room until it unlinks it: only what the
    server said in between is found (with the space followed), nothing without it."""
    topo = leaked.topo
    space = leaked.admin.create_room(preset="private_chat", name="a space")
    room_id = leaked.admin.create_room(room_version="10", name="space history")
    spam = leaked.join(topo.spammer, "spaced", room_id)
    send = leaked.send
    before = send(topo.spammer, topo.spammer, spam, "before the space held it", room_id=room_id)
    time.sleep(0.1)
    via = {"via": [leaked.hs2.server_name]}
    leaked.admin.send_state(space, "m.space.child", room_id, via)
    deny = {"allow": ["*"], "deny": [topo.spammer.name], "allow_ip_literals": True}
    leaked.admin.send_state(space, "m.room.server_acl", "", deny)
    time.sleep(0.1)
    during = send(topo.spammer, topo.spammer, spam, "while the space held it", room_id=room_id)
    time.sleep(0.1)
    leaked.admin.send_state(space, "m.space.child", room_id, {})
    time.sleep(0.1)
    after = send(topo.spammer, topo.spammer, spam, "after the space let go", room_id=room_id)
    followed = leaked.history(
        room_id, "--json", config=leaked.write_config("space", spaces=(space,))
    )
    assert followed.returncode == 1, followed.stderr
    lines = [json.loads(line) for line in followed.stdout.splitlines()]
    assert [(r["event_id"], r["rule"], r["attributed_to"]) for r in lines] == [
        (during, "history.acl", None),  # no other server was in the room to bring it in
        (after, "history.reference", topo.spammer.name),  # built on it
    ]
    assert f"(space {space})" in lines[0]["detail"]
    assert before not in {r["event_id"] for r in lines}
    unfollowed = leaked.history(room_id, "--json")
    assert unfollowed.returncode == 0 and not unfollowed.stdout, unfollowed.stdout


def test_all_audits_every_room_the_homeserver_has(leaked):
    config_path = leaked.write_config("all")
    result = leaked.history("--all", config=config_path)
    assert result.returncode == 1, result.stderr
    config = load_config(config_path)

    async def rooms() -> list[str]:
        async with aiohttp.ClientSession() as session:
            return await list_rooms(session, config)

    every = asyncio.run(rooms())
    assert {leaked.room_id, leaked.policy_room} <= set(every)
    summaries = [line for line in result.stdout.splitlines() if " events judged in " in line]
    assert sorted(line.split(": ", 1)[0] for line in summaries) == sorted(every)
    found = history_findings(str(config.database), leaked.room_id)
    assert {leaked.leaked, leaked.built} <= {r["event_id"] for r in found}
    assert not history_findings(str(config.database), leaked.policy_room)
    new = sum(int(line.split("; ")[1].split()[0]) for line in summaries)
    with sqlite3.connect(config.database) as db:
        (recorded,) = db.execute("SELECT count(*) FROM findings").fetchone()
    assert new == recorded > 0


def _drain(fd: int, chunks: list[bytes]) -> None:
    """Read a pty's output until it closes, so the writer never blocks on a full pty."""
    with contextlib.suppress(OSError):
        while chunk := os.read(fd, 4096):
            chunks.append(chunk)


class StallingAdminApi:
    """hs2's admin API through a forwarder that serves `pages` forward pages of one room's
    history, then holds the next such request (modgud waits on it) until `release`."""

    def __init__(self, upstream: str, room_id: str, pages: int) -> None:
        self.stalled, self._released = threading.Event(), threading.Event()
        forward = f"/rooms/{room_id}/messages?dir=f"  # as aiohttp sends it: not quoted
        served = [0]
        api = self
        self.paths: list[str] = []

        class Forward(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - http.server's name
                api.paths.append(self.path)
                if forward in unquote(self.path):
                    served[0] += 1
                    if served[0] > pages and not api._released.is_set():
                        api.stalled.set()
                        api._released.wait(120)
                        with contextlib.suppress(OSError):  # modgud was killed meanwhile
                            self.send_error(503)
                        return
                headers = {"Authorization": self.headers.get("Authorization", "")}
                request = urllib.request.Request(upstream + self.path, headers=headers)
                try:
                    with urllib.request.urlopen(request, timeout=60) as answer:
                        status, body = answer.status, answer.read()
                except urllib.error.HTTPError as e:
                    status, body = e.code, e.read()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", free_port()), Forward)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def release(self) -> None:
        self._released.set()

    def close(self) -> None:
        self.release()
        self.server.shutdown()
        self.server.server_close()


def test_a_large_room_resumes_after_modgud_is_killed_mid_audit(leaked):
    """1,200 events, 12 leaked from the middle on (each with an event built on it); the
    audit killed (-9) when it asks for its third page of 500: run again, it resumes at the
    cursor the second page committed, and the findings are exactly the leaks, none twice."""
    topo, hs2 = leaked.topo, leaked.hs2
    room_id = leaked.admin.create_room(room_version="10", name="a long history")
    relay = (topo.leaky, leaked.join(topo.leaky, "long", room_id))
    denied = (topo.denied, leaked.join(topo.denied, "long", room_id))
    sent = relay_history(
        topo.peer, leaked.admin, (hs2.server_name, hs2.server_name), room_id, relay, denied, 1200
    )
    assert len(sent.leaked) == len(sent.built) == 12
    api = StallingAdminApi(hs2.base_url, room_id, pages=2)
    try:
        config_path = leaked.write_config("long", admin_api=api.url)
        database = load_config(config_path).database
        modgud = Path(sys.executable).with_name("modgud")
        process = subprocess.Popen(
            [str(modgud), "history", room_id, "--config", str(config_path)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        stalled = api.stalled.wait(120)
        process.kill()
        output = process.communicate(timeout=10)[0].decode(errors="replace")
        assert stalled, f"the audit never asked for its third page: {api.paths}\n" + output
        with sqlite3.connect(database) as db:
            (cut, finished) = db.execute(
                "SELECT position, finished FROM history_cursors WHERE room_id = ?", (room_id,)
            ).fetchone()
            (before,) = db.execute("SELECT count(*) FROM findings").fetchone()
        assert cut == 1000 and not finished
        assert 0 < before < 24  # leaks on both sides of the cut
        api.release()
        # On a terminal (stderr a pty, read as it is written), with a progress bar.
        terminal, tty = pty.openpty()
        chunks: list[bytes] = []
        reader = threading.Thread(target=_drain, args=(terminal, chunks), daemon=True)
        reader.start()
        try:
            rest = subprocess.run(
                [str(modgud), "history", room_id, "--config", str(config_path)],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=tty,
                text=True,
                timeout=120,
            )
        finally:
            os.close(tty)
            reader.join(timeout=10)
            os.close(terminal)
        progress = b"".join(chunks).decode(errors="replace")
    finally:
        api.close()
    assert rest.returncode == 1, rest.stdout
    assert "resumed at 1000" in rest.stdout, rest.stdout
    assert f"{room_id}: [" in progress and "] 100% 1,2" in progress, progress
    found = history_findings(str(database), room_id)
    assert len(found) == 24  # nothing recorded twice
    assert {r["event_id"] for r in found if r["rule"] == "history.acl"} == sent.leaked
    assert {r["event_id"] for r in found if r["rule"] == "history.reference"} == sent.built
