"""The edge (Enforcer addon) with mitmproxy's taddons/tflow: what is answered locally,
what is forwarded untouched, what the hook is told, and what is recorded."""

from __future__ import annotations

import json

from mitmproxy import http
from mitmproxy.test import taddons

from proxy_addons.enforcer import Enforcer
from rules.findings import Decision
from tests.proxy_addons.conftest import (
    KEYS,
    OPEN_ROOM,
    ROOM,
    StaticStateSource,
    get_flow,
    pdu,
    policy,
    recorded_findings,
    run_edge,
    send_flow,
)

run = run_edge
findings = recorded_findings


async def test_allowed_transaction_is_forwarded_untouched(make_runtime):
    """All PDUs allowed: no local answer, body unchanged, no finding."""
    holder = make_runtime()
    flow = send_flow("good.test", [pdu("@a:good.test"), pdu("@b:good.test", body="x")])
    before = flow.request.raw_content
    await run(holder, flow)
    assert flow.response is None
    assert flow.request.raw_content == before
    assert findings(holder) == []


async def test_denied_origin_whole_transaction_answered_locally(make_runtime):
    """Every PDU refused: answered locally in Synapse's per-PDU error shape, never forwarded."""
    holder = make_runtime()
    flow = send_flow("denied.test", [pdu("@a:denied.test"), pdu("@a:denied.test", body="2")])
    await run(holder, flow)
    assert flow.response is not None and flow.response.status_code == 200
    answer = json.loads(flow.response.content)
    assert len(answer["pdus"]) == 2
    for result in answer["pdus"].values():
        assert result["errcode"] == "M_FORBIDDEN"
        assert "denied by the room's server ACL" in result["error"]
    rows = findings(holder)
    assert {(r["rule"], r["action"], r["attributed_to"]) for r in rows} == {
        ("acl.origin", "rejected", "denied.test")
    }
    assert all(r["event_id"] in answer["pdus"] for r in rows)


async def test_relayed_event_of_denied_server_is_left_to_the_hook(make_runtime):
    """Mixed transaction: forwarded untouched; the relayed event's refusal waits for the hook."""
    holder = make_runtime()
    leaked = pdu("@evil:denied.test", body="leak")
    flow = send_flow("relay.test", [pdu("@ok:relay.test"), leaked])
    await run(holder, flow)
    assert flow.response is None
    rows = findings(holder)
    assert [(r["rule"], r["action"], r["attributed_to"], r["sender_server"]) for r in rows] == [
        ("acl.sender", "dropped", "relay.test", "denied.test")
    ]
    verdict = holder.runtime.verdicts.get(rows[0]["event_id"])
    assert verdict is not None and verdict.decision is Decision.REFUSE


async def test_audit_mode_never_answers(make_runtime):
    """Audit: even a fully refused transaction is forwarded; findings are `flagged`."""
    holder = make_runtime(mode="audit")
    flow = send_flow("denied.test", [pdu("@a:denied.test")])
    await run(holder, flow)
    assert flow.response is None
    assert [(r["rule"], r["action"]) for r in findings(holder)] == [("acl.origin", "flagged")]


async def test_malformed_body_refused_in_enforce_forwarded_in_audit(make_runtime):
    """Non-JSON bodies get a clear 400 in enforce and a finding; audit forwards them."""
    for mode, status in (("enforce", 400), ("audit", None)):
        holder = make_runtime(mode=mode)
        flow = send_flow("good.test", raw_body=b"{not json")
        await run(holder, flow)
        assert (flow.response.status_code if flow.response else None) == status
        assert [r["rule"] for r in findings(holder)] == ["malformed.request"]


async def test_too_many_pdus_refused(make_runtime):
    """51 PDUs is over the spec's limit: refused before any room is looked up."""
    source = StaticStateSource({ROOM: policy()})
    holder = make_runtime(source=source)
    flow = send_flow("good.test", [pdu("@a:good.test", body=str(i)) for i in range(51)])
    await run(holder, flow)
    assert flow.response.status_code == 400
    assert source.fetches == 0


async def test_edu_impersonation_alone_is_refused(make_runtime):
    """A typing EDU for another server's user is impersonation; alone, it is answered locally."""
    holder = make_runtime()
    edu = {
        "edu_type": "m.typing",
        "content": {"room_id": OPEN_ROOM, "user_id": "@v:good.test", "typing": True},
    }
    flow = send_flow("relay.test", edus=[edu])
    await run(holder, flow)
    assert flow.response is not None and flow.response.status_code == 200
    assert [(r["rule"], r["attributed_to"]) for r in findings(holder)] == [
        ("edu.impersonation", "relay.test")
    ]


