"""Security properties of the addons, each shown from the outside:

1. a forged X-Matrix origin neither gets a denied server's PDU in nor gets another server
   blamed (edge, event hook, outbound listener);
2. bodies over the limits are refused, or left alone, before anything parses them;
3. the metrics and hook listeners bind to loopback unless told otherwise, and a hook off
   loopback needs its token;
4. tokens come from files and never show in logs, errors or the config's repr;
5. SQL is only ever built from constant text, fixed column names and placeholders.

Room state comes from a static table (a test double) except where the admin API's
token handling is the point: there a small aiohttp server plays the homeserver.
"""

from __future__ import annotations

import ast
import asyncio
import gzip
import json
import logging
import traceback
from pathlib import Path

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from mitmproxy import http
from mitmproxy.test import tflow

import proxy_addons.enforcer as enforcer_module
import proxy_addons.eventhook as eventhook_module
import proxy_addons.outbound as outbound_module
from proxy_addons.config import ConfigError, is_loopback, load_config
from proxy_addons.eventhook import make_app
from proxy_addons.runtime import build_runtime
from rules.xmatrix import sign_request
from tests.proxy_addons.conftest import (
    KEYS,
    LOCAL,
    ROOM,
    inbound,
    pdu,
    recorded_findings,
    run_edge,
    send_flow,
)
from tests.proxy_addons.test_eventhook import client_event, post
from tests.proxy_addons.test_signature_cache import _trust

REPO = Path(__file__).resolve().parents[2]
SEND_PATH = "/_matrix/federation/v1/send/t1"


def trusting(holder, *servers):
    """The key cache holds the real keys of `servers` (a test double for key fetching)."""
    for server in servers or tuple(KEYS):
        _trust(holder.runtime, server)
    return holder


def keys_unavailable(holder):
    """Every key fetch fails, as for a made-up key ID or unreachable key servers."""

    async def unavailable(server, key_id):
        return None

    holder.runtime.keys.ensure = unavailable
    return holder


def raw_send(headers, content, path=SEND_PATH):
    """A PUT /send with exactly these Authorization headers (name, value pairs)."""
    fields = [(b"Authorization", value.encode()) for value in headers]
    fields.append((b"Content-Type", b"application/json"))
    request = http.Request.make(
        "PUT", f"http://{LOCAL}{path}", json.dumps(content).encode(), fields
    )
    return inbound(tflow.tflow(req=request))


def txn(origin, *pdus):
    return {"origin": origin, "origin_server_ts": 1, "pdus": list(pdus), "edus": []}


def blamed(rows):
    """Every server the findings hold responsible."""
    return {r["attributed_to"] for r in rows}


def named(rows):
    """Every server the findings blame or record as the request's origin."""
    return blamed(rows) | {r["origin"] for r in rows}


def signed(event, server):
    from rules.roomversion import get_room_version
    from rules.signatures import sign_event

    return sign_event(event, get_room_version("10"), server, KEYS[server])


def evil(body="leak"):
    """An event denied.test really wrote."""
    return signed(pdu("@evil:denied.test", body=body), "denied.test")


@pytest.fixture
def outbound_holder(make_runtime, tmp_path):
    """A runtime with the outbound listener (and signature checks on), and the
    homeserver's signing key."""
    from signedjson.key import generate_signing_key, write_signing_keys

    key = generate_signing_key("a")
    with open(tmp_path / "hs.signing.key", "w") as f:
        write_signing_keys(f, [key])
    extra = "listen: {outbound: '127.0.0.1:8449'}\noutbound: {signing_key_file: hs.signing.key}\n"
    return make_runtime(verify_signatures=True, extra=extra), key


def pull_flow(hs_key, answer_body, headers=()):
    """The homeserver's /get_missing_events to relay.test, with relay.test's answer."""
    from tests.proxy_addons.test_outbound import proxied

    path = "/_matrix/federation/v1/get_missing_events/" + ROOM
    auth = sign_request("POST", path, LOCAL, "relay.test", {}, hs_key)
    request = http.Request.make("POST", f"https://relay.test{path}", b"{}", {"Authorization": auth})
    flow = proxied(tflow.tflow(req=request))
    flow.response = http.Response.make(200, answer_body, dict(headers))
    return flow


# 1. Forged origins ---------------------------------------------------------------------


async def test_origin_claimed_with_another_servers_signature_is_refused_unblamed(make_runtime):
    """Spec: Server-Server API, "Request Authentication". A request claiming good.test
    but signed with denied.test's key, or carrying denied.test's valid signature under
    origin good.test, is answered 401 and its finding blames nobody: neither the denied
    PDU gets in nor good.test is blamed."""
    holder = trusting(make_runtime(verify_signatures=True))
    content = txn("good.test", evil())
    wrong_key = sign_request("PUT", SEND_PATH, "good.test", LOCAL, content, KEYS["denied.test"])
    genuine = sign_request("PUT", SEND_PATH, "denied.test", LOCAL, content, KEYS["denied.test"])
    relabelled = genuine.replace('origin="denied.test"', 'origin="good.test"')
    for header in (wrong_key, relabelled):
        flow = await run_edge(holder, raw_send([header], content))
        assert flow.response.status_code == 401
        assert json.loads(flow.response.content)["errcode"] == "M_UNAUTHORIZED"
    rows = recorded_findings(holder)
    assert [(r["rule"], r["action"]) for r in rows] == [("signature.request", "rejected")] * 2
    assert named(rows) == {None}


async def test_request_signed_for_another_destination_is_refused_unblamed(make_runtime):
    """A request good.test really signed, but for other.test (replayed here by whoever got
    it), is refused 401 like Synapse does ("Destination mismatch in auth header") and
    blames nobody; in audit mode it is flagged and not checked further. Found missing:
    the edge used to verify it against its own destination, accept it and blame
    good.test for what it relayed."""
    for mode, status in (("enforce", 401), ("audit", None)):
        holder = trusting(make_runtime(mode=mode, verify_signatures=True))
        flow = send_flow("good.test", [evil()], destination="other.test")
        await run_edge(holder, flow)
        assert (flow.response.status_code if flow.response else None) == status
        rows = recorded_findings(holder)
        assert [r["rule"] for r in rows] == ["signature.request"]
        assert "other.test" in rows[0]["detail"]
        assert named(rows) == {None}


async def test_several_credentials_naming_different_origins_are_refused(make_runtime):
    """Synapse authenticates a request as the origin of its *last* X-Matrix header, so a
    request carrying relay.test's valid credentials and then denied.test's would be
    checked as relay.test and accepted as denied.test. Two headers naming different
    origins, or two credentials folded into one header, are refused 401 and blame
    nobody. Several headers of one origin (one per key, as the spec's example signs) are
    still accepted."""
    holder = trusting(make_runtime(verify_signatures=True))
    content = txn("relay.test", evil())
    relay = sign_request("PUT", SEND_PATH, "relay.test", LOCAL, content, KEYS["relay.test"])
    denied = sign_request("PUT", SEND_PATH, "denied.test", LOCAL, content, KEYS["denied.test"])
    for headers in ([relay, denied], [denied, relay], [f"{relay},{denied}"]):
        flow = await run_edge(holder, raw_send(headers, content))
        assert flow.response.status_code == 401, headers
    rows = recorded_findings(holder)
    assert [r["rule"] for r in rows] == ["signature.request"] * 3
    assert named(rows) == {None}
    same_origin = await run_edge(holder, raw_send([relay, relay], content))
    assert same_origin.response.status_code == 200  # authenticated; its one PDU refused
    assert [(r["rule"], r["attributed_to"]) for r in recorded_findings(holder)[3:]] == [
        ("acl.sender", "relay.test")
    ]


