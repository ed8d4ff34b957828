"""Real Synapse homeservers as subprocesses, for end-to-end tests and the demo.

Runs Synapse from its own virtualenv (MODGUD_SYNAPSE_PYTHON, else .venv-synapse); never
imports synapse. Everything here is synchronous and talks to Synapse over loopback.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import secrets
import shutil
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import quote, urlsplit

import yaml
from signedjson.key import read_signing_keys

__all__ = [
    "ClientApi",
    "ClientError",
    "Redis",
    "SynapseHomeserver",
    "free_port",
    "read_signing_key",
    "self_signed_certificate",
    "stop_process",
    "synapse_python",
]

REPO = Path(__file__).resolve().parents[2]
T = TypeVar("T")

_RATE = {"per_second": 10000, "burst_count": 100000}
RATE_LIMITS: dict[str, Any] = {
    "rc_message": _RATE,
    "rc_registration": _RATE,
    "rc_login": {"address": _RATE, "account": _RATE, "failed_attempts": _RATE},
    "rc_admin_redaction": _RATE,
    "rc_joins": {"local": _RATE, "remote": _RATE},
    "rc_joins_per_room": _RATE,
    "rc_invites": {"per_room": _RATE, "per_user": _RATE, "per_sender": _RATE},
    "rc_3pid_validation": _RATE,
    "rc_federation": {
        "window_size": 1000,
        "sleep_limit": 1000,
        "sleep_delay": 0,
        "reject_limit": 10000,
        "concurrent": 100,
    },
    "rc_presence": {"per_user": _RATE},
    "rc_room_creation": _RATE,
    "rc_reports": _RATE,
    "rc_delayed_event_mgmt": _RATE,
}


def synapse_python() -> str:
    return os.environ.get("MODGUD_SYNAPSE_PYTHON") or str(REPO / ".venv-synapse" / "bin" / "python")


def stop_process(process: subprocess.Popen[bytes] | None, timeout: float = 10.0) -> None:
    """SIGTERM, and SIGKILL when it has not exited after `timeout` seconds."""
    if process is None or process.poll() is not None:
        return
    process.terminate()
    try:
        process.wait(timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(5)


def _port_range() -> tuple[int, int]:
    """12,000 ports just below the kernel's ephemeral range: [low, top)."""
    try:
        top = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        top = 32768
    return max(1024, top - 12000), top


_handed_out: set[int] = set()


def free_port() -> int:
    """A loopback port nothing listens on, for a server started a moment later.

    Taken below the kernel's ephemeral range: a port the kernel hands out for bind(0) can
    be handed out again as the source port of any outgoing connection before our server
    binds it (seen in CI: "Address already in use" for the metrics listener). Ports below
    the range are only taken by whoever binds them, and none is handed out twice here.
    """
    low, top = _port_range()
    start = secrets.randbelow(top - low)
    for i in range(top - low):
        port = low + (start + i) % (top - low)
        if port in _handed_out:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        _handed_out.add(port)
        return port
    raise RuntimeError(f"no free loopback port between {low} and {top}")


def read_signing_key(path: Path) -> Any:
    with open(path) as f:
        return read_signing_keys(f)[0]


def self_signed_certificate(workdir: Path) -> tuple[Path, Path]:
    """A throwaway certificate and key for a loopback TLS listener."""
    cert, key = workdir / "tls.crt", workdir / "tls.key"
    subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-subj",
            "/CN=localhost",
            "-days",
            "30",
            "-keyout",
            str(key),
            "-out",
            str(cert),
        ],
        check=True,
        capture_output=True,
    )
    return cert, key


class ClientError(Exception):
    def __init__(self, status: int, body: str, what: str) -> None:
        super().__init__(f"{what}: HTTP {status}: {body[:500]}")
        self.status = status
        self.body = body


