"""The history audit against real Synapse: a room on hs2 — a Synapse *without* modgud in
its path, no module, no hook — leaked to the way the gap allows (a permitted server relays
a denied server's events straight to Synapse, and builds on them); `modgud history` run
afterwards against hs2's admin API finds exactly those events, blames as far as history
can, ignores what the denied server said before the ACL existed, redacts the leaked events
when confirmed, and resumes a run cut short. A benign room has no finding."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from proxy_addons.config import load_config
from proxy_addons.history import audit_room, history_findings
from proxy_addons.testbed.homeserver import ClientApi
from proxy_addons.testbed.scenarios import SCENARIOS, run_scenario
from proxy_addons.testbed.topology import Topology
from rules.policy import OperatorPolicy

pytestmark = pytest.mark.e2e


class Hs2Room:
    """A room on hs2 (no modgud) with an admin of hs2, joined by the peer's servers
    directly, and a modgud.yaml that audits hs2."""

    def __init__(self, topo: Topology, workdir: Path) -> None:
        self.topo = topo
        self.hs2 = topo.hs2
        name = f"admin{int(time.time() * 1000) % 10**8}"
        self.admin_id, token = self.hs2.register_user(name, admin=True)
        self.admin = ClientApi(self.hs2.base_url, token)
        self.room_id = self.admin.create_room(room_version="10", name="leaked before modgud")
        workdir.mkdir(parents=True, exist_ok=True)
        (workdir / "admin.token").write_text(token)
        self.config = workdir / "modgud.yaml"
        self.config.write_text(
            f"server_name: '{self.hs2.server_name}'\n"
            f"upstream: http://127.0.0.1:{self.hs2.http_port}\n"
            f"homeserver: {{admin_api: '{self.hs2.base_url}', access_token_file: admin.token,"
            " room_admin_token_file: admin.token}\n"
            f"database: {workdir / 'history.db'}\n"
        )

    def join(self, server, localpart):
        user = server.user(localpart)
        self.topo.peer.join(server, user, self.room_id, self.hs2.server_name, self.hs2.server_name)
        return user

    def send(self, deliverer, author, user, body, prev_events=None):
        """`author`'s event, delivered by `deliverer` straight to hs2."""
        event_id, pdu = self.topo.peer.build_event(
            self.room_id,
            author,
            user,
            "m.room.message",
            {"msgtype": "m.text", "body": body},
            prev_events=prev_events,
        )
        answer = self.topo.peer.send(deliverer, self.hs2.server_name, self.hs2.server_name, [pdu])
        assert answer.status == 200, answer.body
        assert self.admin.wait_for_message(self.room_id, body), f"hs2 did not take {body!r}"
        return event_id

    def history(self, *args):
        """`modgud history ARGS` with this room's config (hs2, not the topology's hs1)."""
        modgud = Path(sys.executable).with_name("modgud")
        return subprocess.run(
            [str(modgud), "history", *args, "--config", str(self.config)],
            capture_output=True,
            text=True,
            timeout=120,
            stdin=subprocess.DEVNULL,
        )


@pytest.fixture(scope="module")
def leaked(enforce_topology, tmp_path_factory):
    """hs2's room: the denied server speaks before the ACL (allowed then), the ACL comes,
    then the leaky server relays the denied server's message and builds on it."""
    topo = enforce_topology
    room = Hs2Room(topo, tmp_path_factory.mktemp("history"))
    dee = room.join(topo.denied, "dee")
    lee = room.join(topo.leaky, "lee")
    room.before = room.send(topo.denied, topo.denied, dee, "said before the ACL")
    room.admin.send_state(
        room.room_id,
        "m.room.server_acl",
        "",
        {"allow": ["*"], "deny": [topo.denied.name], "allow_ip_literals": True},
    )
    room.leaked = room.send(topo.leaky, topo.denied, dee, "relayed after the ACL")
    room.built = room.send(topo.leaky, topo.leaky, lee, "built on it", prev_events=[room.leaked])
    room.after = room.send(topo.leaky, topo.leaky, lee, "an ordinary message")
    return room


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
    db = str(leaked.config.parent / "history.db")
    shown = topo.cli("findings", "--db", db, "--rule", "history", "--json")
    assert {json.loads(x)["event_id"] for x in shown.stdout.splitlines()} == {
        leaked.leaked,
        leaked.built,
    }
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


def _bodies(room: Hs2Room) -> list[str]:
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
