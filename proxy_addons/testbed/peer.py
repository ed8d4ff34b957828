"""A scriptable federation peer: remote homeservers that misbehave on request.

One `FederationPeer` plays several servers. Each `PeerServer` has its own ed25519 key.
Reachable servers are named by a loopback IP literal (`127.0.0.2:PORT`, …) where the peer
listens with TLS, so a homeserver can send to them and pull from them; unreachable ones get
names that do not resolve (`denied.test`) and their keys reach the homeserver through the
peer's notary (`/_matrix/key/v2/query`, listed in the homeserver's `trusted_key_servers`).

Events are built, hashed and signed with modgud's own rules/ core, for room versions 1 to
12. The peer keeps its own view of each room (events, DAG, state) from what it joined,
received and built, and answers the homeserver's /send, /get_missing_events, /backfill,
/event, /state_ids, /state and /event_auth from it.

Used by the end-to-end tests and the demo (Complement's federation server is the model);
`modgud run` never loads it. Everything the tests call is synchronous; the HTTP server runs
on its own event loop in a thread.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import ssl
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote

from aiohttp import web
from signedjson.key import encode_verify_key_base64, generate_signing_key, get_verify_key
from signedjson.sign import sign_json

from rules.eventhash import (
    compute_event_id,
    compute_reference_hash,
    compute_room_id_v12,
    encode_unpadded_base64,
)
from rules.roomversion import EventFormat, RoomVersion, get_room_version
from rules.signatures import sign_event
from rules.xmatrix import sign_request

__all__ = ["FederationPeer", "FederationResponse", "PeerRoom", "PeerServer"]

ALL_VERSIONS = [str(v) for v in range(1, 13)]


@dataclass
class PeerServer:
    """One server the peer plays."""

    name: str
    signing_key: Any
    reachable: bool

    @property
    def key_id(self) -> str:
        return f"ed25519:{self.signing_key.version}"

    def user(self, localpart: str) -> str:
        return f"@{localpart}:{self.name}"

    def key_response(self, notary: PeerServer | None = None) -> dict[str, Any]:
        """/_matrix/key/v2/server for this server, self-signed (and notary-signed)."""
        body: dict[str, Any] = {
            "server_name": self.name,
            "valid_until_ts": int(time.time() * 1000) + 24 * 3600 * 1000,
            "verify_keys": {
                self.key_id: {"key": encode_verify_key_base64(get_verify_key(self.signing_key))}
            },
            "old_verify_keys": {},
        }
        body = sign_json(body, self.name, self.signing_key)
        if notary is not None and notary is not self:
            body = sign_json(body, notary.name, notary.signing_key)
        return body


@dataclass
class PeerRoom:
    """The peer's view of one room: every event it knows, the DAG tips, the state."""

    room_id: str
    version: RoomVersion
    events: dict[str, dict[str, Any]] = field(default_factory=dict)
    state_before: dict[str, dict[tuple[str, str], str]] = field(default_factory=dict)
    state: dict[tuple[str, str], str] = field(default_factory=dict)
    extremities: list[str] = field(default_factory=list)

    def add(self, event_id: str, event: dict[str, Any], *, is_state_snapshot: bool = False) -> None:
        """Record an event; `is_state_snapshot` (send_join's state/auth chain) updates the
        state without touching the DAG tips."""
        if event_id in self.events:
            return
        self.events[event_id] = event
        prevs = self.prev_ids(event)
        before = dict(self.state_after(prevs[0])) if prevs else {}
        self.state_before[event_id] = before
        state_key = event.get("state_key")
        if isinstance(state_key, str):
            key = (str(event.get("type")), state_key)
            current = self.state.get(key)
            if current is None or self.depth(event_id) >= self.depth(current):
                self.state[key] = event_id
        if is_state_snapshot:
            return
        self.extremities = [e for e in self.extremities if e not in prevs] + [event_id]

    def state_after(self, event_id: str) -> dict[tuple[str, str], str]:
        before = self.state_before.get(event_id)
        if before is None:
            return dict(self.state)
        after = dict(before)
        event = self.events[event_id]
        if isinstance(event.get("state_key"), str):
            after[(str(event["type"]), event["state_key"])] = event_id
        return after

    def prev_ids(self, event: Mapping[str, Any]) -> list[str]:
        return _ids(event.get("prev_events"))

    def depth(self, event_id: str) -> int:
        depth = self.events.get(event_id, {}).get("depth", 0)
        return depth if isinstance(depth, int) else 0

    def auth_chain(self, event_ids: Iterable[str]) -> list[dict[str, Any]]:
        seen: dict[str, dict[str, Any]] = {}
        todo = list(event_ids)
        while todo:
            for auth_id in _ids(self.events.get(todo.pop(), {}).get("auth_events")):
                if auth_id not in seen and auth_id in self.events:
                    seen[auth_id] = self.events[auth_id]
                    todo.append(auth_id)
        return list(seen.values())

    def walk_back(self, start: Iterable[str], stop: set[str], limit: int) -> list[dict[str, Any]]:
        """Events reachable backwards from `start` (excluded) down to `stop` (excluded)."""
        out: dict[str, dict[str, Any]] = {}
        todo = [p for s in start for p in self.prev_ids(self.events.get(s, {}))]
        while todo and len(out) < limit:
            event_id = todo.pop(0)
            if event_id in stop or event_id in out or event_id not in self.events:
                continue
            out[event_id] = self.events[event_id]
            todo.extend(self.prev_ids(out[event_id]))
        return sorted(out.values(), key=lambda e: e.get("depth", 0))