def _request(method: str, url: str, body: object | None = None, token: str | None = None) -> Any:
    data = json.dumps(body).encode() if body is not None else None
    headers = {"Content-Type": "application/json"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    request = urllib.request.Request(url, data=data, method=method, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=60) as resp:
            raw = resp.read()
    except urllib.error.HTTPError as e:
        raise ClientError(e.code, e.read().decode(errors="replace"), f"{method} {url}") from None
    return json.loads(raw) if raw else None


def wait_for[T](
    predicate: Callable[[], T], timeout: float = 30.0, interval: float = 0.25
) -> T | None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            value = predicate()
        except ClientError:
            value = None  # type: ignore[assignment]
        if value:
            return value
        if time.monotonic() > deadline:
            return None
        time.sleep(interval)


class Redis:
    """A redis-server of its own on loopback (Debian's package), no persistence: what
    Synapse's workers replicate through."""

    def __init__(self, workdir: Path, port: int) -> None:
        self.workdir = Path(workdir)
        self.port = port
        self.process: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 15.0) -> Redis:
        binary = shutil.which("redis-server") or "/usr/bin/redis-server"
        if not Path(binary).exists():
            raise RuntimeError("redis-server is not installed (make deps; Debian: redis-server)")
        self.workdir.mkdir(parents=True, exist_ok=True)
        out = open(self.workdir / "redis.log", "wb")  # noqa: SIM115 - lives with the process
        self.process = subprocess.Popen(
            [
                binary,
                *("--port", str(self.port), "--bind", "127.0.0.1"),
                *("--save", "", "--appendonly", "no", "--dir", str(self.workdir)),
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(
                    "redis-server exited: " + (self.workdir / "redis.log").read_text()
                )
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", self.port)) == 0:
                    return self
            time.sleep(0.1)
        self.stop()
        raise RuntimeError("redis-server did not start")

    def stop(self) -> None:
        stop_process(self.process)


class SynapseHomeserver:
    def __init__(
        self,
        workdir: Path,
        server_name: str,
        *,
        http_port: int,
        tls_port: int | None = None,
        modules: list[dict[str, Any]] | None = None,
        extra_config: dict[str, Any] | None = None,
        metrics_port: int | None = None,
        database_url: str | None = None,
        federation_worker: Redis | None = None,
    ) -> None:
        """`metrics_port`: a metrics listener (Synapse's and its modules' metrics).
        `database_url`: Synapse on PostgreSQL (postgresql://user@host:port/db, the
        database made with the C locale Synapse asks for), else SQLite.
        `federation_worker`: a federation-inbound worker (`synapse.app.generic_worker`
        serving the federation API on `worker_port`) beside the main process, which
        then serves the client API and replication; Synapse's workers replicate through
        this Redis. Modules load in both processes."""
        if federation_worker is not None and database_url is None:
            raise ValueError("Synapse's workers need PostgreSQL")
        self.workdir = Path(workdir)
        self.metrics_port = metrics_port
        self.database_url = database_url
        self.redis = federation_worker
        self.worker_port = free_port() if federation_worker is not None else None
        self.replication_port = free_port() if federation_worker is not None else None
        self.worker: subprocess.Popen[bytes] | None = None
        self.server_name = server_name
        self.http_port = http_port
        self.tls_port = tls_port
        self.modules = modules or []
        self.extra_config = extra_config or {}
        self.shared_secret = secrets.token_hex(16)
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def federation_url(self) -> str:
        """Where federation requests go: the federation worker, else the main process."""
        port = self.worker_port if self.worker_port is not None else self.http_port
        return f"http://127.0.0.1:{port}"

    @property
    def signing_key_path(self) -> Path:
        return self.workdir / f"{self.server_name}.signing.key"

    def _configure(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        subprocess.run(
            [
                synapse_python(),
                "-m",
                "synapse.app.homeserver",
                "--server-name",
                self.server_name,
                "--config-path",
                "hs.yaml",
                "--generate-config",
                "--report-stats=no",
            ],
            cwd=self.workdir,
            check=True,
            capture_output=True,
        )
        config = yaml.safe_load((self.workdir / "hs.yaml").read_text())
        listeners: list[dict[str, Any]] = [
            {
                "port": self.http_port,
                "bind_addresses": ["127.0.0.1"],
                "type": "http",
                "tls": False,
                "x_forwarded": False,
                "resources": [{"names": ["client", "federation"], "compress": False}],
            }
        ]
        if self.tls_port is not None:
            cert, key = self_signed_certificate(self.workdir)
            listeners.append(
                {
                    "port": self.tls_port,
                    "bind_addresses": ["127.0.0.1"],
                    "type": "http",
                    "tls": True,
                    "resources": [{"names": ["federation"], "compress": False}],
                }
            )
            config["tls_certificate_path"] = str(cert)
            config["tls_private_key_path"] = str(key)
        if self.metrics_port is not None:
            listeners.append(
                {"port": self.metrics_port, "bind_addresses": ["127.0.0.1"], "type": "metrics"}
            )
        log_config = self.workdir / "log.yaml"
        log_config.write_text(
            yaml.safe_dump(
                {
                    "version": 1,
                    "formatters": {
                        "precise": {
                            "format": "%(asctime)s - %(name)s - %(levelname)s - %(request)s - %(message)s"
                        }
                    },
                    "handlers": {
                        "file": {
                            "class": "logging.FileHandler",
                            "formatter": "precise",
                            "filename": str(self.workdir / "homeserver.log"),
                        }
                    },
                    "root": {"level": "INFO", "handlers": ["file"]},
                    "disable_existing_loggers": False,
                }
            )
        )
        database: dict[str, Any] = {
            "name": "sqlite3",
            "args": {"database": str(self.workdir / "homeserver.db")},
        }
        if self.database_url is not None:
            parts = urlsplit(self.database_url)
            database = {
                "name": "psycopg2",
                "args": {
                    "user": parts.username or "postgres",
                    "host": parts.hostname or "127.0.0.1",
                    "port": parts.port or 5432,
                    "database": parts.path.lstrip("/"),
                    "cp_min": 1,
                    "cp_max": 5,
                },
            }
        if self.redis is not None:
            assert self.replication_port is not None
            listeners.append(
                {
                    "port": self.replication_port,
                    "bind_addresses": ["127.0.0.1"],
                    "type": "http",
                    "resources": [{"names": ["replication"]}],
                }
            )
            config["redis"] = {"enabled": True, "host": "127.0.0.1", "port": self.redis.port}
            config["instance_map"] = {"main": {"host": "127.0.0.1", "port": self.replication_port}}
            self._write_worker_config(log_config)
        config.update(
            {
                "database": database,
                "listeners": listeners,
                "log_config": str(log_config),
                "federation_verify_certificates": False,
                "federation_ip_range_blacklist": [],
                "ip_range_whitelist": ["127.0.0.0/8"],
                "trusted_key_servers": [],
                "suppress_key_server_warning": True,
                "registration_shared_secret": self.shared_secret,
                "enable_registration": False,
                "report_stats": False,
                "presence": {"enabled": True},
                "enable_metrics": self.metrics_port is not None,
                "modules": self.modules,
                **RATE_LIMITS,
            }
        )
        config.update(self.extra_config)
        (self.workdir / "hs.yaml").write_text(yaml.safe_dump(config))

    def _write_worker_config(self, log_config: Path) -> None:
        worker_log = self.workdir / "log-worker.yaml"
        worker_log.write_text(
            log_config.read_text().replace("homeserver.log", "worker.log")
            if log_config.exists()
            else ""
        )
        (self.workdir / "worker.yaml").write_text(
            yaml.safe_dump(
                {
                    "worker_app": "synapse.app.generic_worker",
                    "worker_name": "federation_inbound1",
                    "worker_listeners": [
                        {
                            "type": "http",
                            "port": self.worker_port,
                            "bind_addresses": ["127.0.0.1"],
                            "resources": [{"names": ["federation"], "compress": False}],
                        }
                    ],
                    "worker_log_config": str(worker_log),
                }
            )
        )

    def start(self, timeout: float = 90.0) -> None:
        self._configure()
        self.process = self._spawn(["synapse.app.homeserver", "-c", "hs.yaml"], "stdout.log")
        self._wait_until_up(self.process, f"{self.base_url}/_matrix/client/versions", timeout)
        if self.worker_port is not None:
            self.worker = self._spawn(
                ["synapse.app.generic_worker", "-c", "hs.yaml", "-c", "worker.yaml"],
                "worker-stdout.log",
            )
            probe = f"{self.federation_url}/_matrix/federation/v1/version"
            self._wait_until_up(self.worker, probe, timeout)

    def _spawn(self, args: list[str], log: str) -> subprocess.Popen[bytes]:
        out = open(self.workdir / log, "wb")  # noqa: SIM115 - lives with the process
        return subprocess.Popen(
            [synapse_python(), "-m", *args], cwd=self.workdir, stdout=out, stderr=subprocess.STDOUT
        )

    def _wait_until_up(self, process: subprocess.Popen[bytes], url: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if process.poll() is not None:
                self.stop()
                raise RuntimeError(f"Synapse {self.server_name} exited:\n{self.log_tail()}")
            try:
                _request("GET", url)
                return
            except (OSError, ClientError):
                time.sleep(0.2)
        self.stop()
        raise RuntimeError(
            f"Synapse {self.server_name} did not start in {timeout} s:\n{self.log_tail()}"
        )

    def restart(self) -> None:
        """Stop and start again (config and database kept), as an operator restarts it
        after changing a module's configuration."""
        self.stop()
        self.start()

    def metrics_text(self) -> str:
        assert self.metrics_port is not None, "started without a metrics listener"
        url = f"http://127.0.0.1:{self.metrics_port}/_synapse/metrics"
        with urllib.request.urlopen(url, timeout=10) as r:
            return str(r.read().decode())

    def stop(self) -> None:
        for process in (self.worker, self.process):
            stop_process(process)

    def __enter__(self) -> SynapseHomeserver:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def log_tail(self, n: int = 40) -> str:
        parts = []
        for name in ("homeserver.log", "stdout.log", "worker.log", "worker-stdout.log"):
            path = self.workdir / name
            if path.exists():
                lines = path.read_text(errors="replace").splitlines()[-n:]
                parts.append(f"--- {name}\n" + "\n".join(lines))
        return "\n".join(parts)

    def register_user(self, localpart: str, admin: bool = False) -> tuple[str, str]:
        url = f"{self.base_url}/_synapse/admin/v1/register"
        nonce = _request("GET", url)["nonce"]
        password = secrets.token_hex(8)
        mac = hmac.new(self.shared_secret.encode(), digestmod=hashlib.sha1)
        mac.update(
            b"\x00".join(
                [
                    nonce.encode(),
                    localpart.encode(),
                    password.encode(),
                    b"admin" if admin else b"notadmin",
                ]
            )
        )
        body = {
            "nonce": nonce,
            "username": localpart,
            "password": password,
            "admin": admin,
            "mac": mac.hexdigest(),
        }
        result = _request("POST", url, body)
        return result["user_id"], result["access_token"]


class ClientApi:
    """A few Client-Server API calls, enough for tests and the demo."""

    def __init__(self, base_url: str, access_token: str) -> None:
        self.base_url = base_url
        self.token = access_token

    def _call(self, method: str, path: str, body: object | None = None) -> Any:
        return _request(method, f"{self.base_url}/_matrix/client/v3{path}", body, self.token)

    def create_room(
        self,
        room_version: str | None = None,
        preset: str = "public_chat",
        name: str | None = None,
        initial_state: list[Any] | None = None,
        power_levels: dict[str, Any] | None = None,
    ) -> str:
        body: dict[str, Any] = {"preset": preset}
        if power_levels:
            body["power_level_content_override"] = power_levels
        if room_version:
            body["room_version"] = room_version
        if name:
            body["name"] = name
        if initial_state:
            body["initial_state"] = initial_state
        return str(self._call("POST", "/createRoom", body)["room_id"])

    def join(self, room_id: str, via: list[str] | None = None) -> str:
        query = "".join(
            f"{'&' if i else '?'}server_name={quote(s, safe='')}" for i, s in enumerate(via or [])
        )
        return str(self._call("POST", f"/join/{quote(room_id, safe='')}{query}", {})["room_id"])

    def send_event(self, room_id: str, event_type: str, content: dict[str, Any]) -> str:
        txn = secrets.token_hex(8)
        path = f"/rooms/{quote(room_id, safe='')}/send/{quote(event_type, safe='')}/{txn}"
        return str(self._call("PUT", path, content)["event_id"])

    def knock(self, room_id: str, via: list[str]) -> None:
        query = "".join(
            f"{'&' if i else '?'}server_name={quote(s, safe='')}" for i, s in enumerate(via)
        )
        self._call("POST", f"/knock/{quote(room_id, safe='')}{query}", {})

    def upgrade(self, room_id: str, new_version: str) -> str:
        body = {"new_version": new_version}
        return str(
            self._call("POST", f"/rooms/{quote(room_id, safe='')}/upgrade", body)[
                "replacement_room"
            ]
        )

    def leave(self, room_id: str) -> None:
        self._call("POST", f"/rooms/{quote(room_id, safe='')}/leave", {})

    def invite(self, room_id: str, user_id: str) -> None:
        self._call("POST", f"/rooms/{quote(room_id, safe='')}/invite", {"user_id": user_id})

    def send_message(self, room_id: str, body: str) -> str:
        txn = secrets.token_hex(8)
        content = {"msgtype": "m.text", "body": body}
        return str(
            self._call(
                "PUT", f"/rooms/{quote(room_id, safe='')}/send/m.room.message/{txn}", content
            )["event_id"]
        )

    def redact(self, room_id: str, event_id: str, reason: str | None = None) -> str:
        txn = secrets.token_hex(8)
        body = {"reason": reason} if reason else {}
        path = f"/rooms/{quote(room_id, safe='')}/redact/{quote(event_id, safe='')}/{txn}"
        return str(self._call("PUT", path, body)["event_id"])

    def send_state(
        self, room_id: str, event_type: str, state_key: str, content: dict[str, Any]
    ) -> str:
        path = f"/rooms/{quote(room_id, safe='')}/state/{quote(event_type, safe='')}/{quote(state_key, safe='')}"
        return str(self._call("PUT", path, content)["event_id"])

    def get_state(
        self, room_id: str, event_type: str, state_key: str = ""
    ) -> dict[str, Any] | None:
        path = f"/rooms/{quote(room_id, safe='')}/state/{quote(event_type, safe='')}/{quote(state_key, safe='')}"
        try:
            return self._call("GET", path)  # type: ignore[no-any-return]
        except ClientError as e:
            if e.status in (403, 404):
                return None
            raise

    def room_state(self, room_id: str) -> list[dict[str, Any]]:
        return self._call("GET", f"/rooms/{quote(room_id, safe='')}/state")  # type: ignore[no-any-return]

    def messages(self, room_id: str, limit: int = 100) -> list[dict[str, Any]]:
        result = self._call("GET", f"/rooms/{quote(room_id, safe='')}/messages?dir=b&limit={limit}")
        return list(result.get("chunk", []))

    def joined_members(self, room_id: str) -> list[str]:
        result = self._call("GET", f"/rooms/{quote(room_id, safe='')}/joined_members")
        return list(result.get("joined", {}))

    def typing(self, room_id: str, user_id: str, typing: bool = True) -> None:
        path = f"/rooms/{quote(room_id, safe='')}/typing/{quote(user_id, safe='')}"
        self._call(
            "PUT", path, {"typing": typing, "timeout": 30000} if typing else {"typing": False}
        )

    def receipt(self, room_id: str, event_id: str) -> None:
        self._call(
            "POST",
            f"/rooms/{quote(room_id, safe='')}/receipt/m.read/{quote(event_id, safe='')}",
            {},
        )

    def wait_for(
        self, predicate: Callable[[], T], timeout: float = 30.0, interval: float = 0.25
    ) -> T | None:
        return wait_for(predicate, timeout, interval)

    def wait_for_message(
        self, room_id: str, body: str, timeout: float = 30.0
    ) -> dict[str, Any] | None:
        def find() -> dict[str, Any] | None:
            for event in self.messages(room_id):
                if (
                    event.get("type") == "m.room.message"
                    and event.get("content", {}).get("body") == body
                ):
                    return event
            return None

        return wait_for(find, timeout)
