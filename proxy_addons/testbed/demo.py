"""`make demo`: a real Synapse (hs1) behind modgud, two real Synapse peers, scripted
federation traffic, and a report of what modgud decided and why. Leaves nothing running.

    hs2 (127.0.0.1:*) — will be denied by the room's ACL
    hs3 (localhost:*) — stays allowed, and relays hs2's event (a "leak")
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

from proxy_addons.testbed.topology import Topology

VERSION = "12"


def say(text: str) -> None:
    print(text, flush=True)


def run(workdir: Path) -> int:
    started = time.monotonic()
    say("modgud demo: starting three real Synapse homeservers and modgud (enforce mode)…")
    with Topology(workdir, mode="enforce") as topo:
        say(f"  hs1 {topo.hs1.server_name}  behind modgud (federation port {topo.modgud_port})")
        say(f"  hs2 {topo.hs2.server_name}  a peer the room will deny")
        say(f"  hs3 {topo.hs3.server_name}  an allowed peer that will relay hs2's event")
        room_id = topo.alice.create_room(room_version=VERSION, name="modgud demo")
        say(f"\n1. alice@hs1 creates room {room_id} (room v{VERSION}); bob@hs2 and carol@hs3 join.")
        for api in (topo.bob, topo.carol):
            api.join(room_id, via=[topo.hs1.server_name])
        topo.alice.wait_for(lambda: len(topo.alice.joined_members(room_id)) == 3, timeout=60)
        topo.bob.send_message(room_id, "hi from bob")
        topo.carol.send_message(room_id, "hi from carol")
        ok = topo.alice.wait_for_message(room_id, "hi from bob") and topo.alice.wait_for_message(
            room_id, "hi from carol"
        )
        say(
            f"   benign chat reached hs1: {'yes' if ok else 'NO'}; findings so far: {len(topo.findings(room=room_id))}"
        )

        say("\n2. alice sets m.room.server_acl denying 127.0.0.1 (hs2). bob@hs2 keeps talking.")
        topo.alice.send_state(
            room_id, "m.room.server_acl", "", {"allow": ["*"], "deny": ["127.0.0.1"]}
        )
        topo.bob.wait_for(lambda: topo.bob.get_state(room_id, "m.room.server_acl"))
        topo.bob.send_message(room_id, "bob after the ACL")
        topo.wait_for_findings(lambda r: any(f["rule"] == "acl.origin" for f in r), room=room_id)

        say("\n3. carol's server hs3 relays a message written and signed by hs2 (the leak Synapse")
        say("   accepts on its own), next to an allowed typing notification.")
        event_id, pdu = topo.craft_message(
            room_id, VERSION, topo.hs2, topo.users["bob"], "leaked via hs3"
        )
        typing = {
            "edu_type": "m.typing",
            "content": {"room_id": room_id, "user_id": topo.users["carol"], "typing": True},
        }
        topo.send_transaction(topo.hs3, [pdu], [typing])
        topo.wait_for_findings(lambda r: any(f["event_id"] == event_id for f in r), room=room_id)
        time.sleep(1.5)

        seen = [
            e["content"].get("body")
            for e in topo.alice.messages(room_id)
            if e["type"] == "m.room.message"
        ]
        say("\nWhat alice@hs1 sees in the room:")
        for body in reversed(seen):
            say(f"   · {body}")
        say("\nWhat modgud decided (modgud findings):")
        for f in topo.findings(room=room_id):
            say(
                f"   {f['action']:<8} {f['rule']:<11} blamed: {f['attributed_to'] or '-'}  confidence: {f['confidence']}"
            )
            say(
                f"            event {f['event_id']} from {f['sender'] or '-'} via {f['origin'] or '-'}"
            )
            say(f"            why: {f['detail']}")
        leaked = "leaked via hs3" in seen or "bob after the ACL" in seen
        say(f"\nMetrics were served at http://127.0.0.1:{topo.metrics_port}/metrics, e.g.:")
        for line in topo.metrics_text().splitlines():
            if line.startswith(("modgud_findings_total", "modgud_hook_calls_total")):
                say(f"   {line}")
        say(
            f"\nFindings database: {topo.database} (read it with: modgud findings --db {topo.database})"
        )
    say(f"Everything stopped. Demo took {time.monotonic() - started:.0f} s.")
    if leaked:
        say("UNEXPECTED: a refused event reached hs1's users.")
        return 1
    return 0


def main() -> int:
    keep = Path("run/demo")
    keep.mkdir(parents=True, exist_ok=True)
    workdir = Path(tempfile.mkdtemp(prefix="demo-", dir=keep))
    return run(workdir)


if __name__ == "__main__":
    sys.exit(main())
