"""The one place that reads mitmproxy flow fields; everything else gets plain data."""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from mitmproxy import http

from proxy_addons.endpoints import Endpoint, classify_path
from rules.checks import TransactionVerdict
from rules.xmatrix import XMatrixAuth, parse_xmatrix

__all__ = ["FlowState", "flow_state", "json_response", "request_auth", "request_body"]

METADATA_KEY = "modgud"


@dataclass(slots=True)
class FlowState:
    """Per-flow state shared by modgud's addons (one flow.metadata entry)."""

    endpoint: Endpoint
    auth: XMatrixAuth | None
    origin_verified: bool = False
    verdict: TransactionVerdict | None = None
    stale_rooms: set[str] = field(default_factory=set)
    answered_locally: bool = False


def request_auth(flow: http.HTTPFlow) -> XMatrixAuth | None:
    """The first well-formed X-Matrix Authorization header, if any."""
    for value in flow.request.headers.get_all("authorization"):
        auth = parse_xmatrix(value)
        if auth is not None:
            return auth
    return None


def flow_state(flow: http.HTTPFlow) -> FlowState:
    state = flow.metadata.get(METADATA_KEY)
    if not isinstance(state, FlowState):
        state = FlowState(classify_path(flow.request.path), request_auth(flow))
        flow.metadata[METADATA_KEY] = state
    return state


def request_body(flow: http.HTTPFlow) -> bytes:
    return flow.request.raw_content or b""


def json_response(flow: http.HTTPFlow, status: int, body: object) -> None:
    """Answer the request locally (it is then never forwarded)."""
    flow.response = http.Response.make(
        status, json.dumps(body).encode(), {"Content-Type": "application/json"}
    )