async def test_typing_from_acl_denied_origin_refused(make_runtime):
    """MSC4163: typing EDUs are subject to the room's ACL for the origin."""
    holder = make_runtime()
    edu = {
        "edu_type": "m.typing",
        "content": {"room_id": ROOM, "user_id": "@a:denied.test", "typing": True},
    }
    flow = send_flow("denied.test", edus=[edu])
    await run(holder, flow)
    assert flow.response is not None
    assert [r["rule"] for r in findings(holder)] == ["acl.edu"]


async def test_state_unavailable_open_forwards_and_counts(make_runtime):
    """on_error open: the homeserver's state API down → forwarded, fail-open finding recorded."""
    holder = make_runtime(source=StaticStateSource(fail=True))
    flow = send_flow("denied.test", [pdu("@a:denied.test")])
    await run(holder, flow)
    assert flow.response is None
    assert [r["rule"] for r in findings(holder)] == ["error.state_unavailable"]
    counted = holder.runtime.metrics.registry.get_sample_value(
        "modgud_fail_open_total", {"where": "state"}
    )
    assert counted == 1


async def test_state_unavailable_closed_asks_sender_to_retry(make_runtime):
    """on_error closed: nothing unverified passes; a 503 makes the sender resend later."""
    holder = make_runtime(on_error="closed", source=StaticStateSource(fail=True))
    flow = send_flow("good.test", [pdu("@a:good.test")])
    await run(holder, flow)
    assert flow.response is not None and flow.response.status_code == 503


async def test_room_data_endpoint_denied_origin_gets_403(make_runtime):
    """make_join from an ACL-denied origin: 403 M_FORBIDDEN, as the spec requires."""
    holder = make_runtime()
    path = "/_matrix/federation/v1/make_join/%21room%3Ahs.test/%40a%3Adenied.test"
    flow = get_flow("denied.test", path)
    await run(holder, flow)
    assert flow.response.status_code == 403
    assert json.loads(flow.response.content)["errcode"] == "M_FORBIDDEN"
    allowed = get_flow("good.test", path.replace("denied", "good"))
    await run(holder, allowed)
    assert allowed.response is None


async def test_internal_error_fails_open_or_closed(make_runtime):
    """An unexpected exception is caught by modgud itself: open forwards, closed answers 503."""
    for on_error, status in (("open", None), ("closed", 503)):
        holder = make_runtime(on_error=on_error)
        holder.runtime.state.get_many = None  # any call now raises TypeError inside the check
        flow = send_flow("good.test", [pdu("@a:good.test")])
        await run(holder, flow)
        assert (flow.response.status_code if flow.response else None) == status
        assert (
            holder.runtime.metrics.registry.get_sample_value(
                "modgud_internal_errors_total", {"where": "edge"}
            )
            == 1
        )


async def test_forged_request_signature_blames_nobody(make_runtime):
    """A request claiming denied.test but signed with another key: 401, and the finding
    blames no server (a forged origin cannot get another server blamed)."""
    holder = make_runtime(verify_signatures=True)
    runtime = holder.runtime
    from signedjson.key import get_verify_key

    from rules.signatures import ServerKey

    real = KEYS["denied.test"]
    key_id = f"ed25519:{real.version}"
    runtime.keys._keys["denied.test"] = (
        1e18,
        {key_id: ServerKey("denied.test", key_id, get_verify_key(real), None)},
    )
    forged = send_flow("denied.test", [pdu("@a:denied.test")], key=KEYS["relay.test"])
    await run(holder, forged)
    assert forged.response.status_code == 401
    rows = findings(holder)
    assert [(r["rule"], r["attributed_to"]) for r in rows] == [("signature.request", None)]
    genuine = send_flow("denied.test", [pdu("@a:denied.test")])
    await run(holder, genuine)
    assert genuine.response.status_code == 200  # answered locally: ACL refusal, now attributable


