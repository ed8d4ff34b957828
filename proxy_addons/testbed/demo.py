"""`make demo`: a real Synapse (hs1) behind modgud, a second real Synapse (hs2), and the
scripted federation peer playing a leaky server, a denied server and a server nobody knows.
Runs a few stories from the scenario corpus and reports what modgud decided, why, which
server it blames and on what evidence. Leaves nothing running.
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from proxy_addons.leaks import LEAK_RULES
from proxy_addons.testbed.homeserver import ClientError, wait_for
from proxy_addons.testbed.member import Member
from proxy_addons.testbed.pastleak import leak_before_modgud
from proxy_addons.testbed.scenarios import SCENARIOS, Outcome, Stage, run_scenario
from proxy_addons.testbed.topology import Topology

CHAPTERS = [
    "benign_chat",
    "knock",
    "knock_approved",
    "denied_origin_posts",
    "relayed_leak",
    "built_on_denied",
]


def say(text: str = "") -> None:
    print(text, flush=True)


def _finding(f: dict[str, Any]) -> None:
    blamed = f["attributed_to"] or "nobody (not attributable yet)"
    say(f"     {f['action']:<8} {f['rule']:<12} blamed: {blamed}  confidence: {f['confidence']}")
    if f["event_id"]:
        say(f"              event {f['event_id']} by {f['sender'] or '-'} via {f['origin'] or '-'}")
    say(f"              evidence: {f['detail']}")


def _chapter(n: int, topo: Topology, outcome: Outcome) -> None:
    say(f"\n{n}. {outcome.scenario.story}")
    seen = [
        e["content"].get("body")
        for e in topo.alice.messages(outcome.room_id)
        if e.get("type") == "m.room.message"
    ]
    expected = outcome.scenario.expected(topo.mode)
    for body in expected.reach:
        say(f"   alice@hs1 sees     {body!r}" if body in seen else f"   MISSING           {body!r}")
    for body in expected.hidden:
        say(f"   LEAKED            {body!r}" if body in seen else f"   alice never sees  {body!r}")
    for role, localpart, _ in expected.members:
        user_id = Stage(topo, "").user(role, localpart)
        state = topo.alice.get_state(outcome.room_id, "m.room.member", user_id)
        say(f"   membership of {user_id}: {(state or {}).get('membership')}")
    if outcome.findings:
        say("   modgud:")
        for f in outcome.findings:
            _finding(f)
    else:
        say("   modgud: nothing to report (no false positive)")
    for failure in outcome.failures:
        say(f"   UNEXPECTED: {failure}")


def _outbound_chapter(n: int, topo: Topology) -> int:
    """hs1 itself would leak: Synapse keeps sending a room's events to a server the room
    has denied. Returns the number of unmet expectations."""
    say(
        f"\n{n}. A server joined alice's room, then the room denied its participation"
        " (m.server.participation: deny). Synapse knows nothing of that and keeps sending"
        " it the room's messages; modgud's outbound listener keeps them back."
    )
    room_id = topo.alice.create_room(room_version="12", name="outbound")
    topo.peer_join(topo.outcast, "outcast", room_id)
    topo.alice.send_state(
        room_id, "m.server.participation", topo.outcast.name, {"participation": "deny"}
    )
    time.sleep(1.5)
    topo.alice.send_message(room_id, "not for the outcast")
    rows = topo.wait_for_findings(
        lambda r: any(f["rule"] == "leak.outbound" for f in r), room=room_id
    )
    time.sleep(1)
    got = any(
        p.get("content", {}).get("body") == "not for the outcast"
        for _, txn in topo.peer.received
        for p in txn.get("pdus", [])
    )
    say(f"   {topo.outcast.name} " + ("RECEIVED IT" if got else "never receives it"))
    outbound = [f for f in rows if f["rule"] == "leak.outbound"]
    if outbound:
        say("   modgud:")
        for f in outbound:
            _finding(f)
    return int(got) + int(not outbound)


def _show(message: dict[str, Any], lines: int = 12) -> None:
    for line in message["content"]["body"].split("\n")[:lines]:
        say(f"   | {line}")


def _management_chapter(n: int, topo: Topology) -> int:
    """The management room: a knock approved by a moderator's reaction, the leaks of the
    chapters above as grouped messages, a space-wide power-level change with one room
    allowed to fail. Returns the number of unmet expectations."""
    bot = topo.users["modgud"]
    mod = Member(topo.hs1.base_url, topo.tokens["mod"], topo.users["mod"], topo.management_room)
    say(
        f"\n{n}. The management room {topo.management_room}: modgud's bot {bot} posts knocks,"
        f" leaks and alarms there, and {topo.users['mod']} (power level 50) answers in Matrix."
    )
    failures = 0
    room_id = topo.alice.create_room(room_version="10", name="knock first")
    topo.alice.send_state(room_id, "m.server.knock_rule", "", {"rule": "active"})
    time.sleep(1.5)
    knock = {"edu_type": "m.server.knock", "content": {"room_id": room_id}}
    topo.peer_send(topo.unknown, edus=[knock])
    posted = wait_for(
        lambda: [
            e
            for e in mod.posts(bot, f"Knock: {topo.unknown.name}")
            if room_id in e["content"]["body"]
        ],
        30,
    )
    if not posted:
        say("   UNEXPECTED: no knock message")
        return 1
    say(f"   {topo.unknown.name} knocks on {room_id}; the bot posts:")
    _show(posted[0])
    say(f"   {topo.users['mod']} reacts ✅ on it; the bot answers in the knock's thread:")
    mod.react(posted[0]["event_id"], "✅")
    answer = wait_for(lambda: mod.answers(bot, posted[0]["event_id"]), 30)
    if answer:
        _show(answer[0])
    else:
        failures += 1
        say("   UNEXPECTED: no answer")

    def state() -> dict[str, Any] | None:
        try:
            return topo.alice.get_state(room_id, "m.server.participation", topo.unknown.name)
        except ClientError:
            return None

    written = wait_for(state, 30)
    say(f"   m.server.participation of {topo.unknown.name} in the room: {written}")
    failures += 0 if written and written.get("participation") == "permitted" else 1

    leaks = wait_for(lambda: mod.posts(bot, "Leak in "), 30) or []
    found = [f for f in topo.findings() if f["rule"] in LEAK_RULES]
    say(
        f"\n   The leaks of the chapters above: {len(found)} finding(s), {len(leaks)} message(s),"
        " one per (room, blamed server, rule); more events of a group are counted and posted"
        " in its thread at most every leak_interval_seconds. The relayed leak's:"
    )
    relayed = [p for p in leaks if "rule acl.sender" in p["content"]["body"]] or leaks
    if relayed:
        _show(relayed[0], lines=4)
    else:
        failures += 1

    carol = topo.users["carol"]
    space, rooms, locked = topo.space_with_a_locked_room({"users": {carol: 50}, "ban": 60})
    command = f"!modgud space powerlevels sync {space} allow-fail={locked}"
    say(
        f"\n   A space-wide power-level change: the space's m.space.power_levels gives {carol} 50"
        f" and the ban level 60; in {locked} the room admin has no power, so it is allowed to"
        f" fail. {topo.users['mod']} sends: {command}"
    )
    sent = mod.say(command)
    answer = wait_for(lambda: mod.answers(bot, sent), 60)
    if answer:
        _show(answer[0], lines=20)
    else:
        failures += 1
        say("   UNEXPECTED: no answer")
    levels = topo.alice.get_state(rooms[0], "m.room.power_levels") or {}
    say(f"   {rooms[0]} now gives {carol} level {levels.get('users', {}).get(carol)}")
    failures += 0 if levels.get("users", {}).get(carol) == 50 else 1
    return failures


def _history_chapter(n: int, topo: Topology) -> int:
    """Has a room already leaked? A room on hs2, which modgud is not in front of, leaked
    to; then `modgud history` against hs2's admin API. Returns unmet expectations."""
    say(
        f"\n{n}. Before modgud: a room on hs2 ({topo.hs2.server_name}, no modgud in its path)."
        f" {topo.denied.name} speaks, then the room's ACL denies it; {topo.leaky.name} relays"
        f" its next message straight to hs2, which accepts it, and builds on it. Later, the"
        f" operator asks: has this room already leaked?"
    )
    room = leak_before_modgud(topo, topo.workdir / "history")
    say(f"   $ modgud history {room.room_id} --config {room.config}")
    result = room.history(room.room_id)
    for line in result.stdout.splitlines():
        say(f"   | {line}")
    say(f"   exit status {result.returncode} (1: the room has leaked)")
    found = result.returncode == 1 and room.leaked in result.stdout
    return 0 if found and room.before not in result.stdout else 1