async def test_origin_named_in_the_body_never_shifts_the_blame(make_runtime):
    """The body's `origin` is not authenticated; the X-Matrix origin is (Synapse ignores
    the body's). denied.test naming good.test in its body still has its PDUs refused
    (answered locally), and a relay doing the same is blamed itself for the leak: every
    finding blames the authenticated origin, none good.test."""
    holder = trusting(make_runtime(verify_signatures=True))
    for origin in ("denied.test", "relay.test"):
        content = txn("good.test", evil(origin), signed(pdu("@ok:relay.test"), "relay.test"))
        header = sign_request("PUT", SEND_PATH, origin, LOCAL, content, KEYS[origin])
        flow = await run_edge(holder, raw_send([header], content))
        rows = recorded_findings(holder)
        if origin == "denied.test":
            assert flow.response.status_code == 200
            results = json.loads(flow.response.content)["pdus"].values()
            assert [r["errcode"] for r in results] == ["M_FORBIDDEN"] * 2
        else:
            assert flow.response is None  # mixed: the hook refuses the relayed event
            verdicts = [
                holder.runtime.verdicts.get(r["event_id"])
                for r in rows
                if r["event_id"] and r["attributed_to"] == origin
            ]
            assert verdicts and all(v.decision.value == "refuse" for v in verdicts)
        assert "good.test" not in blamed(rows)
        assert {r["rule"] for r in rows} >= {"malformed.request"}  # the body's claim, noted
    assert {r["attributed_to"] for r in recorded_findings(holder)} == {
        "denied.test",
        "relay.test",
    }


async def test_unverifiable_origin_is_checked_but_blamed_for_nothing(make_runtime):
    """on_error: open and the claimed origin's key cannot be had — as for any server name
    with a made-up key ID — the request is still checked (a denied author's PDU is left to
    the hook, which refuses it on its own), but its findings blame nobody (low confidence,
    noted as unauthenticated), no per-server metric counts it, and it leaves nothing
    behind: no knock, no event-index delivery, no verdict the hook would apply. Found
    missing: such a request used to blame good.test for relaying."""
    holder = keys_unavailable(
        make_runtime(verify_signatures=True, extra="metrics: {servers: [good.test]}\n")
    )
    runtime = holder.runtime
    leaked = evil()
    knock = {"edu_type": "m.server.knock", "content": {"room_id": ROOM}}
    mine = signed(pdu("@a:good.test"), "good.test")
    flow = send_flow("good.test", [leaked, mine], edus=[knock])
    await run_edge(holder, flow)
    assert flow.response is None  # forwarded: the homeserver verifies the request itself
    rows = recorded_findings(holder)
    assert rows and {r["attributed_to"] for r in rows} == {None}
    assert {r["confidence"] for r in rows} == {"low"}
    assert all("not authenticated" in r["detail"] for r in rows)
    assert all(runtime.verdicts.get(r["event_id"]) is None for r in rows if r["event_id"])
    assert len(runtime.index) == 0
    assert runtime.store.flush(5)
    from proxy_addons.store import query_knocks

    assert query_knocks(runtime.config.database) == []
    registry = runtime.metrics.registry
    assert registry.get_sample_value("modgud_fail_open_total", {"where": "request_key"}) == 1
    for outcome in ("mixed", "forwarded"):
        labels = {"server": "good.test", "outcome": outcome}
        assert registry.get_sample_value("modgud_server_requests_total", labels) is None
    # The hook judges the leaked event itself, by its author.
    status, _ = await post(holder, client_event("@evil:denied.test", rows[0]["event_id"]))
    assert status == 403


async def test_forged_delivery_leaves_no_verdict_against_the_real_event(make_runtime):
    """A request claiming denied.test with an unverifiable key, carrying good.test's
    event E, is refused (every PDU refused: answered locally), but leaves no verdict
    behind: when good.test delivers E for real, the hook allows it. Otherwise anyone
    could have any event refused inside the homeserver by forging a denied delivery
    of it first."""
    holder = keys_unavailable(make_runtime(verify_signatures=True))
    event = signed(pdu("@a:good.test", body="censor me"), "good.test")
    forged = await run_edge(holder, send_flow("denied.test", [event]))
    assert forged.response.status_code == 200
    ((event_id, result),) = json.loads(forged.response.content)["pdus"].items()
    assert result["errcode"] == "M_FORBIDDEN"
    assert holder.runtime.verdicts.get(event_id) is None
    assert [(r["rule"], r["attributed_to"]) for r in recorded_findings(holder)] == [
        ("acl.origin", None)
    ]
    assert await post(holder, client_event("@a:good.test", event_id)) == (200, {})


async def test_unverifiable_origin_of_a_room_data_request_is_refused_unblamed(make_runtime):
    """make_join claiming denied.test with a key modgud cannot have: refused 403 as the
    claimed origin is denied, but the finding blames nobody."""
    holder = keys_unavailable(make_runtime(verify_signatures=True))
    path = "/_matrix/federation/v1/make_join/%21room%3Ahs.test/%40a%3Adenied.test"
    auth = sign_request("GET", path, "denied.test", LOCAL, None, KEYS["relay.test"])
    request = http.Request.make("GET", f"http://{LOCAL}{path}", b"", {"Authorization": auth})
    flow = await run_edge(holder, inbound(tflow.tflow(req=request)))
    assert flow.response.status_code == 403
    assert [
        (r["rule"], r["attributed_to"], r["confidence"]) for r in recorded_findings(holder)
    ] == [("acl.origin", None, "low")]


async def test_event_hook_never_blames_a_server_named_in_the_event(make_runtime):
    """The hook has no delivering server to blame: an event written by denied.test that
    names good.test as its `origin` (a field anyone can set) is refused, and the finding
    names its author's server and blames no one."""
    holder = make_runtime()
    status, body = await post(holder, client_event("@evil:denied.test", origin="good.test"))
    assert (status, body["errcode"]) == (403, "M_FORBIDDEN")
    (row,) = recorded_findings(holder)
    assert (row["rule"], row["sender_server"], row["attributed_to"], row["origin"]) == (
        "acl.sender",
        "denied.test",
        None,
        None,
    )


async def test_pulled_events_are_blamed_on_the_server_asked_and_never_on_a_forger(
    outbound_holder,
):
    """Outbound: an answer to our homeserver's pull is blamed on the server the
    homeserver asked (its own request's X-Matrix destination), never on a server the
    answer names (`origin: good.test`), and an earlier forged delivery claiming
    good.test (key unavailable) was not indexed, so the finding does not say good.test
    delivered the event first."""
    from proxy_addons.outbound import OutboundWatcher

    holder, hs_key = outbound_holder
    keys_unavailable(holder)
    leaked = evil("pulled")
    await run_edge(holder, send_flow("good.test", [leaked]))  # forged: key unavailable
    answer = {"origin": "good.test", "events": [leaked]}
    await OutboundWatcher(holder).response(pull_flow(hs_key, json.dumps(answer).encode()))
    rows = [r for r in recorded_findings(holder) if r["rule"] == "leak.pulled"]
    assert [(r["attributed_to"], r["origin"]) for r in rows] == [("relay.test", "relay.test")]
    assert "no earlier delivery known" in rows[0]["detail"]
    assert "good.test" not in blamed(recorded_findings(holder))


# 2. Bodies over the limits -------------------------------------------------------------

LIMIT = 65_536  # the smallest max_body_bytes the config accepts: small bodies, fast tests
SMALL = f"max_body_bytes: {LIMIT}\n"


def no_parsing(monkeypatch, *modules_and_names):
    """Make every named parser raise: a test fails if the body reaches any of them."""

    def refuse(*args, **kwargs):
        raise AssertionError("an oversized body was parsed")

    for module, name in modules_and_names:
        monkeypatch.setattr(module, name, refuse)


# Where the edge would read a body: JSON, the transaction, the X-Matrix signature.
EDGE_PARSERS = (
    (enforcer_module, "parse_json_body"),
    (enforcer_module, "parse_transaction"),
    (enforcer_module, "verify_request_signature"),
)


