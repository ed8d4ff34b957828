"""Request bodies too large to hold, through a real mitmproxy (`modgud run`) in front of a
stub homeserver that records what reaches it: mitmproxy buffers a request's whole body
before modgud's `request` hook, so these are dealt with at the headers
(`Enforcer.requestheaders`). No Synapse is needed: the question is what mitmproxy does with
the connection and which bytes reach the upstream."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from aiohttp import web

from proxy_addons.store import query_findings
from proxy_addons.testbed.homeserver import free_port
from proxy_addons.testbed.topology import _wait_port

pytestmark = pytest.mark.e2e

LIMIT = 65_536
SEND = "/_matrix/federation/v1/send/t1"
AUTH = 'X-Matrix origin="good.test",destination="hs.test",key="ed25519:k",sig="c2ln"'


class Upstream:
    """The homeserver stand-in: answers every request 200 and keeps (method, path, body
    SHA-256, body length) of each one it received whole."""

    def __init__(self) -> None:
        self.received: list[tuple[str, str, str, int]] = []

    async def handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        digest = hashlib.sha256(body).hexdigest()
        self.received.append((request.method, request.path, digest, len(body)))
        return web.json_response({"pdus": {}})


@contextlib.asynccontextmanager
async def modgud_before_stub(tmp_path: Path, mode: str) -> AsyncIterator[tuple[int, Upstream]]:
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
    )
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
    """Send the head, then `chunk` again and again; seconds until modgud closes the
    connection (fails the test after 10 s of sending)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    started = time.monotonic()
    try:
        writer.write(request_head)
        while time.monotonic() - started < 10:
            try:
                writer.write(chunk)
                await writer.drain()
                if await asyncio.wait_for(reader.read(1 << 16), 0.05) == b"":
                    return time.monotonic() - started
            except TimeoutError:
                continue
            except (ConnectionError, OSError):
                return time.monotonic() - started
        raise AssertionError("modgud kept reading a body over its limit")
    finally:
        writer.close()


async def exchange(port: int, request: bytes) -> bytes:
    """One whole request; the answer's status line and headers."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(request)
        await writer.drain()
        return await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 20)
    finally:
        writer.close()


def findings(database: Path, wanted: int) -> list[dict[str, object]]:
    deadline = time.monotonic() + 15
    rows: list[dict[str, object]] = []
    while time.monotonic() < deadline:
        rows = list(query_findings([str(database)])) if database.exists() else []
        if len(rows) >= wanted:
            break
        time.sleep(0.2)
    return rows


async def test_enforcing_closes_unread_what_it_cannot_hold_and_streams_what_it_does_not_check(
    tmp_path,
):
    async with modgud_before_stub(tmp_path, "enforce") as (port, upstream):
        # A /send declaring 100 MB, and one chunked without end: the connection is closed
        # while the sender is still sending, nothing reaches the homeserver.
        huge = head("PUT", SEND, "Content-Length: 104857600", "Content-Type: application/json")
        assert await closed_while_sending(port, huge, b"x" * 65536) < 10
        chunked = head("PUT", SEND, "Transfer-Encoding: chunked")
        assert await closed_while_sending(port, chunked, b"10000\r\n" + b"y" * 65536 + b"\r\n") < 10
        assert upstream.received == []
        # A body over the limit on a path modgud does not check reaches the homeserver whole.
        body = b'{"pad": "' + b"z" * (4 * LIMIT) + b'"}'
        key_query = head("POST", "/_matrix/key/v2/query", f"Content-Length: {len(body)}")
        assert (await exchange(port, key_query + body)).startswith(b"HTTP/1.1 200")
        # And a /send within the limit is checked and forwarded as ever.
        small = b'{"origin": "good.test", "pdus": [], "edus": []}'
        send = head("PUT", SEND, f"Content-Length: {len(small)}")
        assert (await exchange(port, send + small)).startswith(b"HTTP/1.1 200")
        assert upstream.received == [
            ("POST", "/_matrix/key/v2/query", hashlib.sha256(body).hexdigest(), len(body)),
            ("PUT", SEND, hashlib.sha256(small).hexdigest(), len(small)),
        ]
    rows = findings(tmp_path / "enforce.db", 2)
    assert sorted(r["action"] for r in rows) == ["rejected", "rejected"]
    details = " | ".join(str(r["detail"]) for r in rows)
    assert "of 104857600 bytes is over the 65536-byte limit; connection closed unread" in details
    assert "of undeclared length (chunked or unbounded); connection closed unread" in details
    assert all(r["attributed_to"] is None for r in rows)


async def test_auditing_streams_an_oversized_body_to_the_homeserver_unread(tmp_path):
    async with modgud_before_stub(tmp_path, "audit") as (port, upstream):
        body = b'{"origin": "good.test", "pdus": [], "pad": "' + b"p" * (16 * LIMIT) + b'"}'
        send = head("PUT", SEND, f"Content-Length: {len(body)}")
        assert (await exchange(port, send + body)).startswith(b"HTTP/1.1 200")
        assert upstream.received == [("PUT", SEND, hashlib.sha256(body).hexdigest(), len(body))]
    (row,) = findings(tmp_path / "audit.db", 1)
    assert row["action"] == "flagged"
    assert "over the 65536-byte limit; streamed to the homeserver unread" in str(row["detail"])
