"""The metrics listener's probes for a load balancer: /health (the event loop turns) and
/ready (config loaded, not stopping, database and homeserver reachable)."""

from __future__ import annotations

import asyncio
import json
import socket
import urllib.error
import urllib.request

import pytest

from proxy_addons import exporter as exporter_module
from proxy_addons.exporter import HEARTBEAT_STALE_SECONDS, MetricsExporter
from proxy_addons.testbed.homeserver import free_port


def get(port: int, path: str) -> tuple[int, dict | str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as r:
            body = r.read().decode()
            status = r.status
    except urllib.error.HTTPError as e:
        body, status = e.read().decode(), e.code
    return status, json.loads(body) if path != "/metrics" else body


@pytest.fixture
def upstream():
    """A homeserver's port that accepts connections (nothing is said on it)."""
    server = socket.create_server(("127.0.0.1", 0))
    yield server.getsockname()[1]
    server.close()


@pytest.fixture
def serve(make_runtime, monkeypatch):
    monkeypatch.setattr(exporter_module, "READY_CACHE_SECONDS", 0.0)
    started = []

    async def start(upstream_port: int) -> tuple[MetricsExporter, int]:
        port = free_port()
        holder = make_runtime(extra=f"listen: {{metrics: '127.0.0.1:{port}'}}\n")
        object.__setattr__(holder.runtime.config, "upstream", f"http://127.0.0.1:{upstream_port}")
        exporter = MetricsExporter(holder)
        exporter.running()
        started.append(exporter)
        await asyncio.sleep(0)  # the heartbeat's first beat
        return exporter, port

    yield start
    for exporter in started:
        exporter.done()


async def test_ready_when_the_database_and_the_homeserver_answer(serve, upstream):
    exporter, port = await serve(upstream)
    status, body = await asyncio.to_thread(get, port, "/ready")
    assert status == 200, body
    assert body == {
        "ok": True,
        "config": "loaded",
        "stopping": "no",
        "database": "ok",
        "upstream": "ok",
    }
    status, metrics = await asyncio.to_thread(get, port, "/metrics")
    assert status == 200 and "modgud_build_info" in metrics


async def test_not_ready_without_the_homeserver(serve):
    closed = free_port()
    _, port = await serve(closed)
    status, body = await asyncio.to_thread(get, port, "/ready")
    assert status == 503 and not body["ok"]
    assert body["upstream"].startswith(f"127.0.0.1:{closed}:") and body["database"] == "ok"


async def test_not_ready_without_the_database(serve, upstream, tmp_path):
    exporter, port = await serve(upstream)
    config = exporter.holder.runtime.config
    object.__setattr__(config, "database", str(tmp_path / "gone" / "m.db"))
    status, body = await asyncio.to_thread(get, port, "/ready")
    assert status == 503 and body["database"].startswith("SQLite database")


async def test_not_ready_while_stopping(serve, upstream):
    """After SIGTERM modgud answers what is in flight and turns new requests away: the
    load balancer must send them to another replica."""
    exporter, port = await serve(upstream)
    await exporter.holder.runtime.inflight.drain(0)
    status, body = await asyncio.to_thread(get, port, "/ready")
    assert (status, body["stopping"]) == (503, "yes")


async def test_health_follows_the_event_loop(serve, upstream):
    """The listener has a thread of its own: a wedged event loop (no heartbeat) answers
    503 on /health while the loop itself cannot answer anything."""
    exporter, port = await serve(upstream)
    status, body = await asyncio.to_thread(get, port, "/health")
    assert status == 200 and body["ok"]
    exporter._heartbeat.cancel()  # the loop stops turning, as if wedged
    exporter.probes.heartbeat -= HEARTBEAT_STALE_SECONDS + 1
    status, body = await asyncio.to_thread(get, port, "/health")
    assert status == 503 and body["event_loop_seconds_since_beat"] > HEARTBEAT_STALE_SECONDS