def run(workdir: Path) -> int:
    started = time.monotonic()
    say("modgud demo: starting real Synapse homeservers, the federation peer and modgud…")
    failures = 0
    with Topology(workdir, mode="enforce", outbound=True, management=True) as topo:
        say(
            f"  hs1      {topo.hs1.server_name:<22} Synapse behind modgud (enforce), with modgud's module;"
            " its own federation goes out through modgud too (https_proxy)"
        )
        say(f"  hs2      {topo.hs2.server_name:<22} Synapse, direct")
        say(
            f"  leaky    {topo.leaky.name:<22} peer: stays allowed, relays and builds on what it should not"
        )
        say(f"  denied   {topo.denied.name:<22} peer: the server the rooms' ACLs deny")
        say(f"  unknown  {topo.unknown.name:<22} peer: a server nobody has heard of")
        say(f"  outcast  {topo.outcast.name:<22} peer: joined, then denied participation")

        room_id = topo.alice.create_room(room_version="12", name="modgud demo")
        topo.bob.join(room_id, via=[topo.hs1.server_name])
        topo.bob.send_message(room_id, "hi from bob@hs2")
        ok = topo.alice.wait_for_message(room_id, "hi from bob@hs2")
        say(
            "\n0. bob@hs2 (a real Synapse) joins alice's room and says hi: "
            + ("arrives" if ok else "DID NOT ARRIVE")
            + f"; modgud findings: {len(topo.findings(room=room_id))}"
        )
        failures += 0 if ok else 1

        by_name = {s.name: s for s in SCENARIOS}
        for n, name in enumerate(CHAPTERS, 1):
            outcome = run_scenario(topo, by_name[name], settle=1.0)
            _chapter(n, topo, outcome)
            failures += len(outcome.failures)

        failures += _outbound_chapter(len(CHAPTERS) + 1, topo)
        failures += _management_chapter(len(CHAPTERS) + 2, topo)
        failures += _history_chapter(len(CHAPTERS) + 3, topo)

        say(f"\nMetrics were served at http://127.0.0.1:{topo.metrics_port}/metrics, among them:")
        for line in topo.metrics_text().splitlines():
            if line.startswith("modgud_findings_total"):
                say(f"   {line}")
        assert topo.hs1.metrics_port is not None
        say(
            "and the module's, by hs1's own metrics listener at "
            f"http://127.0.0.1:{topo.hs1.metrics_port}/_synapse/metrics:"
        )
        for line in topo.hs1.metrics_text().splitlines():
            if line.startswith("modgud_module_calls_total"):
                say(f"   {line}")
        say(f"\nAll findings: modgud findings --db {topo.database}")
    say(f"Everything stopped. The demo took {time.monotonic() - started:.0f} s.")
    if failures:
        say(f"UNEXPECTED: {failures} expectation(s) not met (see above).")
        return 1
    return 0


def main() -> int:
    keep = Path("run/demo")
    keep.mkdir(parents=True, exist_ok=True)
    return run(Path(tempfile.mkdtemp(prefix="demo-", dir=keep)))


if __name__ == "__main__":
    sys.exit(main())
