"""The /send round trip to a real Synapse through modgud (edge + event hook) against the
same through an nginx TLS reverse proxy ([performance] target 7):
`python -m tests.bench.synapse` (part of `make bench`; needs the Synapse virtualenv and
nginx).

One Synapse (plain HTTP on loopback), one room, a peer server of the test federation
joined to it. Three paths, alternated (BENCH_CYCLES times each, Synapse restarted between):
nginx (Debian's package) terminating TLS in front of Synapse, which has no event hook; and
modgud in front of the same Synapse, running with modgud's event hook
(synapse-http-antispam), signatures verified; and, to show where the time goes, modgud's
edge alone (Synapse without the hook); and the floor any HTTP event hook has: nginx in
front of Synapse whose hook is a constant answer (a bare asyncio server that answers `{}`
at once, no parsing, no checks). On each path a keep-alive client
(one TLS connection) sends /send transactions of 1 and of 50 new, chained, signed PDUs,
one at a time, and times each round trip; the medians are compared.
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
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

ROUNDS = {1: int(os.environ.get("BENCH_SMALL", "30")), 50: int(os.environ.get("BENCH_LARGE", "8"))}
CYCLES = int(os.environ.get("BENCH_CYCLES", "2"))
# nginx: Synapse behind nginx; edge: behind modgud without the hook; modgud: the real
# deployment (edge + hook); floor: behind nginx with a hook that answers at once.
PATHS = ("nginx", "edge", "modgud", "floor")


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


def serve_constant_hook(port: int) -> None:
    """An HTTP/1.1 server answering every request with 200 `{}` at once: the least any
    synapse-http-antispam hook can cost Synapse."""
    answer = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n{}"

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = 0
                for line in head.split(b"\r\n"):
                    if line.lower().startswith(b"content-length:"):
                        length = int(line.split(b":", 1)[1])
                await reader.readexactly(length)
                writer.write(answer)
        except (asyncio.IncompleteReadError, ConnectionError):
            writer.close()

    async def serve() -> None:
        server = await asyncio.start_server(handle, "127.0.0.1", port)
        async with server:
            await server.serve_forever()

    asyncio.run(serve())


def hook_time(metrics_port: int) -> tuple[float, float, dict[str, float]]:
    """modgud's own mean answer time for check_event_for_spam, the number of calls, and
    the calls by what decided them (the edge's verdict, the hook's own evaluation)."""
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5) as r:
        text = r.read().decode()
    total = count = 0.0
    decided: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.labels.get("callback") != "check_event_for_spam":
                continue
            if sample.name == "modgud_hook_calls_total":
                by = sample.labels["decided_by"]
                decided[by] = decided.get(by, 0.0) + sample.value
            if sample.name == "modgud_hook_seconds_sum":
                total = sample.value
            elif sample.name == "modgud_hook_seconds_count":
                count = sample.value
    return (total / count if count else 0.0), count, decided


def main() -> int:
    workdir = Path(tempfile.mkdtemp(prefix="modgud-bench-synapse-"))
    peer = FederationPeer(workdir / "peer", free_port())
    server = peer.add_server()
    peer.start()
    hs = homeserver(workdir, peer)
    nginx = Nginx(workdir / "nginx", free_port(), hs.base_url)
    modgud = None
    results: dict[str, dict[int, list[float]]] = {path: {1: [], 50: []} for path in PATHS}
    constant_port = free_port()
    constant = subprocess.Popen(
        [sys.executable, "-m", "tests.bench.synapse", "--constant-hook", str(constant_port)]
    )
    try:
        hs.start()
        _, token = hs.register_user("alice", admin=True)
        alice = ClientApi(hs.base_url, token)
        room_id = alice.create_room(room_version="10")
        nginx.start()
        via_nginx = f"127.0.0.1:{nginx.port}"
        peer.join(server, server.user("bench"), room_id, hs.server_name, via_nginx)
        modgud, port, hook_port, metrics_port = start_modgud(workdir, hs, peer, token)
        hook = hook_module(hook_port, HOOK_TOKEN)
        floor = hook_module(constant_port, None)
        if not _wait_port(constant_port, 10):
            raise RuntimeError("the constant hook did not start")
        modules = {"nginx": [], "edge": [], "modgud": [hook], "floor": [floor]}
        # Alternate, so that neither path always meets the bigger room or the later minute.
        for cycle in range(CYCLES):
            # "edge": modgud in front, Synapse without the hook (where the time goes).
            for path in PATHS:
                hs.stop()
                hs.modules = modules[path]
                hs.start()
                address = via_nginx if path in ("nginx", "floor") else f"127.0.0.1:{port}"
                got = asyncio.run(round_trips(peer, server, room_id, hs.server_name, address))
                for size, times in got.items():
                    results[path][size].extend(times)
                print(
                    f"  cycle {cycle + 1} {path:>6}: "
                    + ", ".join(
                        f"{n} PDU {statistics.median(t) * 1000:.1f} ms" for n, t in got.items()
                    ),
                    flush=True,
                )
        mean_hook, hook_calls, decided = hook_time(metrics_port)
    finally:
        constant.terminate()
        if modgud is not None:
            modgud.terminate()
            modgud.wait(15)
        nginx.stop()
        hs.stop()
        peer.stop()
    print(
        f"(Synapse called the hook {hook_calls:.0f} times; modgud answered each in "
        f"{mean_hook * 1000:.2f} ms on average, the rest of the hook's cost is Synapse's call;"
        " decided by: " + ", ".join(f"{k} {v:.0f}" for k, v in sorted(decided.items())) + ")"
    )
    print("The /send round trip to a real Synapse, keep-alive TLS, medians")
    print(
        f"{'PDUs':>5} {'nginx ms':>9} {'edge only':>10} {'edge+hook':>10} {'ratio':>6} "
        f"{'floor ms':>9} {'floor ratio':>12}  target"
    )
    for size, limit in ((1, 1.25), (50, 1.10)):
        a, e, b, f = (statistics.median(results[p][size]) for p in PATHS)
        verdict = "met" if b / a <= limit else "NOT met"
        print(
            f"{size:>5} {a * 1000:>9.1f} {e * 1000:>10.1f} {b * 1000:>10.1f} {b / a:>6.2f} "
            f"{f * 1000:>9.1f} {f / a:>12.2f}  <= {limit:.2f}: {verdict}"
        )
        record(
            7,
            f"/send {size} PDU{'s' if size > 1 else ''}, edge + hook / nginx",
            b / a,
            limit,
            note=f"nginx {a * 1000:.1f} ms, edge + hook {b * 1000:.1f} ms, edge alone "
            f"{e * 1000:.1f} ms; a constant hook behind nginx (the floor) {f / a:.2f}x",
        )
    return 0


if __name__ == "__main__":
    if sys.argv[1:2] == ["--constant-hook"]:
        serve_constant_hook(int(sys.argv[2]))
    else:
        sys.exit(main())