def _ids(refs: object) -> list[str]:
    """prev_events/auth_events as IDs, in either event format."""
    if not isinstance(refs, list):
        return []
    out = []
    for ref in refs:
        if isinstance(ref, str):
            out.append(ref)
        elif isinstance(ref, list) and ref and isinstance(ref[0], str):
            out.append(ref[0])
    return out


@dataclass
class FederationResponse:
    status: int
    body: Any
    txn_id: str | None = None


class FederationPeer:
    """Remote homeservers on loopback, scripted by tests. Start before the homeservers it
    talks to: their config names its notary (`trusted_key_server`)."""

    def __init__(self, workdir: Path, port: int) -> None:
        from proxy_addons.testbed.homeserver import self_signed_certificate

        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.port = port
        self.servers: dict[str, PeerServer] = {}
        self.rooms: dict[str, PeerRoom] = {}
        self.received: list[tuple[str, dict[str, Any]]] = []  # (destination, /send body)
        self.requests: list[tuple[str, str, str]] = []  # (server, method, path) served
        # Every /send as signed: (server, method, path with query, Authorization headers,
        # body), so a test can check the X-Matrix signature that arrived.
        self.signed_sends: list[tuple[str, str, str, list[str], Any]] = []
        # Seconds a server takes to answer /send: the homeserver queues what it has to
        # send meanwhile and sends it as one transaction.
        self.send_delay: dict[str, float] = {}
        # A misbehaving responder can be told to add events to what it serves.
        self.poison: dict[str, list[dict[str, Any]]] = {}
        self._cert, self._key = self_signed_certificate(self.workdir)
        self._next_address = 2
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._runner: web.AppRunner | None = None
        self._lock = threading.RLock()
        self.notary = self.add_server()

    # -- servers --------------------------------------------------------------------

    def add_server(self, name: str | None = None) -> PeerServer:
        """A reachable server named `127.0.0.N:PORT`, or an unreachable one named `name`.
        Call before `start()` for reachable servers (their addresses are bound then)."""
        reachable = name is None
        if name is None:
            name = f"127.0.0.{self._next_address}:{self.port}"
            self._next_address += 1
        key = generate_signing_key(secrets.token_hex(3))  # new key, new key ID
        server = PeerServer(name, key, reachable)
        self.servers[name] = server
        return server

    @property
    def trusted_key_server(self) -> dict[str, Any]:
        """The `trusted_key_servers` entry a homeserver needs for the peer's notary."""
        key = encode_verify_key_base64(get_verify_key(self.notary.signing_key))
        return {"server_name": self.notary.name, "verify_keys": {self.notary.key_id: key}}

    # -- lifecycle ------------------------------------------------------------------

    def start(self) -> FederationPeer:
        ready = threading.Event()
        errors: list[BaseException] = []

        def run() -> None:
            loop = asyncio.new_event_loop()
            self._loop = loop
            try:
                loop.run_until_complete(self._serve())
            except BaseException as e:  # noqa: BLE001 - reported to start()
                errors.append(e)
                ready.set()
                return
            ready.set()
            loop.run_forever()
            loop.run_until_complete(self._runner.cleanup() if self._runner else asyncio.sleep(0))
            loop.close()

        self._thread = threading.Thread(target=run, name="federation-peer", daemon=True)
        self._thread.start()
        ready.wait(30)
        if errors:
            raise errors[0]
        return self

    async def _serve(self) -> None:
        app = web.Application(client_max_size=4 * 1024 * 1024)
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(self._cert, self._key)
        for server in self.servers.values():
            if server.reachable:
                host = server.name.rsplit(":", 1)[0]
                await web.TCPSite(self._runner, host, self.port, ssl_context=context).start()

    def stop(self) -> None:
        if self._loop is not None and self._loop.is_running():
            self._loop.call_soon_threadsafe(self._loop.stop)
        if self._thread is not None:
            self._thread.join(10)

    def __enter__(self) -> FederationPeer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- serving the homeserver's requests ----------------------------------------------

    async def _handle(self, request: web.Request) -> web.Response:
        host = request.headers.get("Host", "")
        server = self.servers.get(host) or self.notary
        path = request.path
        with self._lock:
            self.requests.append((server.name, request.method, path))
        body: Any = None
        if request.can_read_body:
            try:
                body = json.loads(await request.read() or b"null")
            except ValueError:
                return _json(400, {"errcode": "M_NOT_JSON", "error": "not JSON"})
        if request.method == "PUT" and path.startswith("/_matrix/federation/v1/send/"):
            auth = request.headers.getall("Authorization", [])
            with self._lock:
                self.signed_sends.append(
                    (server.name, request.method, request.raw_path, auth, body)
                )
            await asyncio.sleep(self.send_delay.get(server.name, 0))
        try:
            with self._lock:
                status, answer = self._answer(server, request.method, path, request.query, body)
        except Exception as e:  # noqa: BLE001 - a test server answers 500, never dies
            status, answer = 500, {"errcode": "M_UNKNOWN", "error": repr(e)[:300]}
        return _json(status, answer)

    def _answer(
        self,
        server: PeerServer,
        method: str,
        path: str,
        query: Mapping[str, str],
        body: Any,
    ) -> tuple[int, Any]:
        parts = [p for p in path.split("/") if p]
        if path == "/_matrix/key/v2/server" or path.startswith("/_matrix/key/v2/server/"):
            return 200, server.key_response()
        if path.startswith("/_matrix/key/v2/query"):
            return 200, self._notary_answer(parts, body)
        if parts[:2] != ["_matrix", "federation"] or len(parts) < 4:
            return 404, _unrecognized()
        name, args = parts[3], [_unquote(p) for p in parts[4:]]
        now = int(time.time() * 1000)
        if name == "version":
            return 200, {"server": {"name": "modgud-testbed-peer", "version": "1"}}
        if name == "send" and method == "PUT":
            return 200, self._receive(server, body)
        if name == "user" and args[:1] == ["devices"]:
            return 200, {"user_id": args[1] if len(args) > 1 else "", "stream_id": 0, "devices": []}
        if name == "user" and args[:2] == ["keys", "query"]:
            return 200, {"device_keys": {}}
        if name == "user" and args[:2] == ["keys", "claim"]:
            return 200, {"one_time_keys": {}}
        if name == "query" and args[:1] == ["profile"]:
            return 200, {}
        if name == "event" and args:
            found = self._find_event(args[0])
            if found is None:
                return 404, {"errcode": "M_NOT_FOUND", "error": "unknown event"}
            return 200, {"origin": server.name, "origin_server_ts": now, "pdus": [found]}
        room = self.rooms.get(args[0]) if args else None
        if room is None:
            return 404, {"errcode": "M_NOT_FOUND", "error": "unknown room"}
        if name == "make_join" and len(args) > 1:
            versions = query.getall("ver") if hasattr(query, "getall") else []
            if room.version.identifier not in versions:
                return 400, {"errcode": "M_INCOMPATIBLE_ROOM_VERSION", "error": "version"}
            return 200, {
                "room_version": room.version.identifier,
                "event": self._template(room, server, args[1]),
            }
        if name == "send_join" and len(args) > 1 and isinstance(body, dict):
            return 200, self._accept_join(room, server, body, v1=parts[2] == "v1")
        if name == "get_missing_events":
            body = body if isinstance(body, dict) else {}
            latest = _ids(body.get("latest_events"))
            earliest = set(_ids(body.get("earliest_events")))
            limit = body.get("limit", 10) if isinstance(body.get("limit"), int) else 10
            events = room.walk_back(latest, earliest, limit)
            return 200, {"events": events + self.poison.get(room.room_id, [])}
        if name == "backfill":
            start = query.getall("v") if hasattr(query, "getall") else [query.get("v", "")]
            limit = int(query.get("limit", "10") or 10)
            events = [room.events[s] for s in start if s in room.events]
            events += room.walk_back(start, set(), limit)
            pdus = sorted(events, key=lambda e: -int(e.get("depth", 0)))[:limit]
            pdus += self.poison.get(room.room_id, [])
            return 200, {"origin": server.name, "origin_server_ts": now, "pdus": pdus}
        if name in ("state_ids", "state"):
            at = query.get("event_id", "")
            state_ids = list(room.state_before.get(at, room.state).values())
            auth = room.auth_chain(state_ids)
            if name == "state_ids":
                return 200, {
                    "pdu_ids": state_ids,
                    "auth_chain_ids": [self.event_id_of(room, e) for e in auth],
                }
            return 200, {"pdus": [room.events[i] for i in state_ids], "auth_chain": auth}
        if name == "event_auth" and len(args) > 1:
            return 200, {"auth_chain": room.auth_chain([args[1]])}
        return 404, _unrecognized()

    def _template(self, room: PeerRoom, server: PeerServer, user_id: str) -> dict[str, Any]:
        """make_join's answer: an unsigned join for `user_id` on the room's tips."""
        content = {"membership": "join"}
        auths = self._auth_events(room, user_id, "m.room.member", user_id, content)
        template: dict[str, Any] = {
            "room_id": room.room_id,
            "sender": user_id,
            "type": "m.room.member",
            "state_key": user_id,
            "content": content,
            "origin_server_ts": int(time.time() * 1000),
            "depth": max((room.depth(p) for p in room.extremities), default=0) + 1,
            "prev_events": self._refs(room, list(room.extremities[-10:])),
            "auth_events": self._refs(room, auths),
        }
        if room.version.event_format is EventFormat.V1:
            template["origin"] = server.name
        return template

    def _accept_join(
        self, room: PeerRoom, server: PeerServer, event: dict[str, Any], *, v1: bool
    ) -> Any:
        """send_join: the room's state before the join, its auth chain, the join itself."""
        state = [room.events[i] for i in room.state.values()]
        event_id = self.event_id_of(room, event)
        room.add(event_id, event)
        answer = {
            "origin": server.name,
            "state": state,
            "auth_chain": room.auth_chain([self.event_id_of(room, e) for e in state] + [event_id]),
            "event": event,
            "members_omitted": False,
            "servers_in_room": sorted(
                {
                    str(e["state_key"]).split(":", 1)[1]
                    for e in state
                    if e.get("type") == "m.room.member"
                }
            ),
        }
        return [200, answer] if v1 else answer

    def create_room(self, server: PeerServer, creator: str, version_id: str = "10") -> str:
        """A room the peer hosts (so the homeserver joins it through the peer and later
        backfills from it): create, the creator's join, power levels, public join rules,
        shared history."""
        version = get_room_version(version_id)
        if version is None:
            raise PeerError(f"room version {version_id} unknown to rules/")
        create: dict[str, Any] = {
            "sender": creator,
            "type": "m.room.create",
            "state_key": "",
            "content": {"room_version": version_id},
            "origin_server_ts": int(time.time() * 1000),
            "depth": 1,
            "prev_events": [],
            "auth_events": [],
        }
        if not version.implicit_room_creator:
            create["content"]["creator"] = creator
        if version.room_ids_as_hashes:
            room_id = compute_room_id_v12(create)
        else:
            room_id = f"!{secrets.token_urlsafe(12)}:{server.name}"
            create["room_id"] = room_id
        if version.event_format is EventFormat.V1:
            create["event_id"] = f"${secrets.token_urlsafe(12)}:{server.name}"
            create["origin"] = server.name
        with self._lock:
            room = self.rooms[room_id] = PeerRoom(room_id, version)
            signed = sign_event(create, version, server.name, server.signing_key)
            room.add(self.event_id_of(room, signed), signed)
            self.build_event(
                room_id, server, creator, "m.room.member", {"membership": "join"}, state_key=creator
            )
            levels = {
                "users": {creator: 100},
                "users_default": 0,
                "events_default": 0,
                "state_default": 50,
                "ban": 50,
                "kick": 50,
                "redact": 50,
                "invite": 0,
                "events": {},
            }
            self.build_event(room_id, server, creator, "m.room.power_levels", levels, state_key="")
            self.build_event(
                room_id, server, creator, "m.room.join_rules", {"join_rule": "public"}, state_key=""
            )
            self.build_event(
                room_id,
                server,
                creator,
                "m.room.history_visibility",
                {"history_visibility": "shared"},
                state_key="",
            )
        return room_id

    def _notary_answer(self, parts: list[str], body: Any) -> dict[str, Any]:
        if len(parts) > 4:
            wanted = [_unquote(parts[4])]
        elif isinstance(body, dict) and isinstance(body.get("server_keys"), dict):
            wanted = list(body["server_keys"])
        else:
            wanted = []
        keys = [
            self.servers[name].key_response(self.notary) for name in wanted if name in self.servers
        ]
        return {"server_keys": keys}

    def _receive(self, server: PeerServer, body: Any) -> dict[str, Any]:
        """The homeserver's /send to one of our servers: learn its PDUs."""
        body = body if isinstance(body, dict) else {}
        self.received.append((server.name, body))
        results: dict[str, Any] = {}
        for pdu in body.get("pdus", []):
            if not isinstance(pdu, dict):
                continue
            room = self.rooms.get(str(pdu.get("room_id")))
            if room is None:
                continue
            event_id = self.event_id_of(room, pdu)
            room.add(event_id, pdu)
            results[event_id] = {}
        return {"pdus": results}

    def _find_event(self, event_id: str) -> dict[str, Any] | None:
        for room in self.rooms.values():
            if event_id in room.events:
                return room.events[event_id]
            for poisoned in self.poison.get(room.room_id, []):
                if self.event_id_of(room, poisoned) == event_id:
                    return poisoned
        return None

    @staticmethod
    def event_id_of(room: PeerRoom, event: Mapping[str, Any]) -> str:
        event_id = compute_event_id(event, room.version)
        if event_id is None:
            raise ValueError("event without a computable ID")
        return event_id

    # -- building events ------------------------------------------------------------------

    def build_event(
        self,
        room_id: str,
        server: PeerServer,
        sender: str,
        event_type: str,
        content: dict[str, Any],
        *,
        state_key: str | None = None,
        prev_events: list[str] | None = None,
        auth_events: list[str] | None = None,
        signers: Iterable[PeerServer] = (),
        signature: str = "valid",
        record: bool = True,
    ) -> tuple[str, dict[str, Any]]:
        """A hashed and signed PDU by `sender`, built on the room's current tips.

        `signature`: "valid", "drop" (no signatures), "forge" (signed by another key under
        `server`'s key ID), "wrong_server" (signed only by the first of `signers`).
        `record=False` leaves it out of the peer's view (it is then never served).
        """
        room = self.rooms[room_id]
        with self._lock:
            prevs = prev_events if prev_events is not None else list(room.extremities[-10:])
            auths = (
                auth_events
                if auth_events is not None
                else self._auth_events(room, sender, event_type, state_key, content)
            )
            depth = max((room.depth(p) for p in prevs), default=0) + 1
            event: dict[str, Any] = {
                "room_id": room_id,
                "sender": sender,
                "type": event_type,
                "content": content,
                "origin_server_ts": int(time.time() * 1000),
                "depth": depth,
                "prev_events": self._refs(room, prevs),
                "auth_events": self._refs(room, auths),
            }
            if state_key is not None:
                event["state_key"] = state_key
            if room.version.event_format is EventFormat.V1:
                event["event_id"] = f"${secrets.token_urlsafe(12)}:{server.name}"
                event["origin"] = server.name
            signed = self._sign(event, room.version, server, signers, signature)
            event_id = self.event_id_of(room, signed)
            if record:
                room.add(event_id, signed)
            return event_id, signed

    def _sign(
        self,
        event: dict[str, Any],
        version: RoomVersion,
        server: PeerServer,
        signers: Iterable[PeerServer],
        signature: str,
    ) -> dict[str, Any]:
        others = list(signers)
        if signature == "wrong_server" and others:
            return sign_event(event, version, others[0].name, others[0].signing_key)
        signed: dict[str, Any] = sign_event(event, version, server.name, server.signing_key)
        if signature == "drop":
            signed["signatures"] = {}
        elif signature == "forge":
            impostor = generate_signing_key(server.signing_key.version)
            signed = sign_event(event, version, server.name, impostor)
        for other in others:
            extra: dict[str, Any] = sign_event(event, version, other.name, other.signing_key)
            signed["signatures"] = {**signed["signatures"], **extra["signatures"]}
        return signed

    @staticmethod
    def _refs(room: PeerRoom, event_ids: list[str]) -> list[Any]:
        if room.version.event_format is not EventFormat.V1:
            return list(event_ids)
        refs: list[Any] = []
        for event_id in event_ids:
            event = room.events.get(event_id)
            digest = compute_reference_hash(event, room.version) if event else b"\0" * 32
            refs.append([event_id, {"sha256": encode_unpadded_base64(digest)}])
        return refs

    @staticmethod
    def _auth_events(
        room: PeerRoom,
        sender: str,
        event_type: str,
        state_key: str | None,
        content: Mapping[str, Any],
    ) -> list[str]:
        """Spec: Server-Server API, "Auth events selection"."""
        keys = [("m.room.power_levels", ""), ("m.room.member", sender)]
        if not room.version.room_ids_as_hashes:
            keys.insert(0, ("m.room.create", ""))
        if event_type == "m.room.member" and state_key is not None:
            keys.append(("m.room.member", state_key))
            if content.get("membership") in ("join", "invite", "knock"):
                keys.append(("m.room.join_rules", ""))
            via = content.get("join_authorised_via_users_server")
            if isinstance(via, str):
                keys.append(("m.room.member", via))
        out: list[str] = []
        for key in keys:
            event_id = room.state.get(key)
            if event_id is not None and event_id not in out:
                out.append(event_id)
        return out

    # -- talking to the homeserver -------------------------------------------------------

    def request(
        self,
        server: PeerServer,
        destination: str,
        method: str,
        path: str,
        content: Any = None,
        *,
        raw_body: bytes | None = None,
        address: str,
    ) -> FederationResponse:
        """A signed federation request from `server` to `destination` at `address`
        (`host:port` of the homeserver's federation port, i.e. modgud's listener)."""
        auth = sign_request(method, path, server.name, destination, content, server.signing_key)
        data = (
            raw_body
            if raw_body is not None
            else (json.dumps(content).encode() if content is not None else None)
        )
        request = urllib.request.Request(
            f"https://{address}{path}",
            data=data,
            method=method,
            headers={
                "Authorization": auth,
                "Content-Type": "application/json",
                "Host": destination,
            },
        )
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE  # self-signed certificates on loopback
        try:
            with urllib.request.urlopen(request, timeout=60, context=context) as resp:
                raw = resp.read()
                status = resp.status
        except urllib.error.HTTPError as e:
            raw, status = e.read(), e.code
        try:
            return FederationResponse(status, json.loads(raw) if raw else None)
        except ValueError:
            return FederationResponse(status, raw.decode(errors="replace"))

    def send(
        self,
        server: PeerServer,
        destination: str,
        address: str,
        pdus: list[dict[str, Any]] = (),  # type: ignore[assignment]
        edus: list[dict[str, Any]] = (),  # type: ignore[assignment]
        *,
        raw_body: bytes | None = None,
        txn_id: str | None = None,
    ) -> FederationResponse:
        """PUT /send as `server`. `raw_body` replaces the JSON body; it is signed as it
        is (without content when it is not JSON, as X-Matrix does). `txn_id`: to resend
        a transaction as a real server retries it (new by default)."""
        content: Any = {
            "origin": server.name,
            "origin_server_ts": int(time.time() * 1000),
            "pdus": list(pdus),
            "edus": list(edus),
        }
        if raw_body is not None:
            try:
                content = json.loads(raw_body)
            except ValueError:
                content = None
        txn_id = txn_id or secrets.token_hex(8)
        path = f"/_matrix/federation/v1/send/{txn_id}"
        answer = self.request(
            server, destination, "PUT", path, content, raw_body=raw_body, address=address
        )
        answer.txn_id = txn_id
        return answer

    def join(
        self,
        server: PeerServer,
        user_id: str,
        room_id: str,
        destination: str,
        address: str,
        *,
        membership: str = "join",
        content: dict[str, Any] | None = None,
    ) -> tuple[str, dict[str, Any]]:
        """make_join/send_join (or make_knock/send_knock, make_leave/send_leave) through
        the homeserver at `address`; the peer learns the room's state from the answer."""
        make, send = {
            "join": ("make_join", "send_join"),
            "knock": ("make_knock", "send_knock"),
            "leave": ("make_leave", "send_leave"),
        }[membership]
        versions = "&".join(f"ver={v}" for v in ALL_VERSIONS)
        query = f"?{versions}" if membership != "leave" else ""
        made = self.request(
            server,
            destination,
            "GET",
            f"/_matrix/federation/v1/{make}/{quote(room_id, safe='')}/{quote(user_id, safe='')}{query}",
            address=address,
        )
        if made.status != 200:
            raise PeerError(f"{make} for {user_id}: HTTP {made.status}: {made.body}")
        template = dict(made.body["event"])
        version_id = str(made.body.get("room_version", "1"))
        version = get_room_version(version_id)
        if version is None:
            raise PeerError(f"room version {version_id} unknown to rules/")
        if room_id not in self.rooms:
            self.rooms[room_id] = PeerRoom(room_id, version)
        room = self.rooms[room_id]
        template["origin_server_ts"] = int(time.time() * 1000)
        if content:
            template["content"] = {**template.get("content", {}), **content}
        if version.event_format is EventFormat.V1:
            template["event_id"] = f"${secrets.token_urlsafe(12)}:{server.name}"
        template.pop("signatures", None)
        template.pop("hashes", None)
        signed = sign_event(template, version, server.name, server.signing_key)
        event_id = self.event_id_of(room, signed)
        api = "v2" if membership != "knock" else "v1"
        sent = self.request(
            server,
            destination,
            "PUT",
            f"/_matrix/federation/{api}/{send}/{quote(room_id, safe='')}/{quote(event_id, safe='')}",
            signed,
            address=address,
        )
        if sent.status != 200:
            raise PeerError(f"{send} for {user_id}: HTTP {sent.status}: {sent.body}")
        with self._lock:
            answer = sent.body if isinstance(sent.body, dict) else {}
            snapshot = list(answer.get("auth_chain", [])) + list(answer.get("state", []))
            # (a knock's answer holds stripped state only: nothing a PDU view can use)
            for event in sorted(snapshot, key=lambda e: e.get("depth", 0)):
                if isinstance(event, dict):
                    room.add(self.event_id_of(room, event), event, is_state_snapshot=True)
            final: dict[str, Any] = (
                answer["event"] if isinstance(answer.get("event"), dict) else signed
            )
            for prev in room.prev_ids(final):
                if prev in room.events and prev not in room.extremities:
                    room.extremities.append(prev)
            room.add(event_id, final)
        return event_id, final


class PeerError(Exception):
    pass


def _json(status: int, body: Any) -> web.Response:
    return web.Response(
        status=status, body=json.dumps(body).encode(), content_type="application/json"
    )


def _unrecognized() -> dict[str, str]:
    return {"errcode": "M_UNRECOGNIZED", "error": "not served by the test peer"}


def _unquote(text: str) -> str:
    from urllib.parse import unquote

    return unquote(text)
