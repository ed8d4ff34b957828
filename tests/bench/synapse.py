"""The /send round trip to a real Synapse through modgud against the same through nginx
([module] targets): `python -m tests.bench.synapse` (part of `make bench`; needs the Synapse
virtualenv with modgud's module, and nginx).

One Synapse (plain HTTP on loopback), one room, a peer server of the test federation
joined to it. Six paths, alternated (BENCH_CYCLES times each, Synapse restarted between,
so that none always meets the bigger room or the later minute):

    nginx      nginx (Debian's package) terminating TLS -> Synapse, no module
    noop       nginx -> Synapse with a module whose callback answers at once (the least
               any spam-checker module costs: Synapse's own part)
    module     nginx -> Synapse with modgud's module (the module's own cost)
    modgud     modgud's edge terminating TLS -> Synapse with the module (the deployment)
    behind     nginx terminating TLS -> modgud's edge on plain HTTP -> Synapse with the
               module (modgud behind the operator's existing TLS proxy)
    mitmdump   plain mitmdump (reverse mode, TLS, no addons) -> Synapse, no module: the
               floor of any mitmproxy edge
    hook       modgud's edge -> Synapse with the HTTP hook (synapse-http-antispam), as
               before the module, for comparison

On each path a keep-alive client (one TLS connection) sends /send transactions of 1 and
of 50 new, chained, signed PDUs, one at a time, and times each round trip. Medians and the
fastest rounds are compared with nginx's. The module's own time per event is read from
its histogram on Synapse's metrics listener (modgud_module_seconds).
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiohttp

from proxy_addons.testbed.homeserver import ClientApi, SynapseHomeserver, free_port
from proxy_addons.testbed.nginx import Nginx
from proxy_addons.testbed.peer import FederationPeer, PeerServer
from proxy_addons.testbed.topology import _wait_port
from rules.xmatrix import sign_request
from tests.bench.results import record

ROUNDS = {1: int(os.environ.get("BENCH_SMALL", "40")), 50: int(os.environ.get("BENCH_LARGE", "10"))}
CYCLES = int(os.environ.get("BENCH_CYCLES", "3"))
ALL_PATHS = ("nginx", "noop", "module", "modgud", "behind", "mitmdump", "hook")
# BENCH_PATHS=nginx,modgud runs some of them (nginx, the base of every ratio, always).
_CHOSEN = os.environ.get("BENCH_PATHS", ",".join(ALL_PATHS)).split(",")
PATHS = tuple(p for p in ALL_PATHS if p == "nginx" or p in _CHOSEN)


async def round_trips(
    peer: FederationPeer, server: PeerServer, room_id: str, destination: str, address: str
) -> dict[int, list[float]]:
    user = server.user("bench")
    out: dict[int, list[float]] = {}
    connector = aiohttp.TCPConnector(ssl=False, limit=1)  # one keep-alive TLS connection
    async with aiohttp.ClientSession(connector=connector) as session:
        for size, count in ROUNDS.items():
            times = []
            for i in range(count + 3):  # the first three warm up
                pdus = [
                    peer.build_event(
                        room_id,
                        server,
                        user,
                        "m.room.message",
                        {"msgtype": "m.text", "body": f"{size}-{i}-{n} " + "x" * 200},
                    )[1]
                    for n in range(size)
                ]
                path = f"/_matrix/federation/v1/send/b{secrets.token_hex(6)}"
                content = {
                    "origin": server.name,
                    "origin_server_ts": int(time.time() * 1000),
                    "pdus": pdus,
                    "edus": [],
                }
                auth = sign_request(
                    "PUT", path, server.name, destination, content, server.signing_key
                )
                body = json.dumps(content).encode()
                started = time.perf_counter()
                async with session.put(
                    f"https://{address}{path}",
                    data=body,
                    headers={"Authorization": auth, "Content-Type": "application/json"},
                ) as r:
                    answer = await r.json(content_type=None)
                elapsed = time.perf_counter() - started
                if r.status != 200 or any(v for v in answer.get("pdus", {}).values()):
                    raise RuntimeError(f"{address}: {r.status} {str(answer)[:300]}")
                if i >= 3:
                    times.append(elapsed)
            out[size] = times
    return out


def start_modgud(
    workdir: Path, hs: SynapseHomeserver, peer: FederationPeer, token: str
) -> tuple[subprocess.Popen[bytes], int, int, int]:
    port, hook_port, metrics_port = free_port(), free_port(), free_port()
    (workdir / "admin.token").write_text(token)
    (workdir / "hook.token").write_text(HOOK_TOKEN)
    keys = peer.trusted_key_server
    (workdir / "modgud.yaml").write_text(
        "\n".join(
            [
                f"server_name: '{hs.server_name}'",
                f"upstream: {hs.base_url}",
                f"listen: {{inbound: '127.0.0.1:{port}', metrics: '127.0.0.1:{metrics_port}'}}",
                f"hook: {{listen: '127.0.0.1:{hook_port}', token_file: hook.token}}",
                "homeserver: {access_token_file: admin.token}",
                "verify_signatures: true",
                "database: modgud.db",
                "trusted_key_servers:",
                f"  - server_name: '{keys['server_name']}'",
                f"    verify_keys: {json.dumps(keys['verify_keys'])}",
                f"    url: https://{keys['server_name']}",
                "    verify_tls: false",
                "",
            ]
        )
    )
    modgud = Path(sys.executable).with_name("modgud")
    log = open(workdir / "modgud.log", "wb")  # noqa: SIM115 - lives with the process
    proc = subprocess.Popen(
        [str(modgud), "run", "--config", str(workdir / "modgud.yaml"), "--", "-q"],
        stdout=log,
        stderr=subprocess.STDOUT,
        cwd=workdir,
    )
    if not (_wait_port(port, 30) and _wait_port(hook_port, 30)):
        raise RuntimeError("modgud did not start")
    return proc, port, hook_port, metrics_port


HOOK_TOKEN = "bench-hook"


def homeserver(workdir: Path, peer: FederationPeer) -> SynapseHomeserver:
    """One Synapse (plain HTTP on loopback) that trusts the peer's notary for keys."""
    return SynapseHomeserver(
        workdir / "hs",
        f"localhost:{free_port()}",
        http_port=free_port(),
        extra_config={"trusted_key_servers": [peer.trusted_key_server]},
        metrics_port=free_port(),
    )