def body_of(size):
    """A JSON body of exactly `size` bytes."""
    head = b'{"origin": "good.test", "pdus": [], "edus": [], "pad": "'
    return head + b"x" * (size - len(head) - 2) + b'"}'


def oversized_flow(method, path, size=LIMIT + 1, origin="good.test"):
    body = body_of(size)
    auth = sign_request(method, path, origin, LOCAL, json.loads(body), KEYS[origin])
    request = http.Request.make(method, f"http://{LOCAL}{path}", body, {"Authorization": auth})
    return inbound(tflow.tflow(req=request))


INSPECTED = [
    ("PUT", SEND_PATH, "send"),
    ("PUT", "/_matrix/federation/v2/send_join/%21room%3Ahs.test/%24join", "send_join"),
    ("GET", "/_matrix/federation/v1/state/%21room%3Ahs.test?event_id=%24e", "state"),
    ("GET", "/_matrix/federation/v1/event/%24abc", "event"),
]


@pytest.mark.parametrize(("method", "path", "endpoint"), INSPECTED, ids=[e[2] for e in INSPECTED])
async def test_every_inspected_endpoint_refuses_an_oversized_body_unparsed(
    make_runtime, monkeypatch, method, path, endpoint
):
    """/send, the room-data endpoints and /event: a body over max_body_bytes that reaches
    the request hook (a replayed capture: live traffic is stopped at its headers, below)
    is answered 413 M_TOO_LARGE in enforce mode (flagged and forwarded in audit) before
    anything parses it — not the JSON, not the transaction, not the X-Matrix signature — and the
    claimed origin is not blamed."""
    no_parsing(monkeypatch, *EDGE_PARSERS)
    for mode, status in (("enforce", 413), ("audit", None)):
        holder = trusting(make_runtime(mode=mode, verify_signatures=True, extra=SMALL))
        flow = await run_edge(holder, oversized_flow(method, path))
        assert (flow.response.status_code if flow.response else None) == status
        if status:
            assert json.loads(flow.response.content)["errcode"] == "M_TOO_LARGE"
        (row,) = recorded_findings(holder)
        assert (row["rule"], row["endpoint"], row["attributed_to"]) == (
            "malformed.request",
            endpoint,
            None,
        )


async def test_a_body_of_exactly_the_limit_is_checked_as_usual(make_runtime):
    """The limit is inclusive: max_body_bytes bytes are read and checked (here: a valid,
    empty transaction, forwarded)."""
    holder = trusting(make_runtime(verify_signatures=True, extra=SMALL))
    flow = await run_edge(holder, oversized_flow("PUT", SEND_PATH, size=LIMIT))
    assert flow.response is None
    assert [r["rule"] for r in recorded_findings(holder)] == []


def headers_only(method, path, headers, http_version="HTTP/1.1"):
    """A flow at mitmproxy's `requestheaders` event: the headers read, the body not yet."""
    auth = sign_request(method, path, "good.test", LOCAL, None, KEYS["good.test"])
    request = http.Request.make(method, f"http://{LOCAL}{path}", b"", {"Authorization": auth})
    request.headers.pop("content-length", None)
    for name, value in headers:
        request.headers.add(name, value)
    request.http_version = http_version
    return inbound(tflow.tflow(req=request))


async def at_requestheaders(holder, flow):
    """The Enforcer's requestheaders hook, then (when the flow lives on) its request hook,
    as mitmproxy calls them."""
    from mitmproxy.test import taddons

    enforcer = enforcer_module.Enforcer(holder)
    with taddons.context(enforcer):
        enforcer.requestheaders(flow)
        if flow.live:
            await enforcer.request(flow)
    return flow


OVER = [("content-length", str(LIMIT + 1))]
CHUNKED = [("transfer-encoding", "chunked")]


@pytest.mark.parametrize(
    ("headers", "what"),
    [(OVER, f"of {LIMIT + 1} bytes is over"), (CHUNKED, "of undeclared length")],
    ids=["declared-over", "chunked"],
)
@pytest.mark.parametrize("mode", ["enforce", "audit", "sink"])
async def test_a_body_too_large_to_hold_is_never_read(
    make_runtime, monkeypatch, headers, what, mode
):
    """mitmproxy buffers a whole body before the `request` hook: a checked endpoint's body
    declared over max_body_bytes, or chunked, is dealt with at the headers. Enforcing (and
    as a sink) the flow is killed — mitmproxy closes the connection without reading the
    body; auditing it is streamed to the homeserver unread. Nothing is parsed, and the
    claimed origin is not blamed."""
    no_parsing(monkeypatch, *EDGE_PARSERS)
    holder = trusting(make_runtime(mode=mode, verify_signatures=True, extra=SMALL))
    flow = await at_requestheaders(holder, headers_only("PUT", SEND_PATH, headers))
    closed = mode != "audit"
    assert flow.response is None
    assert (flow.error is not None) == closed == (not flow.killable)
    assert flow.request.stream is (not closed)
    (row,) = recorded_findings(holder)
    assert (row["rule"], row["endpoint"], row["attributed_to"], row["action"]) == (
        "malformed.request",
        "send",
        None,
        "rejected" if closed else "flagged",
    )
    assert what in row["detail"]
    assert ("closed unread" if closed else "streamed to the homeserver unread") in row["detail"]
    outcome = "refused" if closed else "forwarded"
    requests = holder.runtime.metrics.requests.labels("inbound", "send", outcome)
    assert requests._value.get() == 1


@pytest.mark.parametrize(
    ("headers", "version", "method"),
    [
        ([("content-length", str(LIMIT))], "HTTP/1.1", "PUT"),  # the limit is inclusive
        ([], "HTTP/1.1", "PUT"),  # HTTP/1 without either header: no body
        ([], "HTTP/2.0", "GET"),  # HTTP/2 GET without a length: no body
        ([("content-length", f"{LIMIT}, {LIMIT}")], "HTTP/1.1", "PUT"),  # repeated, agreeing
    ],
)
async def test_a_body_within_the_limit_is_left_to_the_request_hook(
    make_runtime, headers, version, method
):
    holder = make_runtime(extra=SMALL)
    flow = headers_only(method, SEND_PATH, headers, version)
    enforcer_module.Enforcer(holder).requestheaders(flow)
    assert flow.live and not flow.request.stream and flow.error is None
    assert recorded_findings(holder) == []


@pytest.mark.parametrize(
    "headers",
    [
        [("content-length", f"{LIMIT}, {LIMIT + 1}")],  # repeated, disagreeing
        [("content-length", "12abc")],
        [("content-length", "9" * 5000)],  # int() would refuse it
    ],
)
async def test_a_length_that_bounds_nothing_counts_as_unbounded(make_runtime, headers):
    holder = make_runtime(extra=SMALL)
    flow = await at_requestheaders(holder, headers_only("PUT", SEND_PATH, headers))
    assert flow.error is not None  # enforcing: closed unread
    assert "of undeclared length" in recorded_findings(holder)[0]["detail"]


async def test_an_http2_request_with_a_body_and_no_length_counts_as_unbounded(make_runtime):
    holder = make_runtime(extra=SMALL)
    flow = await at_requestheaders(holder, headers_only("PUT", SEND_PATH, [], "HTTP/2.0"))
    assert flow.error is not None
    assert len(recorded_findings(holder)) == 1


@pytest.mark.parametrize("mode", ["enforce", "audit", "sink"])
async def test_a_large_body_modgud_does_not_read_is_streamed_through(make_runtime, mode):
    """Key queries and other requests modgud does not check are streamed to the homeserver
    unread when their body is over the limit (it applies its own limits); a sink, which
    forwards nothing, closes them. No finding: modgud does not judge these requests."""
    holder = make_runtime(mode=mode, extra=SMALL)
    flow = await at_requestheaders(holder, headers_only("POST", "/_matrix/key/v2/query", OVER))
    if mode == "sink":
        assert flow.error is not None and not flow.request.stream
    else:
        assert flow.error is None and flow.request.stream is True and flow.response is None
    assert recorded_findings(holder) == []


