"""Helpers for addon tests: a config, a runtime with a static state source, signed flows.

The room-state source here is a static table (a test double): these are unit tests of the
addons' logic. The end-to-end tests in tests/e2e use the real Synapse admin API.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import pytest
from mitmproxy import http
from mitmproxy.proxy.mode_specs import ProxyMode
from mitmproxy.test import tflow
from signedjson.key import generate_signing_key

from proxy_addons.config import load_config
from proxy_addons.runtime import RuntimeHolder, build_runtime
from proxy_addons.statesource import StateError
from rules.acl import ServerAcl
from rules.eventhash import compute_content_hash, encode_unpadded_base64
from rules.roomstate import RoomPolicy
from rules.roomversion import get_room_version
from rules.xmatrix import sign_request
from tests.pg import pg_url, postgres  # noqa: F401 - fixtures: a real PostgreSQL


@pytest.fixture(params=["sqlite", "postgresql"])
def target(request, tmp_path):
    """A database on each engine: an SQLite path, or a fresh PostgreSQL database's URL
    (the store's, the database layer's and the management room's tests run on both)."""
    if request.param == "sqlite":
        return str(tmp_path / "m.db")
    return request.getfixturevalue("pg_url")


LOCAL = "hs.test"
ROOM = "!room:hs.test"
OPEN_ROOM = "!open:hs.test"


@dataclass
class StaticStateSource:
    """Room policies from a table; `fail` makes every fetch fail like a down homeserver."""

    rooms: dict[str, RoomPolicy | None] = field(default_factory=dict)
    fail: bool = False
    fetches: int = 0
    raw: dict[str, list[object]] = field(default_factory=dict)  # state events, policy rooms

    async def fetch(self, room_id: str) -> RoomPolicy | None:
        self.fetches += 1
        if self.fail:
            raise StateError("homeserver down (test)")
        return self.rooms.get(room_id)

    async def fetch_state(self, room_id: str) -> list[object] | None:
        if self.fail:
            raise StateError("homeserver down (test)")
        return self.raw.get(room_id)


def policy(room_id=ROOM, version="10", deny=("denied.test",), allow=("*",)):
    acl = ServerAcl.from_content({"allow": list(allow), "deny": list(deny)})
    return RoomPolicy(room_id, version, get_room_version(version), acl)


@pytest.fixture
def make_runtime(tmp_path):
    made = []

    def make(mode="enforce", on_error="open", verify_signatures=False, source=None, extra=""):
        cfg = tmp_path / f"modgud-{len(made)}.yaml"
        cfg.write_text(
            f"server_name: {LOCAL}\nupstream: http://127.0.0.1:1\nmode: {mode}\n"
            f"on_error: {on_error}\nverify_signatures: {str(verify_signatures).lower()}\n"
            f"database: m{len(made)}.db\nstate: {{timeout_seconds: 0.5, hook_timeout_seconds: 0.2}}\n"
            + extra
        )
        source = source or StaticStateSource(
            {ROOM: policy(), OPEN_ROOM: policy(OPEN_ROOM, deny=())}
        )
        runtime = build_runtime(load_config(cfg), source=source)
        holder = RuntimeHolder()
        holder.runtime = runtime
        made.append(runtime)
        return holder

    yield make
    for runtime in made:
        runtime.store.close()


KEYS = {name: generate_signing_key("1") for name in ("relay.test", "denied.test", "good.test")}


def pdu(sender, room_id=ROOM, body="hi", ts=1, event_type="m.room.message"):
    """An unsigned PDU with a correct content hash (so distinct bodies get distinct IDs)."""
    event = {
        "room_id": room_id,
        "sender": sender,
        "type": event_type,
        "content": {"msgtype": "m.text", "body": body},
        "origin_server_ts": ts,
        "depth": 5,
        "prev_events": ["$prev"],
        "auth_events": ["$create"],
        "signatures": {},
    }
    event["hashes"] = {"sha256": encode_unpadded_base64(compute_content_hash(event))}
    return event


def send_flow(origin, pdus=(), edus=(), txn_id="t1", raw_body=None, destination=LOCAL, key=None):
    """A signed PUT /send flow as `origin` would send it."""
    path = f"/_matrix/federation/v1/send/{txn_id}"
    content = {"origin": origin, "origin_server_ts": 1, "pdus": list(pdus), "edus": list(edus)}
    body = raw_body if raw_body is not None else json.dumps(content).encode()
    signing_key = key or KEYS.get(origin) or generate_signing_key("1")
    auth = sign_request("PUT", path, origin, destination, content, signing_key)
    request = http.Request.make(
        "PUT",
        f"http://{LOCAL}{path}",
        body,
        {"Authorization": auth, "Content-Type": "application/json"},
    )
    return inbound(tflow.tflow(req=request))


def get_flow(origin, path, key=None):
    auth = sign_request("GET", path, origin, LOCAL, None, key or KEYS[origin])
    request = http.Request.make("GET", f"http://{LOCAL}{path}", b"", {"Authorization": auth})
    return inbound(tflow.tflow(req=request))


def inbound(flow):
    """A flow of the inbound listener (mitmproxy's reverse mode), as modgud runs it."""
    flow.client_conn.proxy_mode = ProxyMode.parse("reverse:http://127.0.0.1:8008")
    return flow


async def run_edge(holder, flow):
    """The Enforcer's request hook on one flow, as mitmproxy would call it."""
    from mitmproxy.test import taddons

    from proxy_addons.enforcer import Enforcer

    enforcer = Enforcer(holder)
    with taddons.context(enforcer):
        await enforcer.request(flow)
    return flow


def recorded_findings(holder):
    """Everything the runtime recorded so far, once the writer has committed it."""
    from proxy_addons.store import query_findings

    assert holder.runtime.store.flush(5)
    return list(query_findings([holder.runtime.config.database]))
