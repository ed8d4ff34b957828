"""Soak ([reliability] item 5): `make soak` — modgud (edge + event hook, signatures
verified) in front of a real Synapse, scenario traffic at 80 % of the measured maximum
for SOAK_SECONDS (default 600), then: errors (must be zero) and modgud's resident memory
over the run (must stay flat, within 10 % once warm).

Traffic: ROOMS rooms of hs1 (ACL denying denied.test), one peer server joined to each
(Synapse handles one transaction per origin at a time, so parallelism needs origins).
Each worker sends its room's chained messages; among them every 10th transaction also
relays a message written by denied.test and carries a typing EDU, every 25th carries a
PDU of garbage, and every 50th comes from denied.test itself. An error is a transport
failure, a non-200 answer, or a per-PDU error for one of the peer's own messages; at the
end every own message the homeserver accepted must be in its database.
"""

from __future__ import annotations

import json
import os
import sqlite3
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

from proxy_addons.testbed.homeserver import ClientApi, free_port
from proxy_addons.testbed.peer import FederationPeer, PeerServer
from tests.bench.synapse import HOOK_TOKEN, homeserver, hook_module, start_modgud

SECONDS = float(os.environ.get("SOAK_SECONDS", "600"))
ROOMS = int(os.environ.get("SOAK_ROOMS", "4"))
PROBE_SECONDS = float(os.environ.get("SOAK_PROBE_SECONDS", "30"))
LOAD = float(os.environ.get("SOAK_LOAD", "0.8"))


class Worker:
    """One room, one origin: sends that room's transactions one after another."""

    def __init__(self, peer: FederationPeer, server: PeerServer, denied: PeerServer, room_id: str):
        self.peer, self.server, self.denied, self.room_id = peer, server, denied, room_id
        self.user = server.user("soak")
        self.sent = 0
        self.accepted: set[str] = set()  # IDs of the peer's own messages the homeserver took
        self.errors: list[str] = []
        self.latencies: list[float] = []

    def transaction(self, destination: str, address: str) -> None:
        i = self.sent
        self.sent += 1
        content = {"msgtype": "m.text", "body": f"soak {i} " + "x" * 100}
        own_id, own = self.peer.build_event(
            self.room_id, self.server, self.user, "m.room.message", content
        )
        pdus, edus = [own], []
        origin = self.server
        if i % 10 == 5:
            _, leak = self.peer.build_event(
                self.room_id,
                self.denied,
                self.denied.user("d"),
                "m.room.message",
                {"msgtype": "m.text", "body": f"leak {i}"},
                record=False,
            )
            pdus.append(leak)
            edus.append(
                {
                    "edu_type": "m.typing",
                    "content": {"room_id": self.room_id, "user_id": self.user, "typing": True},
                }
            )
        if i % 25 == 7:
            pdus.append({"type": "m.room.message", "room_id": self.room_id, "sender": 5})
        if i % 50 == 11:
            origin, pdus, edus, own_id = self.denied, [pdus[0]], [], ""
        started = time.perf_counter()
        try:
            answer = self.peer.send(origin, destination, address, pdus, edus)
        except OSError as e:
            self.errors.append(f"txn {i}: {e}")
            return
        self.latencies.append(time.perf_counter() - started)
        if answer.status != 200:
            self.errors.append(f"txn {i}: HTTP {answer.status} {str(answer.body)[:200]}")
        elif own_id and (answer.body or {}).get("pdus", {}).get(own_id):
            self.errors.append(f"txn {i}: own PDU refused: {answer.body['pdus'][own_id]}")
        elif own_id:
            self.accepted.add(own_id)

    def missing(self, database: Path) -> int:
        """Accepted messages of the peer's that are not in the homeserver's database."""
        conn = sqlite3.connect(f"file:{database}?mode=ro", uri=True)
        try:
            stored = {
                row[0]
                for row in conn.execute(
                    "SELECT event_id FROM events WHERE room_id = ? AND sender = ?",
                    (self.room_id, self.user),
                )
            }
        finally:
            conn.close()
        return len(self.accepted - stored)


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def cache_entries(metrics_port: int) -> dict[str, float]:
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5) as r:
        text = r.read().decode()
    return {
        sample.labels["cache"]: sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == "modgud_cache_entries"
    }


