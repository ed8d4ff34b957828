"""Fuzzing the outbound watcher (proxy_addons/outbound.py) on the homeserver's own
federation traffic, in every deployment mode: pushes of near-valid, mutated and mangled
transactions to any destination, and arbitrary answers to its pulls.

For each flow: no exception escapes the hooks; the internal-error count does not move;
the findings store keeps running. A push goes out untouched, is answered here, or —
enforce mode, a mixed transaction — goes out rebuilt: a sub-list of its PDUs, signed
again by the homeserver. An answer to a pull is never changed."""

from __future__ import annotations

import copy
import json
from urllib.parse import quote

import pytest
from hypothesis import strategies as st
from mitmproxy import http
from mitmproxy.proxy.mode_specs import ProxyMode
from mitmproxy.test import taddons, tflow
from signedjson.key import get_verify_key

from proxy_addons.outbound import PULLS, OutboundWatcher, destination_of
from rules.servername import parse_server_name
from rules.xmatrix import parse_xmatrix, verify_request_signature
from tests.fuzz.flows import WireRequest, answers, make_request, other_headers, wire
from tests.fuzz.harness import fuzz, internal_errors, request_snapshot
from tests.fuzz.strategies import (
    dumps,
    events,
    mangled,
    mutated,
    signed_header,
    strings,
    text,
    transactions,
    users,
    xmatrix_headers,
)
from tests.fuzz.world import DEPLOYMENTS, LOCAL, OUTBOUND, ROOMS, SERVERS, SIGNING_KEYS

deployments = st.sampled_from(sorted(DEPLOYMENTS))
destinations = st.sampled_from([s for s in SERVERS if s != LOCAL]) | st.sampled_from(
    ["other.test", "denied.test:8448"]
)
HS_VERIFY_KEY = get_verify_key(SIGNING_KEYS[LOCAL])


@pytest.fixture
def watchers(world):
    holders = world(OUTBOUND)
    with taddons.context():
        yield {name: OutboundWatcher(holder) for name, holder in holders.items()}


def proxied(request: WireRequest, destination: str) -> http.HTTPFlow:
    """A flow of the outbound listener (mitmproxy's regular mode) to `destination`."""
    server = parse_server_name(destination)
    assert server is not None
    flow = tflow.tflow(req=make_request(request, server.host.strip("[]"), server.port or 8448))
    flow.client_conn.proxy_mode = ProxyMode.parse("regular")
    return flow


def _check_runtime(runtime, errors_before):
    assert internal_errors(runtime) == errors_before, "internal error: see the log above"
    assert runtime.store.pending == 0 or runtime.store.flush(5), "the store's writer died"


@st.composite
def pushes(draw: st.DrawFn) -> tuple[WireRequest, str]:
    """hs.test's PUT /send to a destination: its own users' events mostly, mutated and
    mangled now and then, signed by hs.test (or not)."""
    destination = draw(destinations)
    local_users = st.sampled_from([f"@u:{LOCAL}", f"@admin:{LOCAL}"])
    original = draw(transactions(LOCAL, events(senders=local_users | users)))
    txn = draw(mutated(original)) if draw(st.integers(0, 3)) == 0 else original
    body = dumps(txn, draw(st.booleans()))
    if draw(st.integers(0, 5)) == 0:
        body = draw(mangled(body))
    txn_id = draw(st.sampled_from(["1700000000001"]) | text)
    path = f"/_matrix/federation/v1/send/{quote(txn_id, safe='', errors='surrogatepass')}"
    auth = signed_header("PUT", path, LOCAL, txn if body == dumps(txn) else None, destination)
    headers = (
        [(b"Authorization", wire(auth or draw(xmatrix_headers())))]
        if draw(st.integers(0, 5))
        else []
    )
    headers += draw(other_headers(body))
    return WireRequest(b"PUT", wire(path), headers, body), destination


def _assert_rebuilt(flow, before, destination):
    """A rebuilt push: same method and path, its PDUs a sub-list of the original's, and a
    valid signature of hs.test over the new body."""
    assert (flow.request.method, flow.request.path) == (
        before["method"].decode("utf-8", "surrogateescape"),
        before["path"].decode("utf-8", "surrogateescape"),
    )
    original = json.loads(before["content"])
    sent = json.loads(flow.request.content)
    kept = iter(original["pdus"])
    assert all(any(p == q for q in kept) for p in sent["pdus"])
    assert len(sent["edus"]) <= len(original["edus"])
    auth = parse_xmatrix(flow.request.headers["Authorization"])
    assert auth is not None and auth.origin == LOCAL and auth.destination == destination
    assert verify_request_signature(
        auth, "PUT", flow.request.path, destination, sent, HS_VERIFY_KEY
    )


@fuzz(pushes(), deployments)
async def test_outbound_pushes(watchers, push, deployment):
    """A push is sent untouched, answered here (JSON), or rebuilt and signed again."""
    request, destination = push
    watcher = watchers[deployment]
    runtime = watcher.holder.runtime
    flow = proxied(request, destination)
    before, errors = request_snapshot(flow), internal_errors(runtime)
    destination = destination_of(flow)
    await watcher.request(flow)
    _check_runtime(runtime, errors)
    if flow.response is not None:
        assert flow.response.status_code in (200, 503)
        json.loads(flow.response.content)
    elif flow.request.get_state() != before:
        assert DEPLOYMENTS[deployment]["mode"] == "enforce"
        _assert_rebuilt(flow, before, destination)


@st.composite
def pulls(draw: st.DrawFn) -> tuple[WireRequest, str, str]:
    """The homeserver's pull from a server, for any room or event."""
    name = draw(st.sampled_from(sorted(PULLS)))
    target = draw(st.sampled_from(ROOMS) | st.just("$e1") | strings | users)
    path = f"/_matrix/federation/v1/{name}/{quote(str(target), safe='', errors='surrogatepass')}"
    method = "POST" if name == "get_missing_events" else "PUT" if name == "send_join" else "GET"
    destination = draw(destinations)
    body = b"{}" if method != "GET" else b""
    auth = signed_header(method, path, LOCAL, {} if body else None, destination)
    headers = [(b"Authorization", wire(auth))] if auth and draw(st.booleans()) else []
    return WireRequest(wire(method), wire(path), headers, body), destination, name


@fuzz(st.data(), pulls(), deployments)
async def test_answers_to_pulls(watchers, data, pull, deployment):
    """Whatever a server answers to the homeserver's pull, modgud reads it without
    changing it, or the request."""
    request, destination, name = pull
    status, body = data.draw(answers(PULLS[name] + (("event",) if name == "send_join" else ())))
    watcher = watchers[deployment]
    runtime = watcher.holder.runtime
    flow = proxied(request, destination)
    before, errors = request_snapshot(flow), internal_errors(runtime)
    await watcher.request(flow)
    flow.response = http.Response.make(status, body, {"Content-Type": "application/json"})
    answered = copy.deepcopy(flow.response.get_state())
    await watcher.response(flow)
    _check_runtime(runtime, errors)
    assert flow.request.get_state() == before
    assert flow.response.get_state() == answered