async def test_requestheaders_leaves_the_outbound_listener_alone(make_runtime):
    from mitmproxy.proxy.mode_specs import ProxyMode

    holder = make_runtime(extra=SMALL + "listen: {outbound: '127.0.0.1:18449'}\n")
    flow = headers_only("PUT", SEND_PATH, OVER)
    flow.client_conn.proxy_mode = ProxyMode.parse("regular")
    enforcer_module.Enforcer(holder).requestheaders(flow)
    assert flow.live and not flow.request.stream and flow.error is None


@pytest.mark.parametrize(
    "path",
    [
        "/_matrix/key/v2/query",
        "/_matrix/federation/v1/query/profile?user_id=%40a%3Agood.test",
        "/_matrix/federation/v1/user/keys/query",
        "/_matrix/client/v3/login",
    ],
)
async def test_endpoints_modgud_does_not_inspect_are_never_parsed(make_runtime, monkeypatch, path):
    """Key queries, other federation requests and non-federation paths are forwarded
    untouched whatever their size: modgud reads nothing of them (the homeserver applies
    its own request size limit to them; live, a body over the limit is streamed, below)."""
    no_parsing(monkeypatch, *EDGE_PARSERS)
    holder = make_runtime(verify_signatures=True, extra=SMALL)
    flow = await run_edge(holder, oversized_flow("POST", path, size=4 * LIMIT))
    assert flow.response is None
    assert recorded_findings(holder) == []


def _spy_on_hook_decisions(monkeypatch):
    """Record every call into the hook's decision code."""
    calls = []
    for name in ("note_state_change", "quick_decision", "evaluate_event", "decide_invite"):
        real = getattr(eventhook_module, name)

        def spy(*args, _real=real, _name=name, **kwargs):
            calls.append(_name)
            return _real(*args, **kwargs)

        monkeypatch.setattr(eventhook_module, name, spy)
    return calls


HOOK_LIMIT = 1024 * 1024  # eventhook.make_app's client_max_size


@pytest.mark.parametrize("callback", ["check_event_for_spam", "user_may_invite"])
async def test_event_hook_reads_no_body_over_its_limit(make_runtime, monkeypatch, callback):
    """The hook's aiohttp app reads at most client_max_size (1 MiB) of a body: a larger
    call decides nothing from its content — no decision code runs and nothing is
    recorded (an event is at most 64 KiB; no genuine call comes near the limit)."""
    calls = _spy_on_hook_decisions(monkeypatch)
    holder = make_runtime()
    event = client_event("@evil:denied.test", pad="x" * HOOK_LIMIT)
    async with TestClient(TestServer(make_app(holder))) as client:
        resp = await client.post(f"/{callback}", data=json.dumps(event).encode())
        assert resp.status in (200, 403, 413)
    assert calls == []
    assert recorded_findings(holder) == []


async def test_event_hook_answers_413_to_a_body_over_its_limit(make_runtime):
    """An oversized hook call is answered 413 (synapse-http-antispam then applies its own
    fail-open setting), not counted as a modgud internal error nor answered as if modgud
    had decided."""
    holder = make_runtime(on_error="closed")
    event = client_event("@a:good.test", pad="x" * HOOK_LIMIT)
    async with TestClient(TestServer(make_app(holder))) as client:
        resp = await client.post("/check_event_for_spam", data=json.dumps(event).encode())
        status = resp.status
    registry = holder.runtime.metrics.registry
    assert registry.get_sample_value("modgud_internal_errors_total", {"where": "hook"}) is None
    assert status == 413


async def test_outbound_answer_over_the_limit_is_not_parsed(outbound_holder, monkeypatch, caplog):
    """An answer to the homeserver's pull over outbound.MAX_ANSWER_BYTES is not parsed
    (decoded whole, it would take several times its size in memory): counted as let
    through unchecked (`fail_open{where="outbound"}`) and logged; the hook still judges
    every event of it the homeserver keeps. At the limit it is parsed as usual."""
    from proxy_addons.outbound import OutboundWatcher

    holder, key = outbound_holder
    body = json.dumps({"events": [evil()]}).encode()
    monkeypatch.setattr(outbound_module, "MAX_ANSWER_BYTES", len(body) - 1)
    real_parse = outbound_module.parse_json_body
    no_parsing(monkeypatch, (outbound_module, "parse_json_body"))
    with caplog.at_level(logging.WARNING, logger="proxy_addons.outbound"):
        await OutboundWatcher(holder).response(pull_flow(key, body))
    assert recorded_findings(holder) == []
    registry = holder.runtime.metrics.registry
    assert registry.get_sample_value("modgud_fail_open_total", {"where": "outbound"}) == 1
    assert any("not checked" in r.getMessage() for r in caplog.records)
    monkeypatch.setattr(outbound_module, "MAX_ANSWER_BYTES", len(body))
    monkeypatch.setattr(outbound_module, "parse_json_body", real_parse)
    await OutboundWatcher(holder).response(pull_flow(key, body))
    assert [r["rule"] for r in recorded_findings(holder)] == ["leak.pulled"]


async def test_compressed_outbound_answer_is_never_decompressed(outbound_holder, monkeypatch):
    """A content-encoded answer is left alone: Synapse does not decode federation answers
    (it refuses such an answer as not JSON), and decoding it here would let a small
    gzip expand without bound in modgud's memory."""
    from proxy_addons.outbound import OutboundWatcher

    holder, key = outbound_holder
    body = gzip.compress(json.dumps({"events": [evil()]}).encode())
    no_parsing(monkeypatch, (outbound_module, "parse_json_body"))
    flow = pull_flow(key, body, {"Content-Encoding": "gzip"})
    flow.response.raw_content = body  # as sent: mitmproxy would otherwise re-encode
    await OutboundWatcher(holder).response(flow)
    assert recorded_findings(holder) == []
    assert (
        holder.runtime.metrics.registry.get_sample_value(
            "modgud_internal_errors_total", {"where": "outbound"}
        )
        is None
    )


# 3. Listeners bind to loopback ---------------------------------------------------------

MINIMAL = "server_name: hs.test\nupstream: http://127.0.0.1:8008\n"


