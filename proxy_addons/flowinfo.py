"""The one place that reads mitmproxy flow fields; everything else gets plain data."""

from __future__ import annotations

import json
import weakref
from dataclasses import dataclass, field

from mitmproxy import http

from proxy_addons.endpoints import Endpoint, classify_path
from rules.xmatrix import XMatrixAuth, parse_xmatrix

__all__ = [
    "FlowState",
    "declared_body_size",
    "flow_state",
    "forget_flow_state",
    "json_response",
    "known_flow_state",
    "request_auth",
    "request_body",
]


@dataclass(slots=True)
class FlowState:
    """Per-flow state shared by modgud's addons.

    Kept beside the flow, not in `flow.metadata`: mitmproxy writes metadata into saved
    captures (`-w`, `save_stream_file`) and refuses values it cannot serialise, which
    would stop the capture of every flow modgud looked at."""

    endpoint: Endpoint
    auth: XMatrixAuth | None
    origin_verified: bool = False
    stale_rooms: set[str] = field(default_factory=set)
    answered_locally: bool = False
    pdu_count: int = 0  # PDUs of a /send, for the per-PDU decision time
    # The body as decoded to check its X-Matrix signature, while the edge checks the
    # request: a /send's PDUs are read from it, not decoded again.
    content: object = None
    # The body was too large to hold, or of unbounded length, and is streamed to the
    # homeserver unread (Enforcer.requestheaders): the `request` hook has nothing to check.
    unread: bool = False


def request_auth(flow: http.HTTPFlow) -> XMatrixAuth | None:
    """The request's X-Matrix credentials; None when it has none, when one of its X-Matrix
    headers is malformed, or when they disagree on origin or destination.

    Synapse reads every X-Matrix header and authenticates the request as the origin of
    the last one (synapse/federation/transport/server/_base.py, authenticate_request), so
    judging by any other one would let a request be checked as one server and accepted as
    another. Several credentials of one origin (one per key, as the spec's example signs)
    are fine: the first is verified."""
    found: XMatrixAuth | None = None
    for value in flow.request.headers.get_all("authorization"):
        if value[:8].lower() != "x-matrix":  # Synapse: startswith(b"X-Matrix")
            continue
        auth = parse_xmatrix(value)
        if auth is None:
            return None
        if found is None:
            found = auth
        elif (auth.origin, auth.destination) != (found.origin, found.destination):
            return None
    return found


_STATES: weakref.WeakKeyDictionary[http.HTTPFlow, FlowState] = weakref.WeakKeyDictionary()


def flow_state(flow: http.HTTPFlow) -> FlowState:
    state = _STATES.get(flow)
    if state is None:
        state = _STATES[flow] = FlowState(classify_path(flow.request.path), request_auth(flow))
    return state


def known_flow_state(flow: http.HTTPFlow) -> FlowState | None:
    """The flow's state if modgud looked at the flow, else None."""
    return _STATES.get(flow)


def forget_flow_state(flow: http.HTTPFlow) -> None:
    _STATES.pop(flow, None)


# Methods whose requests carry no body when HTTP/2 or 3 headers declare no length.
_BODILESS = frozenset({"GET", "HEAD", "OPTIONS", "DELETE"})


def declared_body_size(flow: http.HTTPFlow) -> int | None:
    """The size of the request's body as its headers bound it, before it is read; None
    when they do not bound it: `Transfer-Encoding` (chunked) or a Content-Length that is
    not one number, and HTTP/2 or 3 requests of a method with a body and no
    Content-Length (their body runs until the stream ends). An HTTP/1 request with
    neither header has no body (RFC 9112, 6.3)."""
    headers = flow.request.headers
    if "transfer-encoding" in headers:
        return None
    lengths = headers.get_all("content-length")
    if not lengths:
        if flow.request.http_version.startswith("HTTP/1"):
            return 0
        return 0 if flow.request.method.upper() in _BODILESS else None
    values = {v.strip() for value in lengths for v in value.split(",")}
    if len(values) != 1:
        return None
    value = values.pop()
    # Over 19 digits (beyond any real length, and int() refuses 4,300): unbounded.
    return int(value) if value.isascii() and value.isdigit() and len(value) <= 19 else None


def request_body(flow: http.HTTPFlow) -> bytes:
    return flow.request.raw_content or b""


def json_response(flow: http.HTTPFlow, status: int, body: object) -> None:
    """Answer the request locally (it is then never forwarded)."""
    flow.response = http.Response.make(
        status, json.dumps(body).encode(), {"Content-Type": "application/json"}
    )