async def test_event_fetch_by_denied_origin_answered_403(make_runtime):
    """/v1/event/{id} names no room: modgud learns it from the homeserver's answer and
    replaces that answer with 403 for an origin the room's ACL denies."""
    from mitmproxy import http

    holder = make_runtime()
    event = pdu("@a:good.test")
    answer = json.dumps({"origin": "hs.test", "origin_server_ts": 1, "pdus": [event]}).encode()
    path = "/_matrix/federation/v1/event/%24abc"
    for origin, status in (("denied.test", 403), ("good.test", 200)):
        flow = get_flow(origin, path)
        enforcer = Enforcer(holder)
        with taddons.context(enforcer):
            await enforcer.request(flow)
            assert flow.response is None  # the room is not known before the answer
            flow.response = http.Response.make(200, answer, {"Content-Type": "application/json"})
            await enforcer.response(flow)
        assert flow.response.status_code == status
        if status == 403:
            assert json.loads(flow.response.content)["errcode"] == "M_FORBIDDEN"
        else:
            assert json.loads(flow.response.content)["pdus"][0]["sender"] == "@a:good.test"
    rows = findings(holder)
    assert [(r["rule"], r["action"], r["endpoint"], r["event_id"]) for r in rows] == [
        ("acl.origin", "rejected", "event", "$abc")
    ]


async def test_oversized_body_refused_before_any_parsing(make_runtime, monkeypatch):
    """Over max_body_bytes: 413 in enforce without parsing the body (not even for the
    X-Matrix check), and the claimed origin is not blamed."""
    import proxy_addons.enforcer as enforcer_module

    def no_parsing(*args, **kwargs):
        raise AssertionError("the oversized body was parsed")

    monkeypatch.setattr(enforcer_module, "parse_json_body", no_parsing)
    monkeypatch.setattr(enforcer_module, "parse_transaction", no_parsing)
    holder = make_runtime(verify_signatures=True)
    big = [pdu("@a:good.test", body="x" * 60_000) for _ in range(250)]  # ~15 MB
    flow = send_flow("good.test", big)
    await run(holder, flow)
    assert flow.response.status_code == 413
    assert json.loads(flow.response.content)["errcode"] == "M_TOO_LARGE"
    (row,) = findings(holder)
    assert (row["rule"], row["origin"], row["attributed_to"]) == (
        "malformed.request",
        "good.test",
        None,
    )


async def test_sink_mode_answers_everything_locally_and_flags(make_runtime):
    """mode: sink (a mirror's copy): nothing is forwarded, /send gets Synapse's shape,
    other requests an empty object; findings are flagged as in audit."""
    holder = make_runtime(mode="sink")
    for flow in (
        send_flow("denied.test", [pdu("@a:denied.test")]),
        send_flow("good.test", [pdu("@a:good.test")], txn_id="t2"),
    ):
        await run(holder, flow)
        assert flow.response.status_code == 200
        assert json.loads(flow.response.content) == {"pdus": {}}
    path = "/_matrix/federation/v1/make_join/%21room%3Ahs.test/%40a%3Adenied.test"
    join = await run(holder, get_flow("denied.test", path))
    assert (join.response.status_code, json.loads(join.response.content)) == (200, {})
    assert [(r["rule"], r["action"]) for r in findings(holder)] == [
        ("acl.origin", "flagged"),
        ("acl.origin", "flagged"),
    ]


async def test_flows_modgud_looked_at_can_still_be_saved(make_runtime, tmp_path):
    """mitmproxy's Save addon (-w) refuses flows whose metadata it cannot serialise:
    modgud keeps its per-flow state beside the flow, so captures keep working."""
    from mitmproxy.addons.save import Save

    holder = make_runtime()
    flow = await run(holder, send_flow("good.test", [pdu("@a:good.test")]))
    flow.response = http.Response.make(200, b"{}")
    save = Save()
    with taddons.context(save) as tctx:
        tctx.configure(save, save_stream_file=str(tmp_path / "capture.flows"))
        save.response(flow)
    assert (tmp_path / "capture.flows").stat().st_size > 0


def _signed(event, server="good.test"):
    from rules.roomversion import get_room_version
    from rules.signatures import sign_event

    return sign_event(event, get_room_version("10"), server, KEYS[server])


async def test_origin_key_unavailable_open_counts_closed_asks_to_retry(make_runtime):
    """The origin's signing key cannot be had (key servers down): on_error open lets the
    request through unauthenticated and counts it (`request_key`); closed answers 503 so
    the sender resends once the key can be fetched. Key fetching is a stub that always
    fails (no key server can run inside a unit test)."""
    for on_error, status in (("open", None), ("closed", 503)):
        holder = make_runtime(on_error=on_error, verify_signatures=True)

        async def unreachable(server, key_id):
            return None

        holder.runtime.keys.ensure = unreachable
        flow = send_flow("good.test", [_signed(pdu("@a:good.test"))])
        await run(holder, flow)
        assert (flow.response.status_code if flow.response else None) == status
        counted = holder.runtime.metrics.registry.get_sample_value(
            "modgud_fail_open_total", {"where": "request_key"}
        )
        assert counted == (1 if on_error == "open" else None)


