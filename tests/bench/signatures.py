"""Signature verification cost per PDU, in one process ([performance] target 3):
`python -m tests.bench.signatures` (part of `make bench`).

modgud: the edge's whole decision on 50-PDU /send transactions of signed PDUs (request
signature, parse, checks, every PDU's signatures), divided by 50. Raw: per PDU, what any
verifier must do at least — parse the PDU's JSON, compute its content hash and its
reference hash, verify one ed25519 signature — with the same libraries, in the same run.
Then the same transactions again, as a relaying server would repeat them: the verification
cache answers.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

from mitmproxy import http
from mitmproxy.proxy.mode_specs import ProxyMode
from mitmproxy.test import tflow
from signedjson.key import generate_signing_key, get_verify_key
from unpaddedbase64 import decode_base64

from proxy_addons.config import load_config
from proxy_addons.enforcer import Enforcer
from proxy_addons.flowinfo import forget_flow_state
from proxy_addons.runtime import RuntimeHolder, build_runtime
from rules.acl import ServerAcl
from rules.canonical import encode_canonical_json
from rules.eventhash import compute_content_hash
from rules.redaction import redact_event
from rules.roomstate import RoomPolicy
from rules.roomversion import get_room_version
from rules.signatures import ServerKey, sign_event
from rules.xmatrix import sign_request
from tests.bench.results import record

LOCAL, ORIGIN, ROOM = "hs.bench", "sender.bench", "!bench:hs.bench"
VERSION = get_room_version("10")
KEY = generate_signing_key("1")
TXNS, PDUS = 60, 50


class Source:
    async def fetch(self, room_id):
        acl = ServerAcl.from_content(
            {"allow": ["*"], "deny": [f"*.bad{i}.org" for i in range(1000)]}
        )
        return RoomPolicy(ROOM, "10", VERSION, acl)

    async def fetch_state(self, room_id):
        return None


def pdus(txn: int) -> list[dict]:
    out = []
    for i in range(PDUS):
        event = {
            "room_id": ROOM,
            "sender": f"@user{i % 7}:{ORIGIN}",
            "type": "m.room.message",
            "content": {"msgtype": "m.text", "body": f"message {txn}-{i} " + "x" * 400},
            "origin_server_ts": 1_700_000_000_000 + txn * 100 + i,
            "depth": 10 + i,
            "prev_events": [f"$prev{txn}-{i}"],
            "auth_events": ["$create", "$power", "$member"],
        }
        out.append(sign_event(event, VERSION, ORIGIN, KEY))
    return out


def flow(txn_id: str, events: list[dict]) -> http.HTTPFlow:
    path = f"/_matrix/federation/v1/send/{txn_id}"
    content = {"origin": ORIGIN, "origin_server_ts": 1, "pdus": events, "edus": []}
    auth = sign_request("PUT", path, ORIGIN, LOCAL, content, KEY)
    request = http.Request.make(
        "PUT", f"http://{LOCAL}{path}", json.dumps(content).encode(), {"Authorization": auth}
    )
    f = tflow.tflow(req=request)
    f.client_conn.proxy_mode = ProxyMode.parse("reverse:http://127.0.0.1:8008")
    return f


def runtime(workdir: Path, verify: bool) -> RuntimeHolder:
    config = workdir / f"modgud-{verify}.yaml"
    config.write_text(
        f"server_name: {LOCAL}\nupstream: http://127.0.0.1:1\nverify_signatures: {str(verify).lower()}\n"
        f"database: bench-{verify}.db\n"
    )
    holder = RuntimeHolder()
    holder.runtime = build_runtime(load_config(config), source=Source())
    key = ServerKey(ORIGIN, "ed25519:1", get_verify_key(KEY), 2**62)
    holder.runtime.keys._keys[ORIGIN] = (time.monotonic(), {"ed25519:1": key})  # preloaded
    return holder


async def edge_seconds(holder: RuntimeHolder, bodies: list[list[dict]], repeat: bool) -> float:
    enforcer = Enforcer(holder)
    flows = [flow(f"t{i}{'r' if repeat else ''}", events) for i, events in enumerate(bodies)]
    start = time.thread_time()  # this thread's CPU: not the SQLite writer's, not waits
    for f in flows:
        forget_flow_state(f)
        await enforcer.inspect_request(f)
        assert f.response is None, f.response
    return time.thread_time() - start


def raw_seconds(bodies: list[list[dict]]) -> float:
    """The least any verifier does: the reference hash and the signature share the
    canonical JSON of the redacted event, so it is made once."""
    verify_key = get_verify_key(KEY)
    encoded = [json.dumps(e).encode() for events in bodies for e in events]
    start = time.thread_time()
    for raw in encoded:
        event = json.loads(raw)
        compute_content_hash(event)
        redacted = redact_event(event, VERSION)
        signatures = redacted.pop("signatures")
        redacted.pop("unsigned", None)
        signed = encode_canonical_json(redacted)
        hashlib.sha256(signed).digest()  # the reference hash
        verify_key.verify(signed, decode_base64(signatures[ORIGIN]["ed25519:1"]))
    return time.thread_time() - start


async def run() -> dict[str, float]:
    bodies = [pdus(t) for t in range(TXNS)]
    with tempfile.TemporaryDirectory() as tmp:
        on, off = runtime(Path(tmp), True), runtime(Path(tmp), False)
        await edge_seconds(on, bodies[:5], False)  # warm up (imports, caches of the room)
        await edge_seconds(off, bodies[:5], False)
        rounds = []
        for _ in range(3):
            on_s = await edge_seconds(runtime(Path(tmp), True), bodies, False)
            off_s = await edge_seconds(runtime(Path(tmp), False), bodies, False)
            raw_s = raw_seconds(bodies)
            again = runtime(Path(tmp), True)
            await edge_seconds(again, bodies, False)
            repeat_s = await edge_seconds(again, bodies, True)
            rounds.append((on_s, off_s, raw_s, repeat_s))
        n = TXNS * PDUS
        pick = statistics.median
        return {
            "modgud_on_us": pick(r[0] for r in rounds) / n * 1e6,
            "modgud_off_us": pick(r[1] for r in rounds) / n * 1e6,
            "raw_us": pick(r[2] for r in rounds) / n * 1e6,
            "repeat_us": pick(r[3] for r in rounds) / n * 1e6,
        }


def main() -> int:
    r = asyncio.run(run())
    ratio = r["modgud_on_us"] / r["raw_us"]
    print("Signature verification, per PDU (50-PDU transactions, in one process)")
    print(f"  raw (parse + content hash + reference hash + 1 ed25519): {r['raw_us']:.1f} us")
    print(
        f"  modgud edge, signatures on:  {r['modgud_on_us']:.1f} us  ratio {ratio:.2f}  target <= 1.30: {'met' if ratio <= 1.3 else 'NOT met'}"
    )
    print(f"  modgud edge, signatures off: {r['modgud_off_us']:.1f} us")
    print(f"  the same transactions again (relayed/repeated): {r['repeat_us']:.1f} us")
    record(
        3,
        "signatures on, per PDU / raw verification cost",
        ratio,
        1.3,
        note=f"raw {r['raw_us']:.1f} us, modgud {r['modgud_on_us']:.1f} us, "
        f"the same again {r['repeat_us']:.1f} us",
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
