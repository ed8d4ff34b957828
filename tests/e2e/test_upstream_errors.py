"""A homeserver answering 5xx, through a real `modgud run`. A stub stands in for the
homeserver: a real Synapse cannot be made to answer 5xx on demand (a stopped or frozen one
is tested in test_faults.py). modgud never rewrites the homeserver's answers to inbound
requests, so the sender sees the 5xx itself and retries, and the retry goes through."""

from __future__ import annotations

import hashlib
import json

import pytest

from tests.e2e.stubbed import ROOM, exchange_whole, findings, modgud_before_stub, send_request

pytestmark = pytest.mark.e2e

MESSAGE = {
    "room_id": ROOM,
    "sender": "@alice:good.test",
    "type": "m.room.message",
    "content": {"msgtype": "m.text", "body": "through a 5xx"},
    "origin_server_ts": 1_700_000_000_000,
    "depth": 5,
    "prev_events": ["$prev"],
    "auth_events": ["$create"],
    "hashes": {"sha256": "c29tZWhhc2g"},
    "signatures": {},
}


@pytest.mark.parametrize("on_error", ["open", "closed"])
async def test_a_homeserver_5xx_reaches_the_sender_unchanged_and_the_retry_lands(
    tmp_path, on_error
):
    transaction = {"origin": "good.test", "origin_server_ts": 1, "pdus": [MESSAGE], "edus": []}
    request = send_request(transaction)
    body = request.split(b"\r\n\r\n", 1)[1]
    async with modgud_before_stub(tmp_path, "enforce", f"on_error: {on_error}\n") as (
        port,
        upstream,
    ):
        upstream.statuses = [500, 502]
        answers = [await exchange_whole(port, request) for _ in range(3)]
        statuses = [head.split(b" ", 2)[1] for head, _ in answers]
        assert statuses == [b"500", b"502", b"200"]
        # The homeserver's own answers, byte for byte (not modgud's refusal or retry-later).
        assert json.loads(answers[0][1]) == {"errcode": "M_UNKNOWN", "error": "stub answered 500"}
        assert json.loads(answers[1][1]) == {"errcode": "M_UNKNOWN", "error": "stub answered 502"}
        assert json.loads(answers[2][1]) == {"pdus": {}}
        # Each attempt was checked and forwarded untouched; the room's state fetched once.
        sent = (
            "PUT",
            "/_matrix/federation/v1/send/t1",
            hashlib.sha256(body).hexdigest(),
            len(body),
        )
        assert upstream.received == [sent] * 3
        assert upstream.state_requests == 1
    assert findings(tmp_path / "enforce.db", 0) == []
