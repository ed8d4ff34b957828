"""Where a 1-PDU /send's milliseconds go at the edge: `python -m tests.bench.latency` (part
of `make bench`).

One keep-alive client sends transactions of one signed PDU, one at a time, to the stub
upstream of tests/bench/run.py directly, through plain mitmdump (its default addons, no
script: the floor of any mitmproxy edge), and through modgud with signature verification
off and on. Paths alternate for BENCH_LATENCY_ROUNDS rounds; reported: median and fastest
round trip, and each proxy's own CPU time per request (from /proc: on this 2-core
machine a sequential client's latency is mostly the proxy's CPU).

`BENCH_PROFILE=DIR` also records each proxy with py-spy during its last round and prints
the split of its CPU per request (tests/bench/profile.py's parts).
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiohttp

from rules.roomversion import get_room_version
from rules.signatures import sign_event
from rules.xmatrix import sign_request
from tests.bench import run as pipeline
from tests.bench.profile import format_breakdown, read_breakdown, start_py_spy
from tests.bench.results import record

ROUNDS = int(os.environ.get("BENCH_LATENCY_ROUNDS", "3"))
REQUESTS = int(os.environ.get("BENCH_LATENCY_REQUESTS", "600"))
WARMUP = 30
PROXIES = ("mitmdump", "modgud", "modgud+sig")
PROFILE_RATE = 200


def one_pdu_transactions(count: int) -> list[tuple[str, bytes, str]]:
    rv = get_room_version("10")
    assert rv is not None
    out = []
    for t in range(count):
        event = {
            "room_id": pipeline.ROOM,
            "sender": f"@u:{pipeline.ORIGIN}",
            "type": "m.room.message",
            "content": {"msgtype": "m.text", "body": f"message {t} " + "x" * 200},
            "origin_server_ts": 1_700_000_000_000 + t,
            "depth": 10,
            "prev_events": ["$prev"],
            "auth_events": ["$a", "$b", "$c"],
        }
        pdus = [sign_event(event, rv, pipeline.ORIGIN, pipeline.KEY)]
        content = {"origin": pipeline.ORIGIN, "origin_server_ts": 1, "pdus": pdus, "edus": []}
        path = f"/_matrix/federation/v1/send/latency{t}"
        auth = sign_request("PUT", path, pipeline.ORIGIN, pipeline.LOCAL, content, pipeline.KEY)
        out.append((path, json.dumps(content).encode(), auth))
    return out


async def sequential(port: int, txns: list[tuple[str, bytes, str]]) -> list[float]:
    """Round trips (ms) of `txns` sent one after another on one keep-alive connection."""
    times = []
    connector = aiohttp.TCPConnector(limit=1)
    async with aiohttp.ClientSession(connector=connector) as session:
        for i, txn in enumerate(txns):
            elapsed = await pipeline.put_transaction(session, port, txn)
            if i >= WARMUP:
                times.append(elapsed * 1000)
    return times


def _profile(kind: str, pid: int) -> subprocess.Popen[bytes] | None:
    """py-spy on `pid` until interrupted (SIGINT: it writes its profile and ends)."""
    return start_py_spy(
        pid, f"latency-{kind}.txt", seconds=3600, rate=PROFILE_RATE, nonblocking=True
    )


async def main() -> int:
    if pipeline.PIN:
        os.sched_setaffinity(0, {0})
    workdir = Path(tempfile.mkdtemp(prefix="modgud-bench-latency-"))
    txns = one_pdu_transactions(REQUESTS + WARMUP)
    stub = pipeline.free_port()
    runner = await pipeline.start_stub(stub)
    times: dict[str, list[float]] = {"direct": [], **{k: [] for k in PROXIES}}
    cpu: dict[str, list[float]] = {k: [] for k in PROXIES}
    profiled: dict[str, int] = {}
    procs = {}
    try:
        for kind in PROXIES:
            procs[kind] = pipeline.start_proxy(kind, stub, workdir)
        for n in range(ROUNDS):
            times["direct"] += await sequential(stub, txns)
            for kind in PROXIES:
                proc, port, _ = procs[kind]
                spy = None
                if n == ROUNDS - 1 and (spy := _profile(kind, proc.pid)) is not None:
                    await asyncio.sleep(1.0)  # py-spy attaches
                    profiled[kind] = len(txns)
                before = pipeline.cpu_seconds(proc.pid)
                got = await sequential(port, txns)
                cpu[kind].append((pipeline.cpu_seconds(proc.pid) - before) * 1000 / len(txns))
                times[kind] += got
                if spy is not None:
                    spy.send_signal(signal.SIGINT)
                    await asyncio.to_thread(spy.wait, 120)
    finally:
        for proc, _, _ in procs.values():
            proc.terminate()
            proc.wait(10)
        await runner.cleanup()
        shutil.rmtree(workdir, ignore_errors=True)
    print(
        f"1-PDU /send, one keep-alive client, stub upstream, {ROUNDS} rounds of {REQUESTS}: "
        "median / fastest ms, proxy CPU ms per request"
    )
    base = statistics.median(times["direct"])
    mitm = statistics.median(times["mitmdump"])
    for kind, values in times.items():
        med = statistics.median(values)
        spent = f"{statistics.median(cpu[kind]):6.2f}" if kind in cpu else f"{'':>6}"
        over = f"+{med - base:5.2f} ms over direct" if kind != "direct" else ""
        print(f"  {kind:<11}{med:7.2f} /{min(values):6.2f}   CPU {spent}   {over}")
    modgud = statistics.median(times["modgud+sig"])
    print(f"modgud (signatures on) / plain mitmdump: {modgud / mitm:.2f}")
    record(
        17,
        "edge latency, 1-PDU /send, modgud (signatures on) / plain mitmdump",
        modgud / mitm,
        None,
        note=f"stub upstream; modgud {modgud:.2f} ms, mitmdump {mitm:.2f} ms, "
        f"direct {base:.2f} ms; CPU/request modgud "
        f"{statistics.median(cpu['modgud+sig']):.2f}, mitmdump "
        f"{statistics.median(cpu['mitmdump']):.2f} ms",
    )
    if os.environ.get("BENCH_PROFILE"):
        columns = {}
        for kind, count in profiled.items():
            path = Path(os.environ["BENCH_PROFILE"]) / f"latency-{kind}.txt"
            got = read_breakdown(path, count, PROFILE_RATE)
            if got is not None:
                columns[kind] = got
        if columns:
            print(format_breakdown(columns, per="request"))
    return 0


if __name__ == "__main__":
    started = time.monotonic()
    code = asyncio.run(main())
    print(f"({time.monotonic() - started:.0f} s)")
    sys.exit(code)
