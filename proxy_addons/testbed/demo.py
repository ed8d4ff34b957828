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


def run(workdir: Path) -> int:
    started = time.monotonic()
    say("modgud demo: starting real Synapse homeservers, the federation peer and modgud…")
    failures = 0
    with Topology(workdir, mode="enforce", outbound=True) as topo:
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