def write_config(tmp_path, text, name="modgud.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return path


def test_admin_surfaces_default_to_loopback(tmp_path):
    """The metrics listener and the event hook (the admin surfaces) bind to 127.0.0.1
    unless the config names another address; the outbound listener exists only when
    configured. Only the inbound federation port is public by default (it must be)."""
    config = load_config(write_config(tmp_path, MINIMAL))
    assert config.metrics is not None and str(config.metrics) == "127.0.0.1:9464"
    assert config.hook is None and config.outbound is None
    assert str(config.inbound) == "0.0.0.0:8448"
    (tmp_path / "hook.token").write_text("t0ken\n")
    config = load_config(write_config(tmp_path, MINIMAL + "hook: {token_file: hook.token}\n"))
    assert config.hook is not None and str(config.hook) == "127.0.0.1:8099"
    for listen in (config.metrics, config.hook):
        assert is_loopback(listen.host)


@pytest.mark.parametrize(
    ("host", "loopback"),
    [
        ("127.0.0.1", True),
        ("127.3.2.1", True),
        ("::1", True),
        ("localhost", True),
        ("LocalHost", True),
        ("0.0.0.0", False),
        ("::", False),
        ("192.168.1.10", False),
        ("10.0.0.1", False),
        ("fe80::1", False),
        ("modgud.internal", False),  # a name may resolve to anything
        ("", False),
    ],
)
def test_is_loopback(host, loopback):
    """Loopback means 127.0.0.0/8, ::1 or `localhost`; any other name does not count."""
    assert is_loopback(host) is loopback


@pytest.mark.parametrize("listen", ["0.0.0.0:8099", "[::]:8099", "10.1.2.3:8099", "hook.lan:8099"])
def test_hook_off_loopback_without_a_token_is_a_config_error(tmp_path, listen):
    """Whoever reaches the hook can have events judged, rooms refetched and findings
    recorded: off loopback it must require synapse-http-antispam's bearer token. Without
    hook.token_file it is a config error that names file, key and line; with one it
    loads."""
    text = MINIMAL + f"hook:\n  listen: '{listen}'\n"
    with pytest.raises(ConfigError) as info:
        load_config(write_config(tmp_path, text))
    error = info.value
    assert (error.key, error.line) == ("hook.listen", 4)
    assert "token_file" in error.message and str(error).startswith(str(tmp_path))
    (tmp_path / "hook.token").write_text("t0ken\n")
    config = load_config(write_config(tmp_path, text + "  token_file: hook.token\n"))
    assert config.hook is not None and not is_loopback(config.hook.host)


def test_metrics_off_loopback_only_when_configured(tmp_path):
    """A public metrics listener is the operator's explicit choice (Prometheus on another
    host): accepted as written, never a default."""
    config = load_config(write_config(tmp_path, MINIMAL + "listen: {metrics: '0.0.0.0:9464'}\n"))
    assert str(config.metrics) == "0.0.0.0:9464"


def test_explicit_binds_off_loopback_are_warned_about(tmp_path, capsys, caplog):
    """Metrics, outbound proxy and hook off loopback are each the operator's explicit
    choice, and each gets a warning saying what it exposes — printed by `modgud
    check-config` and logged when modgud starts. Loopback binds get none."""
    from mitmproxy.test import taddons

    from proxy_addons.cli import main
    from proxy_addons.config import exposure_warnings
    from proxy_addons.configurator import Configurator
    from proxy_addons.runtime import RuntimeHolder

    (tmp_path / "hook.token").write_text("t0ken\n")
    loopback = MINIMAL + "hook: {token_file: hook.token}\nlisten: {outbound: '[::1]:8449'}\n"
    assert exposure_warnings(load_config(write_config(tmp_path, loopback))) == []
    public = MINIMAL + (
        "listen: {metrics: '0.0.0.0:9464', outbound: '0.0.0.0:8449'}\n"
        "hook: {listen: '0.0.0.0:8099', token_file: hook.token}\n"
    )
    path = write_config(tmp_path, public, "public.yaml")
    warnings = exposure_warnings(load_config(path))
    assert [w.split(" ", 1)[0] for w in warnings] == [
        "listen.metrics",
        "listen.outbound",
        "hook.listen",
    ]
    assert main(["check-config", str(path)]) == 0
    printed = capsys.readouterr().out
    assert all(f"warning: {w}" in printed for w in warnings)
    holder = RuntimeHolder()
    configurator = Configurator(holder)
    with caplog.at_level(logging.WARNING), taddons.context(configurator) as tctx:
        tctx.configure(configurator, modgud_config=str(path))
    holder.runtime.store.close()
    logged = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert all(w in logged for w in warnings)


async def test_listeners_bind_where_the_config_says(make_runtime):
    """The metrics exporter and the hook listen on the configured loopback address, not
    on every interface."""
    import socket

    from proxy_addons.eventhook import EventHook
    from proxy_addons.exporter import MetricsExporter
    from proxy_addons.testbed.homeserver import free_port

    metrics_port, hook_port = free_port(), free_port()
    holder = make_runtime(
        extra=f"listen: {{metrics: '127.0.0.1:{metrics_port}'}}\n"
        f"hook: {{listen: '127.0.0.1:{hook_port}'}}\n"
    )
    exporter, hook = MetricsExporter(holder), EventHook(holder)
    exporter.running()
    hook.running()
    try:
        assert exporter._server.server_address[:2] == ("127.0.0.1", metrics_port)
        assert hook._started.wait(10)  # the hook serves from its own thread
        sites = list(hook._runner.sites)
        assert [s._sock.getsockname()[:2] for s in sites] == [("127.0.0.1", hook_port)]
        for port in (metrics_port, hook_port):
            with socket.create_connection(("127.0.0.1", port), timeout=5):
                pass
    finally:
        exporter.done()
        await hook.done()


# 4. Tokens: from files, never in logs ---------------------------------------------------

ADMIN_TOKEN = "syt_admin_S3CRET_a1b2c3"
HOOK_TOKEN = "hook_S3CRET_d4e5f6"
ROOM_ADMIN_TOKEN = "syt_roomadmin_S3CRET_g7h8"
TOKENS = (ADMIN_TOKEN, HOOK_TOKEN, ROOM_ADMIN_TOKEN)


def assert_no_token(text):
    for token in TOKENS + ("S3CRET",):
        assert token not in text, f"a token shows in: {text[:300]!r}"


def logged_text(caplog):
    """Everything the captured records would print: messages, arguments, tracebacks."""
    parts = []
    for record in caplog.records:
        parts.append(record.getMessage())
        if record.exc_info:
            parts.append("".join(traceback.format_exception(*record.exc_info)))
    return "\n".join(parts)


def test_config_repr_and_str_never_show_tokens(tmp_path):
    """Tokens are read from their files, and neither repr(), str() nor format() of the
    config shows any of them (nor the outbound signing key)."""
    (tmp_path / "admin.token").write_text(ADMIN_TOKEN + "\n")
    (tmp_path / "hook.token").write_text(HOOK_TOKEN)
    (tmp_path / "room.token").write_text(f"  {ROOM_ADMIN_TOKEN}\n\n")
    text = MINIMAL + (
        "hook: {token_file: hook.token}\n"
        "homeserver: {access_token_file: admin.token, room_admin_token_file: room.token}\n"
    )
    config = load_config(write_config(tmp_path, text))
    assert (config.admin_token, config.hook_token, config.room_admin_token) == TOKENS
    for shown in (repr(config), str(config), f"{config}", f"{config!r}"):
        assert_no_token(shown)
        assert "outbound_signing_key" not in shown


def test_check_config_output_shows_no_token(tmp_path, capsys):
    """`modgud check-config` says whether tokens are set, never what they are."""
    from proxy_addons.cli import main

    (tmp_path / "admin.token").write_text(ADMIN_TOKEN)
    (tmp_path / "hook.token").write_text(HOOK_TOKEN)
    text = MINIMAL + (
        "hook: {token_file: hook.token}\nhomeserver: {access_token_file: admin.token}\n"
    )
    assert main(["check-config", str(write_config(tmp_path, text))]) == 0
    out = capsys.readouterr()
    assert "admin token set" in out.out
    assert_no_token(out.out + out.err)


def _bad_token_files(tmp_path):
    """(file name, how it is made, what the error says), each holding a secret."""
    return [
        ("missing.token", None, "cannot read"),
        ("a-directory", lambda p: p.mkdir(), "cannot read"),
        ("empty.token", lambda p: p.write_text(" \n\t\n"), "is empty"),
        ("latin1.token", lambda p: p.write_bytes(b"\xff" + ADMIN_TOKEN.encode()), "not UTF-8"),
        ("two.token", lambda p: p.write_text(f"{ADMIN_TOKEN} {HOOK_TOKEN}\n"), "one token"),
        ("lines.token", lambda p: p.write_text(f"{ADMIN_TOKEN}\n{HOOK_TOKEN}\n"), "one token"),
        ("control.token", lambda p: p.write_text(f"{ADMIN_TOKEN}\x00"), "one token"),
        ("huge.token", lambda p: p.write_text(ADMIN_TOKEN * 1000), "not a token file"),
    ]


@pytest.mark.parametrize(
    ("section", "key"),
    [
        ("homeserver", "access_token_file"),
        ("homeserver", "room_admin_token_file"),
        ("hook", "token_file"),
    ],
)
def test_unusable_token_files_are_config_errors_without_their_content(tmp_path, section, key):
    """A token file that is missing, unreadable, empty, not UTF-8, holds more than one
    token or is huge is a config error naming the file, the key and the line — and never
    quoting what the file holds."""
    for name, make, message in _bad_token_files(tmp_path):
        if make is not None and not (tmp_path / name).exists():
            make(tmp_path / name)
        text = MINIMAL + f"{section}:\n  {key}: {name}\n"
        with pytest.raises(ConfigError) as info:
            load_config(write_config(tmp_path, text))
        error = info.value
        assert (error.key, error.line) == (f"{section}.{key}", 4), name
        assert message in error.message and name in error.message, (name, error.message)
        assert_no_token(str(error))
        # No chained exception shows in a traceback (a UnicodeDecodeError holds the bytes).
        assert error.__cause__ is None
        assert error.__context__ is None or error.__suppress_context__


class AdminApiStub:
    """A stand-in for the homeserver's admin API: answers each state request the way it
    is told to (401, 500, never, or a redirect to `elsewhere`) and keeps the
    Authorization headers it received."""

    def __init__(self, behaviour, elsewhere=None):
        self.behaviour, self.elsewhere = behaviour, elsewhere
        self.authorizations: list[str | None] = []
        self.release = asyncio.Event()

    async def handle(self, request):
        self.authorizations.append(request.headers.get("Authorization"))
        if self.behaviour == "hang":
            await self.release.wait()
        if self.behaviour == "redirect":
            raise web.HTTPFound(f"{self.elsewhere}{request.path_qs}")
        if self.behaviour == "401":
            return web.json_response(
                {"errcode": "M_UNKNOWN_TOKEN", "error": "Invalid access token passed."},
                status=401,
            )
        if self.behaviour == "ok":
            return web.json_response({"state": []})
        return web.Response(status=500, text="Internal Server Error")

    def app(self):
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self.handle)
        return app