def run_workers(
    workers: list[Worker], destination: str, address: str, seconds: float, rate: float | None
) -> float:
    """Each worker sends for `seconds`: as fast as it can (rate None), or open loop at
    rate / len(workers) per second. Returns transactions per second achieved."""
    stop = time.monotonic() + seconds
    before = sum(w.sent for w in workers)

    def loop(worker: Worker) -> None:
        n, started = 0, time.monotonic()
        while time.monotonic() < stop:
            if rate is not None:
                due = started + n / (rate / len(workers))
                if due > time.monotonic():
                    time.sleep(min(due - time.monotonic(), max(0.0, stop - time.monotonic())))
                    if time.monotonic() >= stop:
                        break
            worker.transaction(destination, address)
            n += 1

    threads = [threading.Thread(target=loop, args=(w,)) for w in workers]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return (sum(w.sent for w in workers) - before) / seconds


def main() -> int:
    workdir = Path(tempfile.mkdtemp(prefix="modgud-soak-"))
    peer = FederationPeer(workdir / "peer", free_port())
    servers = [peer.add_server() for _ in range(ROOMS)]
    denied = peer.add_server("denied.test")
    peer.start()
    hs = homeserver(workdir, peer)
    modgud = None
    try:
        hs.start()
        _, token = hs.register_user("alice", admin=True)
        alice = ClientApi(hs.base_url, token)
        modgud, port, hook_port, metrics_port = start_modgud(workdir, hs, peer, token)
        hs.stop()
        hs.modules = [hook_module(hook_port, HOOK_TOKEN)]
        hs.start()
        address = f"127.0.0.1:{port}"
        workers = []
        for server in servers:
            room_id = alice.create_room(room_version="10")
            alice.send_state(
                room_id, "m.room.server_acl", "", {"allow": ["*"], "deny": ["denied.test"]}
            )
            peer.join(server, server.user("soak"), room_id, hs.server_name, address)
            workers.append(Worker(peer, server, denied, room_id))
        time.sleep(2)
        run_workers(workers, hs.server_name, address, 10, None)  # warm-up
        maximum = run_workers(workers, hs.server_name, address, PROBE_SECONDS, None)
        rate = maximum * LOAD
        print(
            f"maximum (closed loop, {ROOMS} origins): {maximum:.1f} txn/s; "
            f"soaking at {LOAD:.0%}: {rate:.1f} txn/s for {SECONDS:.0f} s",
            flush=True,
        )
        for w in workers:
            w.errors.clear()
            w.latencies.clear()
        samples: list[tuple[float, float]] = []
        done = threading.Event()

        def sample() -> None:
            started = time.monotonic()
            while not done.wait(10):
                samples.append((time.monotonic() - started, rss_mb(modgud.pid)))

        sampler = threading.Thread(target=sample)
        sampler.start()
        achieved = run_workers(workers, hs.server_name, address, SECONDS, rate)
        done.set()
        sampler.join()
        alive = modgud.poll() is None
        caches = cache_entries(metrics_port)
        time.sleep(2)
        lost = sum(w.missing(hs.workdir / "homeserver.db") for w in workers)
    finally:
        if modgud is not None:
            modgud.terminate()
            modgud.wait(15)
        hs.stop()
        peer.stop()
    errors = [e for w in workers for e in w.errors]
    latencies = sorted(x for w in workers for x in w.latencies)
    warm = [mb for t, mb in samples if t >= SECONDS / 4]
    growth = (max(warm) - min(warm)) / min(warm) if warm else 0.0
    print(f"achieved {achieved:.1f} txn/s, {len(latencies)} transactions")
    print(
        f"round trip p50 {statistics.median(latencies) * 1000:.1f} ms, "
        f"p99 {latencies[int(len(latencies) * 0.99) - 1] * 1000:.1f} ms"
    )
    print(f"errors: {len(errors)}" + "".join(f"\n  {e}" for e in errors[:20]))
    accepted = sum(len(w.accepted) for w in workers)
    print(f"the peer's messages accepted: {accepted}; missing from Synapse's database: {lost}")
    print(
        "modgud RSS (MB) every 10 s: "
        + ", ".join(f"{mb:.0f}" for _, mb in samples[:: max(1, len(samples) // 20)])
    )
    print(
        f"RSS from {SECONDS / 4:.0f} s on: {min(warm, default=0):.1f} to {max(warm, default=0):.1f} MB "
        f"({growth:.1%}; flat means <= 10 %); modgud still running: {alive}"
    )
    print(
        "cache entries at the end (each bounded; RSS grows while they fill): "
        + ", ".join(f"{k} {v:.0f}" for k, v in sorted(caches.items()))
    )
    result = {
        "maximum_tps": maximum,
        "rate": rate,
        "achieved_tps": achieved,
        "transactions": len(latencies),
        "errors": len(errors),
        "accepted": accepted,
        "missing": lost,
        "rss_growth": growth,
        "alive": alive,
    }
    print(json.dumps(result))
    return 0 if not errors and not lost and growth <= 0.10 and alive else 1


if __name__ == "__main__":
    sys.exit(main())
