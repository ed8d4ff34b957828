"""`make bench`: plain mitmdump versus modgud, side by side in one run.

Same upstream stub (answers /send, the admin state API with an ACL of 1,000 deny globs,
and key queries), same pre-signed transactions of 50 signed PDUs, same client. Reports
throughput (transactions/s) and latency per transaction for: plain mitmdump, modgud with
signature verification off, and modgud with it on.
"""

from __future__ import annotations

import asyncio
import json
import os
import platform
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiohttp
from aiohttp import web
from signedjson.key import encode_verify_key_base64, generate_signing_key, get_verify_key

from rules.roomversion import get_room_version
from rules.signatures import sign_event
from rules.xmatrix import sign_request

ORIGIN = "sender.bench"
LOCAL = "hs.bench"
ROOM = "!bench:hs.bench"
DURATION = float(os.environ.get("BENCH_SECONDS", "8"))
CONCURRENCY = int(os.environ.get("BENCH_CONCURRENCY", "8"))
N_TXNS = 400


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


KEY = generate_signing_key("b1")


def make_transactions() -> list[tuple[str, bytes, str]]:
    rv = get_room_version("10")
    assert rv is not None
    out = []
    for t in range(N_TXNS):
        pdus = []
        for i in range(50):
            event = {
                "room_id": ROOM,
                "sender": f"@u{i}:{ORIGIN}",
                "type": "m.room.message",
                "content": {"msgtype": "m.text", "body": f"message {t}-{i} " + "x" * 200},
                "origin_server_ts": 1_700_000_000_000 + t * 100 + i,
                "depth": 10 + i,
                "prev_events": ["$prev"],
                "auth_events": ["$a", "$b", "$c"],
            }
            pdus.append(sign_event(event, rv, ORIGIN, KEY))
        content = {"origin": ORIGIN, "origin_server_ts": 1, "pdus": pdus, "edus": []}
        path = f"/_matrix/federation/v1/send/bench{t}"
        auth = sign_request("PUT", path, ORIGIN, LOCAL, content, KEY)
        out.append((path, json.dumps(content).encode(), auth))
    return out


async def start_stub(port: int) -> web.AppRunner:
    deny = [f"*.evil{i}.example" if i % 3 else f"bad{i}.example" for i in range(1000)]
    state = {
        "state": [
            {"type": "m.room.create", "state_key": "", "content": {"room_version": "10"}},
            {
                "type": "m.room.server_acl",
                "state_key": "",
                "event_id": "$acl",
                "content": {"allow": ["*"], "deny": deny},
            },
        ]
    }
    keys = {
        "server_keys": [
            {
                "server_name": ORIGIN,
                "valid_until_ts": 2**52,
                "verify_keys": {
                    "ed25519:b1": {"key": encode_verify_key_base64(get_verify_key(KEY))}
                },
            }
        ]
    }

    async def send(request: web.Request) -> web.Response:
        await request.read()
        return web.json_response({"pdus": {}})

    app = web.Application(client_max_size=20 * 1024 * 1024)
    app.router.add_put("/_matrix/federation/v1/send/{txn}", send)
    app.router.add_get("/_synapse/admin/v1/rooms/{room}/state", lambda r: web.json_response(state))
    app.router.add_post("/_matrix/key/v2/query", lambda r: web.json_response(keys))
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    return runner


async def load(port: int, txns: list[tuple[str, bytes, str]]) -> tuple[float, list[float]]:
    latencies: list[float] = []
    deadline = time.monotonic() + DURATION
    counter = 0
    connector = aiohttp.TCPConnector(limit=CONCURRENCY)
    async with aiohttp.ClientSession(connector=connector) as session:

        async def worker() -> None:
            nonlocal counter
            while time.monotonic() < deadline:
                path, body, auth = txns[counter % len(txns)]
                counter += 1
                t0 = time.perf_counter()
                async with session.put(
                    f"http://127.0.0.1:{port}{path}",
                    data=body,
                    headers={"Authorization": auth, "Content-Type": "application/json"},
                ) as r:
                    await r.read()
                    if r.status != 200:
                        raise RuntimeError(f"status {r.status}")
                latencies.append(time.perf_counter() - t0)

        started = time.monotonic()
        await asyncio.gather(*(worker() for _ in range(CONCURRENCY)))
        elapsed = time.monotonic() - started
    return len(latencies) / elapsed, latencies