async def test_event_keys_unavailable_pass_on_policy_and_are_counted(make_runtime):
    """The request is authenticated but a relayed PDU's author's keys cannot be had: the
    policy checks still decide (a denied author is refused), the rest passes — the
    homeserver verifies event signatures itself — and each unchecked PDU is counted."""
    from tests.proxy_addons.test_signature_cache import _trust

    holder = make_runtime(on_error="closed", verify_signatures=True)
    _trust(holder.runtime, "relay.test")
    real_ensure = holder.runtime.keys.ensure

    async def only_known(server, key_id):
        return await real_ensure(server, key_id) if server == "relay.test" else None

    holder.runtime.keys.ensure = only_known
    flow = send_flow(
        "relay.test", [_signed(pdu("@a:good.test")), _signed(pdu("@b:good.test", body="2"))]
    )
    await run(holder, flow)
    assert flow.response is None  # forwarded
    assert (
        holder.runtime.metrics.registry.get_sample_value(
            "modgud_fail_open_total", {"where": "event_key"}
        )
        == 2
    )


async def test_clean_stop_answers_what_is_in_flight_and_turns_new_requests_away(make_runtime):
    """On SIGTERM mitmproxy runs the addons' `done`; the Configurator's waits until every
    request forwarded to the homeserver has its answer (the homeserver calls the hook for
    those events meanwhile) and new requests get a 503, so their senders retry later."""
    import asyncio

    from mitmproxy.flow import Error

    from proxy_addons.configurator import Configurator

    holder = make_runtime()
    enforcer = Enforcer(holder)
    inflight = holder.runtime.inflight
    forwarded = send_flow("good.test", [pdu("@a:good.test")])
    lost = send_flow("good.test", [pdu("@a:good.test", body="lost")])
    with taddons.context(enforcer):
        await enforcer.request(forwarded)
        await enforcer.request(lost)
        assert forwarded.response is None and len(inflight) == 2
        lost.error = Error("connection lost")
        enforcer.error(lost)  # the homeserver never answered this one
        assert len(inflight) == 1
        stopping = asyncio.create_task(Configurator(holder).done())
        await asyncio.sleep(0.3)
        assert not stopping.done()
        late = send_flow("good.test", [pdu("@b:good.test", body="late")])
        await enforcer.request(late)
        assert late.response is not None and late.response.status_code == 503
        assert len(inflight) == 1  # a request answered locally is not waited for
        forwarded.response = http.Response.make(200, b'{"pdus": {}}')
        await enforcer.response(forwarded)
        await asyncio.wait_for(stopping, 5)
    assert len(inflight) == 0
    counted = holder.runtime.metrics.registry.get_sample_value(
        "modgud_requests_total",
        {"direction": "inbound", "endpoint": "send", "outcome": "unavailable"},
    )
    assert counted == 1


async def test_drain_gives_up_after_its_timeout():
    """A homeserver that never answers cannot hold modgud's stop up beyond the timeout."""
    from proxy_addons.runtime import InFlight

    inflight = InFlight()
    inflight.add("stuck")
    assert await inflight.drain(0.2) == 1
    assert inflight.closing


async def test_an_oversized_pdu_is_refused_by_its_event_id_and_the_hook_refuses_it(make_runtime):
    """A PDU over the 65,536-byte limit next to a fine one: the transaction is forwarded
    (its other PDU must arrive), the big one recorded with its event ID as dropped, and the
    edge leaves a refusal for it, which the event hook gives when the homeserver asks."""
    from proxy_addons.eventhook import quick_decision
    from rules.eventhash import compute_event_id
    from rules.roomversion import get_room_version

    holder = make_runtime()
    big = pdu("@a:good.test", body="x" * 70_000)
    flow = send_flow("good.test", [pdu("@a:good.test"), big])
    await run(holder, flow)
    assert flow.response is None
    event_id = compute_event_id(big, get_room_version("10"))
    rows = findings(holder)
    assert [(r["rule"], r["action"], r["event_id"], r["attributed_to"]) for r in rows] == [
        ("malformed.pdu", "dropped", event_id, "good.test")
    ]
    answer = quick_decision(
        holder.runtime, {"event_id": event_id, "room_id": ROOM, "sender": "@a:good.test"}
    )
    assert answer is not None and answer[0].status == 403 and answer[1] == "edge"
