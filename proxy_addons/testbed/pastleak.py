"""A room leaked to before modgud was in the path, for the history audit's tests and the
demo: on hs2 of a topology — a Synapse modgud is not in front of, with no module or hook
— joined directly by the scripted peer's servers. The denied server speaks before the
room's ACL (allowed then), the ACL comes, then the leaky server relays the denied
server's message straight to hs2 (which accepts it: the gap) and builds on it."""

from __future__ import annotations

import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import quote

from proxy_addons.testbed.homeserver import ClientApi
from proxy_addons.testbed.peer import FederationPeer, PeerServer
from proxy_addons.testbed.topology import Topology

__all__ = ["LongHistory", "UnguardedRoom", "leak_before_modgud", "relay_history"]


def wait_persisted(base_url: str, token: str, event_id: str, timeout: float = 120) -> None:
    """Until the homeserver has stored the event (admin API: fetch_event)."""
    url = f"{base_url}/_synapse/admin/v1/fetch_event/{quote(event_id, safe='')}"
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"})
    deadline = time.monotonic() + timeout
    while True:
        try:
            urllib.request.urlopen(request, timeout=10).close()
            return
        except urllib.error.HTTPError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


@dataclass
class LongHistory:
    """What `relay_history` sent: the leaked events and the events built on them."""

    leaked: set[str] = field(default_factory=set)
    built: set[str] = field(default_factory=set)
    last: str = ""
    sent: int = 0


def relay_history(
    peer: FederationPeer,
    admin: ClientApi,
    destination: tuple[str, str],
    room_id: str,
    relay: tuple[PeerServer, str],
    denied: tuple[PeerServer, str],
    events: int,
    *,
    batch: int = 50,
) -> LongHistory:
    """A long room history, as a relay leaks it: `events` messages the relay sends
    straight to the homeserver (`destination`: its server name and address) in
    transactions of `batch`, each built on the one before.
    Halfway, the room's admin sets an ACL denying `denied`'s server; from there on the
    first event of each transaction is the denied server's, relayed (a leak), and the next
    is built on it. Paced as a real server is: each transaction's last event stored before
    the next is sent (Synapse answers /send once the PDUs are staged and prunes a room's
    staging area beyond 100 events: a flood loses events)."""
    out = LongHistory()
    half = events // 2
    prevs: list[str] | None = None
    for n in range(0, events, batch):
        if n == half:
            acl = {"allow": ["*"], "deny": [denied[0].name], "allow_ip_literals": True}
            acl_id = admin.send_state(room_id, "m.room.server_acl", "", acl)
            deadline = time.monotonic() + 30
            while acl_id not in peer.rooms[room_id].events:  # the homeserver sends it out
                assert time.monotonic() < deadline, "the ACL did not reach the peer"
                time.sleep(0.05)
            prevs = [out.last, acl_id]  # the relay's next event acknowledges the ACL
        pdus = []
        for k in range(min(batch, events - n)):
            leak = n >= half and k == 0
            server, user = denied if leak else relay
            event_id, pdu = peer.build_event(
                room_id,
                server,
                user,
                "m.room.message",
                {"msgtype": "m.text", "body": f"{n + k}"},
                prev_events=prevs,
            )
            (out.leaked if leak else out.built if out.last in out.leaked else set()).add(event_id)
            pdus.append(pdu)
            out.last, prevs = event_id, [event_id]
        answer = peer.send(relay[0], *destination, pdus)
        assert answer.status == 200, answer.body
        refused = {k: v for k, v in answer.body.get("pdus", {}).items() if v}
        assert not refused, f"the homeserver refused {len(refused)} at {n}: {refused}"
        wait_persisted(admin.base_url, admin.token, out.last)
        out.sent += len(pdus)
    return out


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
        self.workdir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        (workdir / "admin.token").write_text(token)
        # The story's events (leak_before_modgud sets them).
        self.before = self.leaked = self.built = self.after = ""
        self.config = self.write_config("modgud")

    def write_config(
        self, name: str, *, admin_api: str | None = None, spaces: tuple[str, ...] = ()
    ) -> Path:
        """A modgud.yaml auditing hs2 (`name`.yaml, with its own database `name`.db),
        following the bans room and `spaces`; `admin_api` in place of hs2's."""
        path = self.workdir / f"{name}.yaml"
        listed = ", ".join(f"'{s}'" for s in spaces)
        path.write_text(
            f"server_name: '{self.hs2.server_name}'\n"
            f"upstream: http://127.0.0.1:{self.hs2.http_port}\n"
            f"homeserver: {{admin_api: '{admin_api or self.hs2.base_url}',"
            " access_token_file: admin.token, room_admin_token_file: admin.token}\n"
            f"database: {self.workdir / f'{name}.db'}\n"
            f"policy: {{policy_lists: ['{self.policy_room}'], spaces: [{listed}]}}\n"
        )
        return path

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

    def history(self, *args: str, config: Path | None = None) -> subprocess.CompletedProcess[str]:
        """`modgud history ARGS` with this room's config (hs2, not the topology's hs1)."""
        modgud = Path(sys.executable).with_name("modgud")
        return subprocess.run(
            [str(modgud), "history", *args, "--config", str(config or self.config)],
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