async def _fetch_state_through(tmp_path, admin_api):
    """A runtime whose state source is the real admin-API client, with a token from a
    file, asked for one room's state (its HTTP session gives up after 0.3 s, the caller
    waits longer); returns the cache's answer and the failed fetches counted."""
    (tmp_path / "admin.token").write_text(ADMIN_TOKEN + "\n")
    cfg = write_config(
        tmp_path,
        MINIMAL
        + f"homeserver: {{admin_api: '{admin_api}', access_token_file: admin.token}}\n"
        + "database: m.db\nstate: {timeout_seconds: 0.3}\n",
    )
    runtime = build_runtime(load_config(cfg))
    try:
        result = await runtime.state.get(ROOM, 5)
        registry = runtime.metrics.registry
        failed = registry.get_sample_value("modgud_state_fetches_total", {"outcome": "error"})
        return result, failed
    finally:
        await runtime.aclose()


@pytest.mark.parametrize("behaviour", ["401", "500", "hang"])
async def test_admin_token_never_logged_when_state_fetches_fail(tmp_path, caplog, behaviour):
    """State fetches that fail — the token refused (401), a server error (500), or an
    answer that never comes — are logged and counted without the admin token, at any log
    level (DEBUG here, aiohttp's own loggers included). The stub shows the token was
    sent, so the test would see it if it leaked. Found missing: a fetch that timed out
    was neither logged nor counted (aiohttp's total timeout is no ClientError)."""
    from rules.checks import StateUnavailable

    stub = AdminApiStub(behaviour)
    async with TestServer(stub.app()) as server:
        caplog.set_level(logging.DEBUG)
        url = str(server.make_url("")).rstrip("/")
        result, failed = await _fetch_state_through(tmp_path, url)
        stub.release.set()
    assert isinstance(result, StateUnavailable) and failed == 1
    assert stub.authorizations == [f"Bearer {ADMIN_TOKEN}"]
    text = logged_text(caplog)
    assert "room state unavailable" in text
    assert_no_token(text)


async def test_admin_token_never_follows_a_redirect_elsewhere(tmp_path, caplog):
    """A redirect from the admin API to another server does not carry the admin token
    along (aiohttp drops Authorization on a cross-origin redirect), and nothing logs it."""
    elsewhere = AdminApiStub("ok")
    async with TestServer(elsewhere.app()) as other:
        redirecting = AdminApiStub("redirect", str(other.make_url("")).rstrip("/"))
        async with TestServer(redirecting.app()) as server:
            caplog.set_level(logging.DEBUG)
            await _fetch_state_through(tmp_path, str(server.make_url("")).rstrip("/"))
    assert redirecting.authorizations == [f"Bearer {ADMIN_TOKEN}"]
    assert elsewhere.authorizations == [None]
    assert_no_token(logged_text(caplog))


async def test_admin_token_never_logged_when_the_homeserver_is_down(tmp_path, caplog):
    """Connection refused: the error is logged with the URL, never the token."""
    from proxy_addons.testbed.homeserver import free_port

    caplog.set_level(logging.DEBUG)
    await _fetch_state_through(tmp_path, f"http://127.0.0.1:{free_port()}")
    assert "room state unavailable" in logged_text(caplog)
    assert_no_token(logged_text(caplog))


async def test_hook_token_never_logged_on_a_wrong_token(make_runtime, tmp_path, caplog):
    """A hook call with a wrong bearer token is refused 401 and logged as such, and the
    log holds neither the configured token nor the one the caller presented."""
    (tmp_path / "hook.token").write_text(HOOK_TOKEN)
    holder = make_runtime(extra="hook: {token_file: hook.token}\n")
    assert holder.runtime.config.hook_token == HOOK_TOKEN
    caplog.set_level(logging.DEBUG)
    wrong = ADMIN_TOKEN  # a real secret presented by mistake must not be logged either
    for token in (wrong, None, HOOK_TOKEN + "x"):
        for path in ("/check_event_for_spam", "/user_may_invite"):
            status, body = await post(holder, client_event("@a:good.test"), token, path)
            assert (status, body["errcode"]) == (401, "M_UNKNOWN_TOKEN")
    assert any("bearer token" in r.getMessage() for r in caplog.records)
    assert_no_token(logged_text(caplog))
    assert await post(holder, client_event("@a:good.test"), HOOK_TOKEN) == (200, {})


# 5. SQL only with parameters ------------------------------------------------------------

SQL_CALLS = {
    # sqlite3 (Connection, Cursor), and the query helpers of sqlite-utils should it come
    # back: the argument that holds SQL text.
    "execute": ("sql",),
    "executemany": ("sql",),
    # proxy_addons.database.Connection's readers
    "tuples": ("sql",),
    "dicts": ("sql",),
    "one": ("sql",),
    "executescript": ("sql", "sql_script"),
    "query": ("sql",),
    "rows_where": ("where",),
    "count_where": ("where",),
    "delete_where": ("where",),
}


