"""The metrics listener (127.0.0.1 by default): /metrics from modgud's own registry, and
the two probes a load balancer or an orchestrator asks a replica:

- `/health` (alive): 200 while modgud's event loop turns — a heartbeat it stamps every
  second, older than HEARTBEAT_STALE_SECONDS means wedged (503); the listener has a
  thread of its own, so it answers even then, which is the point;
- `/ready` (send it traffic): 200 when the config is loaded, modgud is not stopping
  (after SIGTERM it answers the requests in flight and turns new ones away), the
  database answers and the homeserver (`upstream`) accepts a connection; else 503.
  Both say what they found as JSON; the database and upstream checks are cached for
  READY_CACHE_SECONDS so a probe every second costs one query and one connect.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import socket
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any
from urllib.parse import urlsplit
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import make_wsgi_app
from prometheus_client.exposition import ThreadingWSGIServer

from proxy_addons.database import DatabaseError, reading
from proxy_addons.runtime import Runtime, RuntimeHolder

__all__ = ["HEARTBEAT_STALE_SECONDS", "MetricsExporter", "Probes"]

logger = logging.getLogger(__name__)

HEARTBEAT_SECONDS = 1.0
HEARTBEAT_STALE_SECONDS = 10.0
READY_CACHE_SECONDS = 1.0
CHECK_TIMEOUT_SECONDS = 1.0

StartResponse = Callable[[str, list[tuple[str, str]]], Any]


class _Quiet(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base's name
        """Probes every second: not a line each in modgud's log."""


class Probes:
    """What /health and /ready answer, from modgud's runtime."""

    def __init__(self, holder: RuntimeHolder, clock: Callable[[], float] = time.monotonic):
        self.holder = holder
        self._clock = clock
        self.heartbeat = clock()
        self._cached: dict[str, tuple[float, str | None]] = {}
        self._lock = threading.Lock()

    def beat(self) -> None:
        self.heartbeat = self._clock()

    def health(self) -> tuple[bool, dict[str, Any]]:
        age = self._clock() - self.heartbeat
        return age <= HEARTBEAT_STALE_SECONDS, {"event_loop_seconds_since_beat": round(age, 3)}

    def ready(self) -> tuple[bool, dict[str, Any]]:
        runtime = self.holder.runtime
        if runtime is None:
            return False, {"config": "not loaded"}
        checks: dict[str, str] = {
            "config": "loaded",
            "stopping": "yes" if runtime.inflight.closing else "no",
        }
        for name, check in (("database", self._database), ("upstream", self._upstream)):
            problem = self._cached_check(name, runtime, check)
            checks[name] = problem or "ok"
        ok = checks["stopping"] == "no" and checks["database"] == checks["upstream"] == "ok"
        return ok, checks

    def _cached_check(
        self, name: str, runtime: Runtime, check: Callable[[Runtime], str | None]
    ) -> str | None:
        now = self._clock()
        with self._lock:
            hit = self._cached.get(name)
            if hit is not None and now - hit[0] < READY_CACHE_SECONDS:
                return hit[1]
        problem = check(runtime)
        with self._lock:
            self._cached[name] = (self._clock(), problem)
        return problem

    @staticmethod
    def _database(runtime: Runtime) -> str | None:
        try:
            with reading(runtime.config.database, timeout=CHECK_TIMEOUT_SECONDS) as conn:
                conn.one("SELECT 1")
        except DatabaseError as e:
            return str(e)
        return None

    @staticmethod
    def _upstream(runtime: Runtime) -> str | None:
        parts = urlsplit(runtime.config.upstream)
        host = parts.hostname or "127.0.0.1"
        port = parts.port or (443 if parts.scheme == "https" else 80)
        try:
            with socket.create_connection((host, port), timeout=CHECK_TIMEOUT_SECONDS):
                return None
        except OSError as e:
            return f"{host}:{port}: {e.strerror or e}"


class MetricsExporter:
    def __init__(self, holder: RuntimeHolder) -> None:
        self.holder = holder
        self.probes = Probes(holder)
        self._server: WSGIServer | None = None
        self._heartbeat: asyncio.Task[None] | None = None

    def running(self) -> None:
        runtime = self.holder.runtime
        if runtime is None or runtime.config.metrics is None or self._server is not None:
            return
        listen = runtime.config.metrics
        metrics = make_wsgi_app(runtime.metrics.registry)
        probes = self.probes

        def app(environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
            path = environ.get("PATH_INFO", "")
            if path in ("/health", "/ready"):
                ok, found = probes.health() if path == "/health" else probes.ready()
                body = json.dumps({"ok": ok, **found}).encode()
                start_response(
                    "200 OK" if ok else "503 Service Unavailable",
                    [("Content-Type", "application/json"), ("Cache-Control", "no-store")],
                )
                return [body]
            return metrics(environ, start_response)  # type: ignore[no-any-return]

        server = make_server(listen.host, listen.port, app, ThreadingWSGIServer, _Quiet)
        threading.Thread(target=server.serve_forever, name="modgud-metrics", daemon=True).start()
        self._server = server
        with contextlib.suppress(RuntimeError):  # no event loop: a test without one
            self._heartbeat = asyncio.get_running_loop().create_task(self._beat())
        logger.info("metrics on http://%s/metrics (probes: /health, /ready)", listen)

    async def _beat(self) -> None:
        while True:
            self.probes.beat()
            await asyncio.sleep(HEARTBEAT_SECONDS)

    def done(self) -> None:
        if self._heartbeat is not None:
            self._heartbeat.cancel()
            self._heartbeat = None
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