def wait_port(port: int) -> None:
    for _ in range(300):
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    raise RuntimeError(f"port {port} did not open")


def start_proxy(kind: str, stub: int, workdir: Path) -> tuple[subprocess.Popen[bytes], int]:
    port = free_port()
    bindir = Path(sys.executable).parent
    if kind == "mitmdump":
        cmd = [
            str(bindir / "mitmdump"),
            "--mode",
            f"reverse:http://127.0.0.1:{stub}@127.0.0.1:{port}",
            "--set",
            "flow_detail=0",
            "-q",
        ]
    else:
        verify = "true" if kind == "modgud+sig" else "false"
        (workdir / "admin.token").write_text("bench")
        cfg = workdir / f"{kind}.yaml"
        cfg.write_text(
            f"server_name: {LOCAL}\nupstream: http://127.0.0.1:{stub}\n"
            f"listen: {{inbound: '127.0.0.1:{port}', metrics: '127.0.0.1:{free_port()}'}}\n"
            f"homeserver: {{access_token_file: admin.token}}\nverify_signatures: {verify}\n"
            f"database: {kind}.db\n"
        )
        cmd = [str(bindir / "modgud"), "run", "--config", str(cfg), "--", "-q"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT, cwd=workdir)
    wait_port(port)
    return proc, port


async def main() -> int:
    workdir = Path(tempfile.mkdtemp(prefix="modgud-bench-"))
    print(
        f"machine: {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}"
    )
    print(
        f"load: {CONCURRENCY} concurrent keep-alive clients, {DURATION:.0f} s per target, "
        "transactions of 50 signed PDUs, ACL of 1,000 deny globs"
    )
    txns = make_transactions()
    print(f"transaction size: {len(txns[0][1]) // 1024} KB")
    stub_port = free_port()
    runner = await start_stub(stub_port)
    results: dict[str, tuple[float, list[float]]] = {}
    try:
        results["stub direct"] = await load(stub_port, txns)
        for kind in ("mitmdump", "modgud", "modgud+sig"):
            proc, port = start_proxy(kind, stub_port, workdir)
            try:
                await load(port, txns[:20])  # warm-up: caches, connections
                results[kind] = await load(port, txns)
            finally:
                proc.terminate()
                proc.wait(10)
    finally:
        await runner.cleanup()
        shutil.rmtree(workdir, ignore_errors=True)
    base_tps, base_lat = results["mitmdump"]
    base_p50 = statistics.median(base_lat)
    print(f"\n{'target':<14}{'txn/s':>9}{'ratio':>8}{'p50 ms':>9}{'p99 ms':>9}{'added p50 ms':>14}")
    for name, (tps, lat) in results.items():
        lat_sorted = sorted(lat)
        p50 = statistics.median(lat_sorted)
        p99 = lat_sorted[int(len(lat_sorted) * 0.99) - 1]
        print(
            f"{name:<14}{tps:>9.1f}{tps / base_tps:>8.2f}{p50 * 1000:>9.1f}{p99 * 1000:>9.1f}"
            f"{(p50 - base_p50) * 1000:>14.1f}"
        )
    ratio = results["modgud"][0] / base_tps
    print(f"\nmodgud / plain mitmdump throughput (signatures off): {ratio:.2f} (target >= 0.80)")
    print(
        f"modgud / plain mitmdump throughput (signatures on):  {results['modgud+sig'][0] / base_tps:.2f}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