def hook_module(port: int, token: str | None) -> dict[str, object]:
    """Synapse's synapse-http-antispam module calling the hook on `port`, failing closed."""
    config: dict[str, object] = {
        "base_url": f"http://127.0.0.1:{port}",
        "enabled_callbacks": ["check_event_for_spam", "user_may_invite"],
        "fail_open": {"check_event_for_spam": False},
    }
    if token is not None:
        config["authorization"] = token
    return {"module": "synapse_http_antispam.HTTPAntispam", "config": config}


def histogram(
    text: str, name: str, callback: str, **labels: str
) -> tuple[list[tuple[float, float]], float]:
    """A histogram's cumulative buckets (upper bound, count) and its sum for `callback`,
    summed over its other labels but `labels`."""
    from prometheus_client.parser import text_string_to_metric_families

    buckets: dict[float, float] = {}
    total = 0.0
    wanted = {"callback": callback, **labels}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if any(sample.labels.get(k) != v for k, v in wanted.items()):
                continue
            if sample.name == f"{name}_bucket":
                bound = float(sample.labels["le"])
                buckets[bound] = buckets.get(bound, 0.0) + sample.value
            elif sample.name == f"{name}_sum":
                total += sample.value
    return sorted(buckets.items()), total


def quantile(buckets: list[tuple[float, float]], q: float) -> float:
    """The upper bound of the bucket holding the q-quantile (what the histogram can say
    for certain: the quantile is at most this)."""
    if not buckets or not buckets[-1][1]:
        return 0.0
    rank = q * buckets[-1][1]
    return next(bound for bound, count in buckets if count >= rank)


def hook_time(metrics_port: int) -> tuple[float, float]:
    """modgud's own mean answer time for the hook's check_event_for_spam, and the calls."""
    import urllib.request

    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5) as r:
        buckets, total = histogram(r.read().decode(), "modgud_hook_seconds", "check_event_for_spam")
    count = buckets[-1][1] if buckets else 0.0
    return (total / count if count else 0.0), count


