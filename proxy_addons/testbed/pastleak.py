"""A room leaked to before modgud was in the path, for the history audit's tests and the
demo: on hs2 of a topology — a Synapse modgud is not in front of, with no module or hook
— joined directly by the scripted peer's servers. The denied server speaks before the
room's ACL (allowed then), the ACL comes, then the leaky server relays the denied
server's message straight to hs2 (which accepts it: the gap) and builds on it."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

from proxy_addons.testbed.homeserver import ClientApi
from proxy_addons.testbed.peer import PeerServer
from proxy_addons.testbed.topology import Topology

__all__ = ["UnguardedRoom", "leak_before_modgud"]


class UnguardedRoom:
    """A room on hs2 (no modgud) with an admin of hs2, joined by the peer's servers
    directly, and a modgud.yaml that audits hs2."""

    def __init__(self, topo: Topology, workdir: Path) -> None:
        self.topo = topo
        self.hs2 = topo.hs2
        name = f"admin{int(time.time() * 1000) % 10**8}"
        self.admin_id, token = self.hs2.register_user(name, admin=True)
        self.admin = ClientApi(self.hs2.base_url, token)
        self.room_id = self.admin.create_room(room_version="10", name="leaked before modgud")
        self.policy_room = self.admin.create_room(preset="private_chat", name="hs2's bans")
        workdir.mkdir(parents=True, exist_ok=True)
        (workdir / "admin.token").write_text(token)
        # The story's events (leak_before_modgud sets them).
        self.before = self.leaked = self.built = self.after = ""
        self.config = workdir / "modgud.yaml"
        self.config.write_text(
            f"server_name: '{self.hs2.server_name}'\n"
            f"upstream: http://127.0.0.1:{self.hs2.http_port}\n"
            f"homeserver: {{admin_api: '{self.hs2.base_url}', access_token_file: admin.token,"
            " room_admin_token_file: admin.token}\n"
            f"database: {workdir / 'history.db'}\n"
            f"policy: {{policy_lists: ['{self.policy_room}']}}\n"
        )

    def join(self, server: PeerServer, localpart: str, room_id: str | None = None) -> str:
        user = server.user(localpart)
        self.topo.peer.join(
            server, user, room_id or self.room_id, self.hs2.server_name, self.hs2.server_name
        )
        return user

    def send(
        self,
        deliverer: PeerServer,
        author: PeerServer,
        user: str,
        body: str,
        prev_events: list[str] | None = None,
        room_id: str | None = None,
    ) -> str:
        """`author`'s event, delivered by `deliverer` straight to hs2."""
        room_id = room_id or self.room_id
        event_id, pdu = self.topo.peer.build_event(
            room_id,
            author,
            user,
            "m.room.message",
            {"msgtype": "m.text", "body": body},
            prev_events=prev_events,
        )
        answer = self.topo.peer.send(deliverer, self.hs2.server_name, self.hs2.server_name, [pdu])
        assert answer.status == 200, answer.body
        assert self.admin.wait_for_message(room_id, body), f"hs2 did not take {body!r}"
        return event_id

    def history(self, *args: str) -> subprocess.CompletedProcess[str]:
        """`modgud history ARGS` with this room's config (hs2, not the topology's hs1)."""
        modgud = Path(sys.executable).with_name("modgud")
        return subprocess.run(
            [str(modgud), "history", *args, "--config", str(self.config)],
            capture_output=True,
            text=True,
            timeout=120,
            stdin=subprocess.DEVNULL,
        )


def leak_before_modgud(topo: Topology, workdir: Path) -> UnguardedRoom:
    """The story above; the room's events as attributes: before, leaked, built, after."""
    room = UnguardedRoom(topo, workdir)
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
