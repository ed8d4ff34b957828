"""Requests and answers for the addon fuzz tests, as raw as the wire gives them: method,
path, header and body bytes, with valid, near-valid and arbitrary X-Matrix signatures."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote

from hypothesis import strategies as st
from mitmproxy import http

from proxy_addons.endpoints import ROOM_DATA as ENDPOINT_ROOM_DATA
from rules.federation import parse_json_body
from tests.fuzz.strategies import (
    dumps,
    events,
    json_bytes,
    json_values,
    junk,
    mangled,
    methods,
    mutated,
    raw_paths,
    signed_header,
    strings,
    text,
    transactions,
    xmatrix_headers,
)
from tests.fuzz.world import LOCAL, ROOMS, SERVERS, SIGNING_KEYS

__all__ = ["WireRequest", "answers", "inbound_requests", "make_request", "wire"]

ROOM_DATA = sorted(ENDPOINT_ROOM_DATA)
signers = st.sampled_from(sorted(SIGNING_KEYS))


@dataclass
class WireRequest:
    method: bytes
    path: bytes
    headers: list[tuple[bytes, bytes]] = field(default_factory=list)
    body: bytes = b""


def wire(value: str) -> bytes:
    """A str as the bytes a hostile client could send (lone surrogates included)."""
    return value.encode("utf-8", "surrogatepass")


def make_request(req: WireRequest, host: str = LOCAL, port: int = 8448) -> http.Request:
    """A mitmproxy request with exactly these bytes (Request.make would normalise them)."""
    request = http.Request.make("GET", "https://placeholder/")
    request.data.host, request.data.port = host, port
    request.data.method = req.method
    request.data.path = req.path
    request.headers = http.Headers(req.headers)
    request.raw_content = req.body
    return request


def _content_of(body: bytes) -> object | None:
    """What the edge verifies the signature over: the decoded body, None if it is not JSON."""
    if not body:
        return None
    value, reason = parse_json_body(body)
    return value if reason is None else None


@st.composite
def authorization(
    draw: st.DrawFn, method: str, path: str, origin: str, body: bytes, original: object
) -> list[tuple[bytes, bytes]]:
    """A valid X-Matrix header over what is sent, one over the unmangled original, one
    built from parts, several, or none."""
    how = draw(st.sampled_from(["valid", "valid", "valid", "original", "parts", "two", "none"]))
    destination = draw(st.sampled_from([LOCAL, LOCAL, "other.test"]))
    value: str | None = None
    if how in ("valid", "two"):
        value = signed_header(method, path, origin, _content_of(body), destination)
    elif how == "original":
        value = signed_header(method, path, origin, original, destination)
    if how == "none":
        return []
    headers = [(b"Authorization", wire(value or draw(xmatrix_headers())))]
    if how == "two":
        headers.insert(0, (b"authorization", wire(draw(xmatrix_headers()))))
    return headers


@st.composite
def other_headers(draw: st.DrawFn, body: bytes) -> list[tuple[bytes, bytes]]:
    content_types = [b"application/json", b"application/json; charset=latin-1", b"text/plain"]
    lengths = [str(len(body)).encode(), b"0", b"-1", b"99999999999999999999", b"x"]
    headers: list[tuple[bytes, bytes]] = []
    if draw(st.booleans()):
        headers.append((b"Content-Type", draw(st.sampled_from(content_types) | st.binary())))
    if draw(st.booleans()):
        headers.append((b"Content-Length", draw(st.sampled_from(lengths))))
    if draw(st.integers(0, 5)) == 0:
        headers.append((b"Transfer-Encoding", b"chunked"))
    if draw(st.integers(0, 3)) == 0:
        encoding = st.sampled_from([b"gzip", b"br", b"identity", b"x"])
        headers.append((b"Content-Encoding", draw(encoding)))
    headers += draw(st.lists(st.tuples(st.binary(min_size=1, max_size=8), st.binary()), max_size=2))
    return headers


def _quoted(segment: str) -> str:
    return quote(segment, safe="", errors="surrogatepass")


@st.composite
def send_requests(draw: st.DrawFn) -> WireRequest:
    """PUT /send with a near-valid transaction, mutated and perhaps mangled, signed by an
    origin whose key the world knows (mostly)."""
    origin = draw(signers | st.sampled_from(SERVERS))
    original = draw(transactions(origin))
    txn = draw(mutated(original)) if draw(st.booleans()) else original
    body = dumps(txn, draw(st.booleans()), draw(st.booleans()))
    if draw(st.integers(0, 4)) == 0:
        body = draw(mangled(body))
    txn_id = draw(st.sampled_from(["1700000000001", "t1"]) | text)
    path = f"/_matrix/federation/v1/send/{_quoted(txn_id)}"
    method = draw(st.sampled_from(["PUT", "PUT", "PUT", "POST", "GET"]))
    headers = draw(authorization(method, path, origin, body, original))
    return WireRequest(wire(method), wire(path), headers + draw(other_headers(body)), body)


@st.composite
def room_data_requests(draw: st.DrawFn) -> WireRequest:
    """A room-data or /event request of a signed origin, for any room, user or event."""
    origin = draw(signers)
    if draw(st.integers(0, 3)) == 0:
        path = f"/_matrix/federation/v1/event/{_quoted(draw(st.just('$e1') | strings))}"
    else:
        name = draw(st.sampled_from(ROOM_DATA))
        room_id = draw(st.sampled_from(ROOMS) | strings)
        rest = draw(st.lists(st.sampled_from([f"@u:{origin}", "$e1"]) | strings, max_size=2))
        version = "v2" if name in ("send_join", "invite", "send_leave") else "v1"
        path = f"/_matrix/federation/{version}/{name}/" + "/".join(
            _quoted(p) for p in [room_id, *rest]
        )
    if draw(st.booleans()):
        path += "?" + draw(st.sampled_from(["limit=10", "v=1&v=2", "%"]))
    method = draw(st.sampled_from(["GET", "PUT", "POST"]))
    body = b"" if method == "GET" else draw(json_bytes(events()) | json_bytes() | junk)
    headers = draw(authorization(method, path, origin, body, _content_of(body)))
    return WireRequest(wire(method), wire(path), headers + draw(other_headers(body)), body)


@st.composite
def arbitrary_requests(draw: st.DrawFn) -> WireRequest:
    """Any method, path, headers and body."""
    body = draw(st.binary(max_size=200) | json_bytes() | junk)
    headers = draw(other_headers(body))
    if draw(st.booleans()):
        headers.append((b"Authorization", wire(draw(xmatrix_headers()))))
    return WireRequest(draw(methods), draw(raw_paths), headers, body)


inbound_requests = send_requests() | room_data_requests() | arbitrary_requests()


@st.composite
def answers(draw: st.DrawFn, keys: tuple[str, ...] = ("pdus",)) -> tuple[int, bytes]:
    """A homeserver's (or a remote server's) answer: near-valid event lists under `keys`,
    mutated, arbitrary JSON, or bytes."""
    status = draw(st.sampled_from([200, 200, 200, 200, 404, 500]))
    kind = draw(st.sampled_from(["events", "events", "json", "bytes"]))
    if kind == "events":
        answer: dict[str, Any] = {"origin": draw(st.sampled_from(SERVERS)), "origin_server_ts": 1}
        for key in keys:
            answer[key] = draw(st.lists(events(), max_size=4))
        if "event" in keys:
            answer["event"] = draw(events())
        if draw(st.booleans()):
            answer = draw(mutated(answer))
        return status, dumps(answer, draw(st.booleans()), draw(st.booleans()))
    if kind == "json":
        return status, draw(json_bytes(json_values))
    return status, draw(st.binary(max_size=100) | junk)
