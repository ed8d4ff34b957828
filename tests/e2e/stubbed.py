"""A real `modgud run` in front of a stub homeserver that records what reaches it and
answers as told. For what a real Synapse cannot be made to do on demand (answer 5xx) or
does not matter for (what mitmproxy does with a connection, which bytes reach the
upstream)."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

from aiohttp import web

from proxy_addons.store import query_findings
from proxy_addons.testbed.homeserver import free_port
from proxy_addons.testbed.topology import _wait_port

ROOM = "!room:hs.test"
ROOM_STATE = {
    "state": [
        {"type": "m.room.create", "state_key": "", "content": {"room_version": "10"}},
        {
            "type": "m.room.server_acl",
            "state_key": "",
            "event_id": "$acl",
            "content": {"allow": ["*"], "deny": ["denied.test"]},
        },
    ]
}
LIMIT = 65_536  # max_body_bytes: the smallest modgud accepts
SEND = "/_matrix/federation/v1/send/t1"
AUTH = 'X-Matrix origin="good.test",destination="hs.test",key="ed25519:k",sig="c2ln"'


class Upstream:
    """The homeserver stand-in: serves ROOM's state on the admin API (counted in
    `state_requests`), answers any other request with the next of `statuses` (then 200)
    and keeps (method, path, body SHA-256, body length) of each it received whole."""

    def __init__(self) -> None:
        self.received: list[tuple[str, str, str, int]] = []
        self.statuses: list[int] = []
        self.state_requests = 0

    async def handle(self, request: web.Request) -> web.Response:
        if request.path.startswith("/_synapse/admin/v1/rooms/"):
            self.state_requests += 1
            return web.json_response(ROOM_STATE)
        body = await request.read()
        digest = hashlib.sha256(body).hexdigest()
        self.received.append((request.method, request.path, digest, len(body)))
        status = self.statuses.pop(0) if self.statuses else 200
        if status != 200:
            error = {"errcode": "M_UNKNOWN", "error": f"stub answered {status}"}
            return web.json_response(error, status=status)
        return web.json_response({"pdus": {}})


@contextlib.asynccontextmanager
async def modgud_before_stub(
    tmp_path: Path, mode: str, extra: str = ""
) -> AsyncIterator[tuple[int, Upstream]]:
    upstream = Upstream()
    app = web.Application(client_max_size=64 * 1024 * 1024)
    app.router.add_route("*", "/{tail:.*}", upstream.handle)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    stub = free_port()
    await web.TCPSite(runner, "127.0.0.1", stub).start()
    port = free_port()
    config = tmp_path / f"{mode}.yaml"
    config.write_text(
        f"server_name: hs.test\nupstream: http://127.0.0.1:{stub}\nmode: {mode}\n"
        f"listen: {{inbound: '127.0.0.1:{port}', metrics: '127.0.0.1:{free_port()}'}}\n"
        f"max_body_bytes: {LIMIT}\nverify_signatures: false\ndatabase: {tmp_path / mode}.db\n"
        f"homeserver: {{access_token_file: admin.token}}\n" + extra
    )
    (tmp_path / "admin.token").write_text("stub")
    log = tmp_path / f"{mode}.log"
    process = start_modgud(config, log)
    try:
        assert await asyncio.to_thread(_wait_port, port, 30), log.read_text()
        yield port, upstream
    finally:
        process.terminate()
        await asyncio.to_thread(process.wait, 15)
        await runner.cleanup()


def start_modgud(config: Path, log: Path) -> subprocess.Popen[bytes]:
    modgud = Path(sys.executable).with_name("modgud")
    with log.open("wb") as out:  # the child keeps its own copy of the descriptor
        return subprocess.Popen(
            [str(modgud), "run", "--config", str(config)], stdout=out, stderr=subprocess.STDOUT
        )


def head(method: str, path: str, *headers: str) -> bytes:
    lines = [f"{method} {path} HTTP/1.1", "Host: hs.test", f"Authorization: {AUTH}", *headers]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


async def closed_while_sending(port: int, request_head: bytes, chunk: bytes) -> float:
    """Send the head, then `chunk` again and again; seconds until modgud shows it reads no
    more of the body: it closes the connection, or it leaves the sender's writes stalled
    for 2 s (mitmproxy does not always close a killed flow's socket at once; the kernel's
    buffer, not modgud, then holds what was sent). Fails after 10 s of sending read."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    started = time.monotonic()
    try:
        writer.write(request_head)
        while time.monotonic() - started < 10:
            try:
                if await asyncio.wait_for(reader.read(1 << 16), 0.05) == b"":
                    return time.monotonic() - started
            except TimeoutError:
                pass
            except (ConnectionError, OSError):
                return time.monotonic() - started
            try:
                writer.write(chunk)
                await asyncio.wait_for(writer.drain(), 2)
            except TimeoutError:
                return time.monotonic() - started
            except (ConnectionError, OSError):
                return time.monotonic() - started
        raise AssertionError("modgud kept reading a body over its limit")
    finally:
        writer.close()


async def exchange(port: int, request: bytes) -> bytes:
    """One whole request; the answer's status line and headers."""
    return (await exchange_whole(port, request))[0]


async def exchange_whole(port: int, request: bytes) -> tuple[bytes, bytes]:
    """One whole request; the answer's status line and headers, and its body."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(request)
        await writer.drain()
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 20)
        length = next(
            int(line.split(b":", 1)[1])
            for line in head.split(b"\r\n")
            if line.lower().startswith(b"content-length:")
        )
        return head, await asyncio.wait_for(reader.readexactly(length), 20)
    finally:
        writer.close()


def send_request(body: object, txn: str = "t1") -> bytes:
    """A PUT /send of `body` (JSON), with an X-Matrix header modgud parses (signatures
    are not verified in these tests)."""
    data = json.dumps(body).encode()
    path = f"/_matrix/federation/v1/send/{txn}"
    return head("PUT", path, f"Content-Length: {len(data)}") + data


def findings(database: Path, wanted: int) -> list[dict[str, object]]:
    deadline = time.monotonic() + 15
    rows: list[dict[str, object]] = []
    while time.monotonic() < deadline:
        rows = list(query_findings([str(database)])) if database.exists() else []
        if len(rows) >= wanted:
            break
        time.sleep(0.2)
    return rows
