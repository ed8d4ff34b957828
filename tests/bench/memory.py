"""Resident memory across 1,000,000 PDUs over 10,000 rooms ([performance] target 6):
`python -m tests.bench.memory` (part of `make bench`; BENCH_PDUS to change the count).

The edge in one process (signature verification off: the point is the bounded caches —
rooms, verdicts, the event index's dedupe set, refused events), 50-PDU transactions from
100 origins whose PDUs land in 10,000 rooms, one in fifty written by a denied server (so
findings, refused events and verdicts are made too). RSS is read from /proc after every
100,000 PDUs; the target: flat within 10 % once the caches are full.
"""

from __future__ import annotations

import asyncio
import gc
import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path

from mitmproxy import http
from mitmproxy.proxy.mode_specs import ProxyMode
from mitmproxy.test import tflow

from proxy_addons.config import load_config
from proxy_addons.enforcer import Enforcer
from proxy_addons.flowinfo import forget_flow_state
from proxy_addons.runtime import RuntimeHolder, build_runtime
from rules.acl import ServerAcl
from rules.roomstate import RoomPolicy
from rules.roomversion import get_room_version
from tests.bench.results import record

LOCAL = "hs.bench"
ROOMS = 10_000
TOTAL = int(os.environ.get("BENCH_PDUS", "1000000"))
VERSION = get_room_version("10")
ACL = ServerAcl.from_content({"allow": ["*"], "deny": ["denied.bench", "*.bad.bench"]})


class Source:
    async def fetch(self, room_id: str) -> RoomPolicy:
        return RoomPolicy(room_id, "10", VERSION, ACL)

    async def fetch_state(self, room_id: str) -> None:
        return None


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def transaction(rng: random.Random, n: int, origin: str) -> bytes:
    pdus = []
    for i in range(50):
        author = "denied.bench" if i == 0 and n % 50 == 0 else origin  # a relayed leak
        pdus.append(
            {
                "room_id": f"!r{rng.randrange(ROOMS)}:{LOCAL}",
                "sender": f"@u{i}:{author}",
                "type": "m.room.message",
                "content": {"msgtype": "m.text", "body": f"{n}-{i}"},
                "origin_server_ts": n,
                "depth": 5,
                "prev_events": [f"$p{n}-{i}"],
                "auth_events": ["$a"],
                "hashes": {"sha256": f"{n:012d}{i:04d}{origin}"},
                "signatures": {},
            }
        )
    return json.dumps({"origin": origin, "origin_server_ts": n, "pdus": pdus}).encode()


def flow(body: bytes, origin: str, n: int) -> http.HTTPFlow:
    path = f"/_matrix/federation/v1/send/m{n}"
    auth = f'X-Matrix origin="{origin}",destination="{LOCAL}",key="ed25519:1",sig="x"'
    request = http.Request.make("PUT", f"http://{LOCAL}{path}", body, {"Authorization": auth})
    f = tflow.tflow(req=request)
    f.client_conn.proxy_mode = ProxyMode.parse("reverse:http://127.0.0.1:8008")
    return f


async def run(workdir: Path) -> list[tuple[int, float]]:
    config = workdir / "modgud.yaml"
    config.write_text(
        f"server_name: {LOCAL}\nupstream: http://127.0.0.1:1\nverify_signatures: false\n"
    )
    holder = RuntimeHolder()
    holder.runtime = build_runtime(load_config(config), source=Source())
    enforcer = Enforcer(holder)
    rng = random.Random(1)
    samples = [(0, rss_mb())]
    seen = 0
    n = 0
    while seen < TOTAL:
        origin = f"s{n % 100}.bench"
        f = flow(transaction(rng, n, origin), origin, n)
        await enforcer.inspect_request(f)
        forget_flow_state(f)
        n += 1
        seen += 50
        if seen % 100_000 == 0:
            holder.runtime.store.flush(60)
            gc.collect()
            samples.append((seen, rss_mb()))
    holder.runtime.store.close()
    return samples


def main() -> int:
    started = time.monotonic()
    with tempfile.TemporaryDirectory() as tmp:
        samples = asyncio.run(run(Path(tmp)))
    print(
        f"Resident memory across {TOTAL:,} PDUs over {ROOMS:,} rooms ({time.monotonic() - started:.0f} s)"
    )
    for seen, mb in samples:
        print(f"  {seen:>9,} PDUs  {mb:7.1f} MB")
    full = [mb for seen, mb in samples if seen >= TOTAL // 4]
    growth = (max(full) - min(full)) / min(full) if full else 0.0
    print(
        f"  from {TOTAL // 4:,} PDUs on (caches full): {min(full):.1f} to {max(full):.1f} MB, "
        f"{growth:.1%}  target <= 10 %: {'met' if growth <= 0.10 else 'NOT met'}"
    )
    record(
        6,
        f"resident memory growth over {TOTAL:,} PDUs",
        growth * 100,
        10.0,
        unit=" %",
        note=f"{min(full):.1f} to {max(full):.1f} MB",
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