class SqlBuilding:
    """Decides whether an expression is SQL text built only from constant strings,
    names bound to such text, fixed tuples of constant strings (column names) joined by
    a constant separator, and placeholders (`", ".join("?" for _ in values)`).

    Names are resolved where they are bound: in the enclosing functions (every binding,
    `+=` and `.append()` included, must be safe), then at module level, then through
    `from module import NAME` into this project's own modules. A function parameter,
    an attribute, a call other than a constant's `.join`, `%` or `.format()` is unsafe.
    """

    TEXT, ITEMS = "text", "items"  # SQL text; a collection of SQL texts
    MAX_DEPTH = 30

    def __init__(self, tree: ast.Module, modules: dict[str, ast.Module]) -> None:
        self.tree, self.modules = tree, modules
        self.parents: dict[ast.AST, ast.AST] = {}
        for node in ast.walk(tree):
            for child in ast.iter_child_nodes(node):
                self.parents[child] = node

    def safe(self, kind: str, node: ast.AST | None, env: dict[str, ast.AST], depth: int) -> bool:
        if node is None or depth > self.MAX_DEPTH:
            return False
        return (self._text if kind == self.TEXT else self._items)(node, env, depth + 1)

    def _text(self, node: ast.AST, env: dict[str, ast.AST], depth: int) -> bool:
        match node:
            case ast.Constant(value=str()):
                return True
            case ast.JoinedStr(values=values):
                return all(
                    isinstance(v, ast.Constant)
                    or (
                        isinstance(v, ast.FormattedValue)
                        and v.format_spec is None
                        and self.safe(self.TEXT, v.value, env, depth)
                    )
                    for v in values
                )
            case ast.BinOp(op=ast.Add(), left=left, right=right):
                return self.safe(self.TEXT, left, env, depth) and self.safe(
                    self.TEXT, right, env, depth
                )
            case ast.Call(
                func=ast.Attribute(value=ast.Constant(value=str()), attr="join"),
                args=[items],
                keywords=[],
            ):
                return self.safe(self.ITEMS, items, env, depth)
            case ast.Subscript(value=container, slice=index) if not isinstance(index, ast.Slice):
                # One element of a collection of safe texts, whatever the index.
                return self.safe(self.ITEMS, container, env, depth)
            case ast.Name(id=name):
                return self._name(self.TEXT, node, name, env, depth)
        return False

    def _items(self, node: ast.AST, env: dict[str, ast.AST], depth: int) -> bool:
        match node:
            case ast.Tuple(elts=elts) | ast.List(elts=elts) | ast.Set(elts=elts):
                return all(self.safe(self.TEXT, e, env, depth) for e in elts)
            case ast.Dict(keys=keys, values=values):  # indexed: a value; iterated: a key
                return all(
                    k is not None and self.safe(self.TEXT, k, env, depth) for k in keys
                ) and all(self.safe(self.TEXT, v, env, depth) for v in values)
            case (
                ast.GeneratorExp(elt=elt, generators=gens)
                | ast.ListComp(elt=elt, generators=gens)
                | ast.DictComp(key=_, value=elt, generators=gens)
            ):
                inner = dict(env)
                for gen in gens:
                    if isinstance(gen.target, ast.Name):
                        inner[gen.target.id] = gen.iter
                    else:
                        for target in ast.walk(gen.target):
                            if isinstance(target, ast.Name):
                                inner[target.id] = ast.Name("an unknown value")
                elements = [elt, *([node.key] if isinstance(node, ast.DictComp) else [])]
                # An element built from constants needs nothing of what it iterates.
                return all(self.safe(self.TEXT, e, inner, depth) for e in elements)
            case ast.Name(id=name):
                return self._name(self.ITEMS, node, name, env, depth)
        return False

    def _name(self, kind: str, use: ast.AST, name: str, env: dict, depth: int) -> bool:
        if name in env:  # a comprehension's variable: an element of what it iterates
            return kind == self.TEXT and self.safe(self.ITEMS, env[name], {}, depth)
        for scope in self._scopes(use):
            bindings = self.bindings(scope, name)
            if bindings is None:
                return False  # a parameter: anything at all
            if bindings:
                return all(binding(kind, depth) for binding in bindings)
        return False

    def _scopes(self, node: ast.AST) -> list[ast.AST]:
        """The functions around `node`, innermost first, then the module."""
        out: list[ast.AST] = []
        while node in self.parents:
            node = self.parents[node]
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda):
                out.append(node)
        return [*out, self.tree]

    def bindings(self, scope: ast.AST, name: str) -> list | None:
        """A check (kind, depth) -> bool per binding of `name` directly in `scope` (not
        in nested functions); None when `name` is a parameter of `scope`."""
        if isinstance(scope, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda):
            a = scope.args
            params = [*a.posonlyargs, *a.args, *a.kwonlyargs, a.vararg, a.kwarg]
            if any(p is not None and p.arg == name for p in params):
                return None
        safe, text, items = self.safe, self.TEXT, self.ITEMS

        def unsafe(kind, depth):
            return False

        found = []
        for node in self._own_nodes(scope):
            match node:
                case ast.Assign(targets=targets, value=value):
                    for target in targets:
                        found += self._assigned(target, value, name)
                case ast.AnnAssign(target=ast.Name(id=n), value=value) if n == name:
                    found.append(lambda kind, d, v=value: safe(kind, v, {}, d))
                case ast.AugAssign(target=ast.Name(id=n), op=ast.Add(), value=v) if n == name:
                    found.append(lambda kind, d, v=v: safe(kind, v, {}, d))
                case ast.AugAssign(target=ast.Name(id=n)) if n == name:
                    found.append(unsafe)
                case ast.For(target=ast.Name(id=n), iter=it) if n == name:
                    found.append(lambda kind, d, it=it: kind == text and safe(items, it, {}, d))
                case ast.For(target=target) if any(
                    isinstance(t, ast.Name) and t.id == name for t in ast.walk(target)
                ):
                    found.append(unsafe)
                case ast.Call(
                    func=ast.Attribute(value=ast.Name(id=n), attr="append" | "insert"),
                    args=[*_, arg],
                ) if n == name:
                    found.append(lambda kind, d, a=arg: kind == items and safe(text, a, {}, d))
                case ast.Call(
                    func=ast.Attribute(value=ast.Name(id=n), attr="extend"), args=[arg]
                ) if n == name:
                    found.append(lambda kind, d, a=arg: kind == items and safe(items, a, {}, d))
                case ast.ImportFrom(module=module, names=aliases) if scope is self.tree:
                    for alias in aliases:
                        if (alias.asname or alias.name) == name:
                            found.append(self._imported(module, alias.name))
                case ast.Import(names=aliases) if any(
                    (a.asname or a.name) == name for a in aliases
                ):
                    found.append(unsafe)
        return found

    def _assigned(self, target: ast.AST, value: ast.AST, name: str) -> list:
        if isinstance(target, ast.Name) and target.id == name:
            return [lambda kind, d, v=value: self.safe(kind, v, {}, d)]
        if isinstance(target, ast.Tuple | ast.List):
            if isinstance(value, ast.Tuple | ast.List) and len(value.elts) == len(target.elts):
                return [
                    b
                    for t, v in zip(target.elts, value.elts, strict=True)
                    for b in self._assigned(t, v, name)
                ]
            if any(isinstance(t, ast.Name) and t.id == name for t in ast.walk(target)):
                return [lambda kind, d: False]
        return []

    def _imported(self, module: str | None, original: str):
        tree = self.modules.get(module or "")

        def resolved(kind, depth):
            if tree is None:
                return False  # not this project's: unknown
            bindings = SqlBuilding(tree, self.modules).bindings(tree, original) or []
            return bool(bindings) and all(b(kind, depth + 1) for b in bindings)

        return resolved

    @staticmethod
    def _own_nodes(scope: ast.AST):
        """The nodes of `scope`'s body, not descending into nested functions/classes."""
        stack = list(ast.iter_child_nodes(scope))
        while stack:
            node = stack.pop()
            yield node
            if not isinstance(
                node, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda | ast.ClassDef
            ):
                stack.extend(ast.iter_child_nodes(node))


def sql_arguments(tree: ast.Module):
    """(call, the expression passed as SQL) for every SQL-taking call in a module."""
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call) or not isinstance(node.func, ast.Attribute):
            continue
        names = SQL_CALLS.get(node.func.attr)
        if names is None:
            continue
        sql = node.args[0] if node.args else None
        for keyword in node.keywords:
            if keyword.arg in names:
                sql = keyword.value
        if sql is not None:
            yield node, sql


def project_modules() -> dict[str, ast.Module]:
    modules = {}
    for package in ("proxy_addons", "rules"):
        for path in sorted((REPO / package).rglob("*.py")):
            name = ".".join(path.relative_to(REPO).with_suffix("").parts)
            modules[name] = ast.parse(path.read_text(encoding="utf-8"), str(path))
    return modules


