"""Request bodies too large to hold, through a real mitmproxy (`modgud run`) in front of a
stub homeserver that records what reaches it: mitmproxy buffers a request's whole body
before modgud's `request` hook, so these are dealt with at the headers
(`Enforcer.requestheaders`). No Synapse is needed: the question is what mitmproxy does with
the connection and which bytes reach the upstream."""

from __future__ import annotations

import hashlib

import pytest

from tests.e2e.stubbed import (
    LIMIT,
    SEND,
    closed_while_sending,
    exchange,
    findings,
    head,
    modgud_before_stub,
)

pytestmark = pytest.mark.e2e


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