def start_mitmdump(upstream: str) -> tuple[subprocess.Popen[bytes], int]:
    """Plain mitmdump in reverse mode: its default addons, no script."""
    port = free_port()
    proc = subprocess.Popen(
        [
            str(Path(sys.executable).with_name("mitmdump")),
            "--mode",
            f"reverse:{upstream}@127.0.0.1:{port}",
            "-q",
            "--set",
            "connection_strategy=lazy",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    if not _wait_port(port, 30):
        raise RuntimeError("mitmdump did not start")
    return proc, port


def added(path: list[float], base: list[float]) -> str:
    """What a path adds to nginx's median, or that it is below what this run can tell
    apart (the medians' spread), never a negative latency."""
    difference = statistics.median(path) - statistics.median(base)
    spread = max(_median_error(path), _median_error(base))
    if difference <= 2 * spread:
        return f"< {max(difference, 0) + 2 * spread:.2f} ms (noise)"
    return f"+{difference:.2f} ms"


def _median_error(times: list[float]) -> float:
    """A rough standard error of the median (ms): 1.25 IQR / 1.35 / sqrt(n)."""
    q = statistics.quantiles(times, n=4)
    return 1.25 * (q[2] - q[0]) / 1.35 / len(times) ** 0.5


def bench_dir() -> str | None:
    """Where Synapse's database lives during the bench: tmpfs (BENCH_DIR, else /dev/shm).
    On this machine's disk, fsync latency swung the same path by 2x from one minute to the
    next (nginx at 1 PDU: 10.6 ms one day, 18.9 and 26.9 ms in two cycles of one run);
    in memory the round trip is Synapse's and the proxies' CPU, which is what is compared,
    and the ratios are stricter for it (a smaller denominator)."""
    chosen = os.environ.get("BENCH_DIR")
    if chosen:
        return chosen
    return "/dev/shm" if os.access("/dev/shm", os.W_OK) else None


def main() -> int:
    workdir = Path(tempfile.mkdtemp(prefix="modgud-bench-synapse-", dir=bench_dir()))
    peer = FederationPeer(workdir / "peer", free_port())
    server = peer.add_server()
    peer.start()
    hs = homeserver(workdir, peer)
    nginx = Nginx(workdir / "nginx", free_port(), hs.base_url)
    front = None  # nginx in front of modgud on plain HTTP
    modgud = mitmdump = None
    results: dict[str, dict[int, list[float]]] = {path: {1: [], 50: []} for path in PATHS}
    module_texts: list[str] = []  # the module's metrics after each path that loads it
    try:
        hs.start()
        _, token = hs.register_user("alice", admin=True)
        alice = ClientApi(hs.base_url, token)
        room_id = alice.create_room(room_version="10")
        nginx.start()
        via_nginx = f"127.0.0.1:{nginx.port}"
        peer.join(server, server.user("bench"), room_id, hs.server_name, via_nginx)
        modgud, port, hook_port, metrics_port = start_modgud(workdir, hs, peer, token)
        front = Nginx(workdir / "nginx-front", free_port(), f"http://127.0.0.1:{port}")
        front.start()
        mitmdump, mitm_port = start_mitmdump(hs.base_url)
        module = {
            "module": "modgud_synapse.ModgudModule",
            "config": {"config": str(workdir / "modgud.yaml")},
        }
        shutil.copy(Path(__file__).with_name("noop_module.py"), hs.workdir / "noop_module.py")
        modules = {
            "nginx": [],
            "noop": [{"module": "noop_module.NoopModule", "config": {}}],
            "module": [module],
            "modgud": [module],
            "behind": [module],
            "mitmdump": [],
            "hook": [hook_module(hook_port, HOOK_TOKEN)],
        }
        address = {
            "nginx": via_nginx,
            "noop": via_nginx,
            "module": via_nginx,
            "modgud": f"127.0.0.1:{port}",
            "behind": f"127.0.0.1:{front.port}",
            "mitmdump": f"127.0.0.1:{mitm_port}",
            "hook": f"127.0.0.1:{port}",
        }
        for cycle in range(CYCLES):
            for path in PATHS:
                hs.stop()
                hs.modules = modules[path]
                hs.start()
                got = asyncio.run(round_trips(peer, server, room_id, hs.server_name, address[path]))
                for size, times in got.items():
                    results[path][size].extend(t * 1000 for t in times)
                if module in modules[path]:  # before the restart resets its histogram
                    module_texts.append(hs.metrics_text())
                print(
                    f"  cycle {cycle + 1} {path:>8}: "
                    + ", ".join(
                        f"{n} PDU {statistics.median(t) * 1000:.1f} ms" for n, t in got.items()
                    ),
                    flush=True,
                )
        mean_hook, hook_calls = hook_time(metrics_port)
    finally:
        for proc in (modgud, mitmdump):
            if proc is not None:
                proc.terminate()
                proc.wait(15)
        for proxy in (front, nginx):
            if proxy is not None:
                proxy.stop()
        hs.stop()
        peer.stop()
    report(results, module_texts, mean_hook, hook_calls)
    shutil.rmtree(workdir, ignore_errors=True)  # kept, with the logs, when a path failed
    return 0


def report(
    results: dict[str, dict[int, list[float]]],
    module_texts: list[str],
    mean_hook: float,
    calls: float,
) -> None:
    print("The /send round trip to a real Synapse, keep-alive TLS: median / fastest ms, x nginx")
    print(f"{'PDUs':>5} " + " ".join(f"{p:>19}" for p in PATHS))
    for size in (1, 50):
        base = results["nginx"][size]
        cells = []
        for path in PATHS:
            times = results[path][size]
            med, low = statistics.median(times), min(times)
            cells.append(f"{med:6.1f}/{low:5.1f} {med / statistics.median(base):4.2f}x")
        print(f"{size:>5} " + " ".join(f"{c:>19}" for c in cells))
        for path in PATHS[1:]:
            print(f"        {path:>8} adds {added(results[path][size], base)}")
    # The module's time per event: every Synapse start resets the histogram; add the runs.
    module_p99 = module_events = 0.0
    for what, labels in (("all events", {}), ("cached rooms", {"room": "cached"})):
        buckets: dict[float, float] = {}
        total = 0.0
        for chunk in module_texts:
            got, chunk_sum = histogram(
                chunk, "modgud_module_seconds", "check_event_for_spam", **labels
            )
            for bound, count in got:
                buckets[bound] = buckets.get(bound, 0.0) + count
            total += chunk_sum
        cumulative = sorted(buckets.items())
        events = cumulative[-1][1] if cumulative else 0.0
        p99 = quantile(cumulative, 0.99)
        p50 = quantile(cumulative, 0.50)
        if labels:
            module_p99, module_events = p99, events
        print(
            f"The module's own time per event, {what} (its histogram, {events:.0f} events): "
            f"p50 <= {p50 * 1e6:.0f} µs, p99 <= {p99 * 1e6:.0f} µs, mean "
            f"{(total / events if events else 0) * 1e6:.0f} µs"
        )
        print("   " + ", ".join(f"<={b * 1e6:g}µs {c:.0f}" for b, c in cumulative if c < events))
    print(
        f"(The hook, for comparison: modgud answered {calls:.0f} calls in "
        f"{mean_hook * 1000:.2f} ms on average; the rest of its cost is Synapse's HTTP call.)"
    )

    if set(PATHS) != set(ALL_PATHS):
        return  # a partial run (BENCH_PATHS) records no figures

    def ratio(path: str, size: int, fastest: bool = False) -> float:
        pick = min if fastest else statistics.median
        return pick(results[path][size]) / pick(results["nginx"][size])

    for size in (1, 50):
        plural = "s" if size > 1 else ""
        for path, figure in (
            ("modgud", "edge (TLS) + module"),
            ("behind", "nginx + edge + module"),
        ):
            record(
                17,
                f"/send {size} PDU{plural}, {figure} / nginx",
                ratio(path, size),
                1.10,
                note=f"fastest rounds {ratio(path, size, True):.2f}x; plain mitmdump "
                f"{ratio('mitmdump', size):.2f}x (fastest {ratio('mitmdump', size, True):.2f}x); "
                f"edge + hook {ratio('hook', size):.2f}x",
            )
    record(
        17,
        "/send 50 PDUs, Synapse with the module / without",
        ratio("module", 50),
        1.05,
        note=f"fastest rounds {ratio('module', 50, True):.2f}x; 1 PDU {ratio('module', 1):.2f}x; "
        f"a module that answers at once {ratio('noop', 50):.2f}x",
    )
    record(
        17,
        "module time per event in a cached room, p99 (µs)",
        module_p99 * 1e6,
        100.0,
        unit="µs",
        note=f"modgud_module_seconds{{room=cached}} on Synapse's metrics listener, "
        f"{module_events:.0f} events; all events (state reads included) p99 {p99 * 1e6:.0f} µs",
    )


if __name__ == "__main__":
    sys.exit(main())
