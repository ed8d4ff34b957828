"""The history audit against real Synapse: a room on hs2 — a Synapse *without* modgud in
its path, no module, no hook — leaked to the way the gap allows (a permitted server relays
a denied server's events straight to Synapse, and builds on them); `modgud history` run
afterwards against hs2's admin API finds exactly those events, blames as far as history
can, ignores what the denied server said before the ACL existed, redacts the leaked events
when confirmed, and resumes a run cut short. A benign room has no finding."""

from __future__ import annotations

import asyncio
import json
import time

import pytest

from proxy_addons.config import load_config
from proxy_addons.history import audit_room, history_findings
from proxy_addons.testbed.pastleak import UnguardedRoom, leak_before_modgud
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
    db = str(leaked.config.parent / "history.db")
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