# The one place SQL passes through a parameter: proxy_addons.database's Connection hands
# its callers' statements (checked at every call of its methods, in SQL_CALLS) to the
# engine, and Database.migrate runs the migrations' constant DDL.
PASS_THROUGH = {
    ("proxy_addons.database", "execute"),
    ("proxy_addons.database", "executemany"),
    ("proxy_addons.database", "tuples"),
    ("proxy_addons.database", "dicts"),
    ("proxy_addons.database", "one"),
    ("proxy_addons.database", "migrate"),
}


def _enclosing_functions(tree: ast.Module) -> dict[ast.AST, str]:
    """Each node's innermost enclosing function (ast.walk goes outer before inner)."""
    owner: dict[ast.AST, str] = {}
    for function in ast.walk(tree):
        if isinstance(function, ast.FunctionDef | ast.AsyncFunctionDef):
            for node in ast.walk(function):
                if node is not function:
                    owner[node] = function.name
    return owner


def unsafe_sql(modules: dict[str, ast.Module]) -> list[str]:
    problems = []
    for name, tree in modules.items():
        checker = SqlBuilding(tree, modules)
        owner = _enclosing_functions(tree)
        for call, sql in sql_arguments(tree):
            if (name, owner.get(call)) in PASS_THROUGH:
                continue
            if not checker.safe(SqlBuilding.TEXT, sql, {}, 0):
                problems.append(f"{name}:{call.lineno}: {ast.unparse(sql)[:120]}")
    return problems


def test_sql_is_built_only_from_constants_column_names_and_placeholders():
    """Every execute/executemany/executescript/query (sqlite3, sqlite_utils) in rules/
    and proxy_addons/ gets SQL made of constant text, fixed column-name tuples joined
    by a constant and `?` placeholders — resolved through the names it is built from,
    whatever `# noqa: S608` says. Values go in as parameters, always."""
    modules = project_modules()
    calls = sum(1 for tree in modules.values() for _ in sql_arguments(tree))
    assert calls >= 10  # the walk does find the store's, the index's and the leaks' SQL
    assert unsafe_sql(modules) == []


UNSAFE_SNIPPETS = {
    "f-string with a value": "def f(conn, room):\n    conn.execute(f'SELECT * FROM t WHERE r = {room}')\n",
    "% formatting": "def f(conn, room):\n    conn.execute('SELECT * FROM t WHERE r = %s' % room)\n",
    ".format()": "def f(conn, room):\n    conn.execute('SELECT {}'.format(room))\n",
    "concatenated value": "def f(db, room):\n    db.query('SELECT * FROM t WHERE r = ' + room)\n",
    "value via a local": "def f(c, room):\n    sql = 'SELECT ' + room\n    c.executemany(sql, [])\n",
    "appended value": (
        "def f(c, room):\n    where = ['a = ?']\n    where.append(f'r = {room}')\n"
        "    c.execute('SELECT 1 WHERE ' + ' AND '.join(where))\n"
    ),
    "joined values": "def f(c, rooms):\n    c.execute('SELECT ' + ', '.join(rooms))\n",
    "joined generated values": (
        "def f(c, rooms):\n    c.execute('IN (' + ','.join(f'{r}' for r in rooms) + ')')\n"
    ),
    "+= a value": "def f(c, room):\n    sql = 'SELECT 1'\n    sql += room\n    c.execute(sql)\n",
    "attribute": "def f(self, c):\n    c.executescript(self.sql)\n",
    "sqlite_utils where": "def f(t, room):\n    t.rows_where(f'r = {room}')\n",
    "keyword sql": "def f(db, room):\n    db.query(sql='SELECT ' + room)\n",
    "module name from a call": "import os\nSQL = os.environ['X']\ndef f(c):\n    c.execute(SQL)\n",
    "element of a list of values": "def f(c, rooms):\n    c.execute(rooms[0])\n",
    "dict holding a value": (
        "import os\nSQL = {'a': 'SELECT 1', 'b': os.environ['X']}\n"
        "def f(c, t):\n    c.execute(SQL[t])\n"
    ),
    "dict keyed by values": (
        "import os\nSQL = {os.environ['X']: 'SELECT 1'}\n"
        "def f(c):\n    for k in SQL:\n        c.execute(k)\n"
    ),
    "dict comprehension over values": (
        "def f(c, rooms):\n    sql = {r: f'SELECT {r}' for r in rooms}\n    c.execute(sql['x'])\n"
    ),
}

SAFE_SNIPPETS = {
    "constant": "def f(c, r):\n    c.execute('SELECT * FROM t WHERE r = ?', [r])\n",
    "column tuple": (
        "COLS = ('a', 'b')\ndef f(c):\n    c.execute('SELECT ' + ', '.join(COLS) + ' FROM t')\n"
    ),
    "prefixed columns": (
        "COLS = ('a', 'b')\ndef f(c):\n    c.execute(f\"SELECT {', '.join(f'k.{x}' for x in COLS)}\")\n"
    ),
    "placeholders": (
        "def f(c, vs):\n    m = ', '.join('?' for _ in vs)\n"
        "    c.execute(f'SELECT 1 WHERE v IN ({m})', vs)\n"
    ),
    "constant conditions": (
        "def f(c, a):\n    where, params = [], []\n    if a:\n        where.append('a = ?')\n"
        "        params.append(a)\n    sql = 'SELECT 1'\n    if where:\n"
        "        sql += ' WHERE ' + ' AND '.join(where)\n    c.execute(sql, params)\n"
    ),
    "loop over constants": (
        "SCHEMA = ('CREATE TABLE a (x)', 'CREATE TABLE b (y)')\n"
        "def f(c):\n    for s in SCHEMA:\n        c.execute(s)\n"
    ),
    "per-table text chosen by key": (
        "TABLES = ('a', 'b')\nCOLS = {'a': 'x, y', 'b': 'z'}\n"
        "SQL = {t: f'SELECT {COLS[t]} FROM {t}' for t in TABLES}\n"
        "def f(c, t):\n    c.execute(SQL[t])\n"
    ),
}


@pytest.mark.parametrize("source", UNSAFE_SNIPPETS.values(), ids=UNSAFE_SNIPPETS)
def test_sql_check_catches_values_built_into_sql(source):
    """The check above is not vacuous: SQL built with a value by f-string, %, .format(),
    concatenation, a local, an appended condition or an attribute is caught."""
    assert unsafe_sql({"snippet": ast.parse(source)}) != []


@pytest.mark.parametrize("source", SAFE_SNIPPETS.values(), ids=SAFE_SNIPPETS)
def test_sql_check_accepts_the_documented_safe_patterns(source):
    """Constant SQL, fixed column names (also prefixed), placeholders and conditions
    chosen from constants, as proxy_addons/store.py builds its queries, pass."""
    assert unsafe_sql({"snippet": ast.parse(source)}) == []


async def test_a_refused_deliverer_cannot_get_a_permitted_servers_event_refused(make_runtime):
    """denied.test (ACL-denied) delivers an event good.test wrote, first: refused at the
    edge for who delivered it, but that refusal is not kept for the hook — when good.test
    delivers the same event, the hook allows it. A refused server must not be able to
    censor others' events by delivering them first."""
    from rules.roomversion import get_room_version
    from rules.signatures import sign_event

    holder = make_runtime()
    event = sign_event(pdu("@a:good.test"), get_room_version("10"), "good.test", KEYS["good.test"])
    first = await run_edge(holder, send_flow("denied.test", [event]))
    assert first.response is not None and first.response.status_code == 200  # answered
    rows = recorded_findings(holder)
    assert [(r["rule"], r["attributed_to"]) for r in rows] == [("acl.origin", "denied.test")]
    assert holder.runtime.verdicts.get(rows[0]["event_id"]) is None
    second = await run_edge(holder, send_flow("good.test", [event], txn_id="t2"))
    assert second.response is None  # forwarded
    body = {"event": {**event, "event_id": rows[0]["event_id"]}}
    async with TestClient(TestServer(make_app(holder))) as client:
        resp = await client.post("/check_event_for_spam", json=body)
        assert resp.status == 200
