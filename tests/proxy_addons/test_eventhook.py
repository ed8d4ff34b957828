"""The event hook over real HTTP (aiohttp on loopback), speaking synapse-http-antispam's
protocol: 2xx allows, 403 JSON refuses."""

from __future__ import annotations

import asyncio
import dataclasses

from aiohttp.test_utils import TestClient, TestServer

from proxy_addons.eventhook import make_app
from proxy_addons.store import query_findings
from proxy_addons.verdicts import EdgeVerdict
from rules.eventhash import compute_event_id
from rules.findings import Decision
from rules.roomversion import get_room_version
from rules.signatures import sign_event
from tests.proxy_addons.conftest import (
    OPEN_ROOM,
    ROOM,
    StaticStateSource,
    policy,
    recorded_findings,
)


def client_event(sender, event_id="$e1", room_id=ROOM, **extra):
    return {
        "event": {
            "event_id": event_id,
            "room_id": room_id,
            "sender": sender,
            "type": "m.room.message",
            "content": {"body": "x"},
            **extra,
        }
    }


async def post(holder, body, token=None, path="/check_event_for_spam"):
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    async with TestClient(TestServer(make_app(holder))) as client:
        resp = await client.post(path, json=body, headers=headers)
        return resp.status, await resp.json()


async def test_edge_verdict_refuses_and_allows(make_runtime):
    """An event the edge refused gets 403 M_FORBIDDEN with the reason; one it allowed, 200."""
    holder = make_runtime()
    holder.runtime.verdicts.put(
        "$bad", EdgeVerdict(Decision.REFUSE, "written by denied.test", "relay.test")
    )
    holder.runtime.verdicts.put("$good", EdgeVerdict(Decision.ALLOW, "allowed", "good.test"))
    status, body = await post(holder, client_event("@x:relay.test", "$bad"))
    assert (status, body["errcode"]) == (403, "M_FORBIDDEN")
    assert "denied.test" in body["error"]
    assert await post(holder, client_event("@x:good.test", "$good")) == (200, {})


async def test_unseen_event_is_evaluated_against_room_state(make_runtime):
    """An event the edge never saw (pulled by the homeserver) is checked by the hook itself."""
    holder = make_runtime()
    status, _ = await post(holder, client_event("@evil:denied.test", "$pulled"))
    assert status == 403
    assert (await post(holder, client_event("@ok:good.test", "$fine")))[0] == 200
    assert holder.runtime.store.flush(5)
    rows = list(query_findings([holder.runtime.config.database]))
    assert [(r["rule"], r["action"], r["event_id"], r["endpoint"]) for r in rows] == [
        ("acl.sender", "dropped", "$pulled", "hook")
    ]


async def test_local_events_answered_without_state(make_runtime):
    """Local users' events are allowed at once, even with the state source down."""
    source = StaticStateSource(fail=True)
    holder = make_runtime(on_error="closed", source=source)
    assert (await post(holder, client_event("@me:hs.test")))[0] == 200
    assert source.fetches == 0


async def test_audit_mode_always_allows(make_runtime):
    """Audit: the hook never refuses, but still records what enforce would have done."""
    holder = make_runtime(mode="audit")
    holder.runtime.verdicts.put("$bad", EdgeVerdict(Decision.REFUSE, "denied", "relay.test"))
    assert (await post(holder, client_event("@x:relay.test", "$bad")))[0] == 200
    assert (await post(holder, client_event("@evil:denied.test", "$new")))[0] == 200
    assert holder.runtime.store.flush(5)
    assert [r["action"] for r in query_findings([holder.runtime.config.database])] == ["flagged"]


async def test_state_unavailable_open_allows_closed_refuses(make_runtime):
    """No room state within the bound: on_error decides."""
    for on_error, status in (("open", 200), ("closed", 403)):
        holder = make_runtime(on_error=on_error, source=StaticStateSource(fail=True))
        assert (await post(holder, client_event("@x:good.test")))[0] == status


async def test_bearer_token_required_when_configured(make_runtime, tmp_path):
    """With a token configured, calls without it are refused with 401 and decide nothing."""
    holder = make_runtime()
    object.__setattr__(holder.runtime.config, "hook_token", "s3cret")
    assert (await post(holder, client_event("@x:good.test")))[0] == 401
    assert (await post(holder, client_event("@x:good.test"), token="wrong"))[0] == 401
    assert (await post(holder, client_event("@x:good.test"), token="s3cret"))[0] == 200


async def test_malformed_calls_and_other_callbacks(make_runtime):
    """A body without an event is a 400; callbacks modgud does not decide are allowed;
    /ping echoes its id as synapse-http-antispam's do_ping expects."""
    holder = make_runtime()
    assert (await post(holder, {"nope": 1}))[0] == 400
    assert (await post(holder, ["x"]))[0] == 400
    assert await post(holder, {"user_id": "@a:b"}, path="/user_may_create_room") == (200, {})
    assert await post(holder, {"id": "abc"}, path="/ping") == (200, {"id": "abc", "status": "ok"})


async def test_acl_state_event_marks_room_stale(make_runtime):
    """A local m.room.server_acl going through the hook makes the room's state refetch."""
    source = StaticStateSource({ROOM: None})
    holder = make_runtime(source=source)
    await holder.runtime.state.get(ROOM, 1)
    assert source.fetches == 1
    await post(
        holder, client_event("@admin:hs.test", "$acl", type="m.room.server_acl", state_key="")
    )
    await holder.runtime.state.get(ROOM, 1)
    assert source.fetches == 2


async def test_old_state_events_checked_again_leave_the_room_cached(make_runtime):
    """Synapse calls the hook for events it pulls, its own old state events among them
    (measured in the Synapse benchmark: the room's create, members and power levels, again
    and again). Those are already the room's state: no refetch, so the edge's verdicts
    under the cached state stay usable. A real change (a member leaving) still refetches."""
    from rules.roomstate import room_policy_from_state
    from tests.rules.test_roomstate import state

    source = StaticStateSource({ROOM: room_policy_from_state(ROOM, state())})
    holder = make_runtime(source=source)
    await holder.runtime.state.get(ROOM, 1)
    for event in state():
        await post(holder, {"event": {**event, "room_id": ROOM, "sender": "@a:hs.test"}})
    await holder.runtime.state.get(ROOM, 1)
    assert source.fetches == 1
    leave = client_event(
        "@b:good.test",
        "$leave",
        type="m.room.member",
        state_key="@b:good.test",
        content={"membership": "leave"},
    )
    await post(holder, leave)
    await holder.runtime.state.get(ROOM, 1)
    assert source.fetches == 2


async def test_inviting_a_user_of_a_denied_server_is_refused(make_runtime):
    """user_may_invite: a local user inviting someone whose server the room denies gets
    403 (the invite would hand the room to that server); other invites pass; the token
    is required."""
    holder = make_runtime()
    invite = {"inviter": "@a:hs.test", "invitee": "@x:denied.test", "room_id": ROOM}
    status, body = await post(holder, invite, path="/user_may_invite")
    assert (status, body["errcode"]) == (403, "M_FORBIDDEN")
    assert "denied" in body["error"]
    fine = {**invite, "invitee": "@y:good.test"}
    assert (await post(holder, fine, path="/user_may_invite"))[0] == 200
    assert holder.runtime.store.flush(5)
    rows = list(query_findings([holder.runtime.config.database]))
    assert [(r["rule"], r["action"], r["sender"]) for r in rows] == [
        ("acl.sender", "dropped", "@a:hs.test")
    ]


async def test_federated_invite_is_judged_as_an_event_and_counted_as_such(make_runtime):
    """federated_user_may_invite carries the invite event: judged like any event, and
    counted under its own callback label."""
    holder = make_runtime()
    invite = client_event("@evil:denied.test", "$inv", type="m.room.member", state_key="@a:hs.test")
    status, _ = await post(holder, invite, path="/federated_user_may_invite")
    assert status == 403
    sample = holder.runtime.metrics.registry.get_sample_value(
        "modgud_hook_calls_total",
        {"callback": "federated_user_may_invite", "answer": "refuse", "decided_by": "hook"},
    )
    assert sample == 1


def _decided_by(holder, decided_by, answer="allow"):
    return holder.runtime.metrics.registry.get_sample_value(
        "modgud_hook_calls_total",
        {"callback": "check_event_for_spam", "answer": answer, "decided_by": decided_by},
    )


async def test_edge_allow_answers_the_hook_only_under_the_same_state(make_runtime):
    """With signatures verified, every PDU the edge allowed is remembered by its event ID
    (free from the signing bytes) and the hook answers from it without re-checking; once
    the room's state changed (here: its ACL now denies the sender) the hook re-checks."""
    from tests.proxy_addons.conftest import KEYS, pdu, run_edge, send_flow
    from tests.proxy_addons.test_signature_cache import _trust

    source = StaticStateSource({ROOM: policy()})
    holder = make_runtime(verify_signatures=True, source=source)
    _trust(holder.runtime, "good.test")
    version = get_room_version("10")
    event = sign_event(pdu("@a:good.test", body="fine"), version, "good.test", KEYS["good.test"])
    flow = await run_edge(holder, send_flow("good.test", [event]))
    assert flow.response is None  # forwarded
    event_id = compute_event_id(event, version)
    call = client_event("@a:good.test", event_id)
    assert await post(holder, call) == (200, {})
    assert _decided_by(holder, "edge") == 1
    source.rooms[ROOM] = policy(deny=("good.test",))
    holder.runtime.mark_stale(ROOM)
    status, body = await post(holder, call)
    assert (status, body["errcode"]) == (403, "M_FORBIDDEN")
    assert _decided_by(holder, "hook", "refuse") == 1


async def test_edge_allow_not_remembered_when_the_transaction_changes_the_room(make_runtime):
    """A transaction carrying the room's own ACL event: its other PDUs were judged on the
    state before it, so the hook re-checks them."""
    from tests.proxy_addons.conftest import KEYS, pdu, run_edge, send_flow
    from tests.proxy_addons.test_signature_cache import _trust

    holder = make_runtime(verify_signatures=True)
    _trust(holder.runtime, "good.test")
    version = get_room_version("10")
    acl = pdu("@a:good.test", body="acl", event_type="m.room.server_acl")
    acl["state_key"] = ""
    message = pdu("@a:good.test", body="after")
    signed = [sign_event(e, version, "good.test", KEYS["good.test"]) for e in (acl, message)]
    await run_edge(holder, send_flow("good.test", signed))
    assert holder.runtime.verdicts.allowed_under(compute_event_id(signed[1], version)) is None
    assert (await post(holder, client_event("@a:good.test", "$x")))[0] == 200
    assert _decided_by(holder, "hook") == 1


def _post_sync(port, body):
    """A blocking POST from another thread, as Synapse's module would make it."""
    import json
    import urllib.error
    import urllib.request

    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/check_event_for_spam",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
        method="POST",
    )
    try:
        with urllib.request.urlopen(request, timeout=10) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code


async def test_hook_answers_on_its_own_thread_while_the_main_loop_is_busy(make_runtime):
    """The hook is served on a thread of its own: a local event, and a remote one the
    cached room state finds nothing against, are answered while modgud's main loop is
    blocked (here: by this test, joining the caller's thread); an event of a room not
    cached, or one with findings to record, is evaluated on the main loop once it is free."""
    import threading

    from proxy_addons.eventhook import EventHook
    from proxy_addons.testbed.homeserver import free_port

    port = free_port()
    holder = make_runtime(extra=f"hook: {{listen: '127.0.0.1:{port}'}}\n")
    hook = EventHook(holder)
    hook.running()
    try:
        answers = []
        await holder.runtime.state.get(ROOM, 1)  # cached; OPEN_ROOM is not

        def calls():
            for event in (client_event("@me:hs.test"), client_event("@b:good.test", "$b")):
                answers.append(_post_sync(port, event))

        caller = threading.Thread(target=calls)
        caller.start()
        caller.join(15)  # blocks this (the main) loop until the calls were answered
        assert answers == [200, 200]
        assert _decided_by(holder, "local") == 1 and _decided_by(holder, "hook") == 1
        uncached = client_event("@b:good.test", "$c", room_id=OPEN_ROOM)
        assert await asyncio.to_thread(_post_sync, port, uncached) == 200
        pulled = client_event("@evil:denied.test", "$pulled")
        assert await asyncio.to_thread(_post_sync, port, pulled) == 403
        assert [r["rule"] for r in recorded_findings(holder)] == ["acl.sender"]
    finally:
        await hook.done()
    # Stopped cleanly: the port is free for the next start.
    again = EventHook(holder)
    again.running()
    await again.done()


def test_running_never_yields_to_the_event_loop():
    """mitmproxy's listeners accept clients before the `running` event is over; an await
    in a `running` hook lets one in before mitmproxy's TLS addon has its certificates, and
    mitmproxy then exits ("Errors logged during startup"). Seen in CI: the hook's running
    must stay synchronous, binding its port there and serving on its thread."""
    import inspect

    from proxy_addons.eventhook import EventHook

    assert not inspect.iscoroutinefunction(EventHook.running)


async def test_an_event_over_the_pdu_limit_is_refused_by_the_hook_itself(make_runtime):
    """An event the edge never saw (pulled) whose client format alone is over the PDU
    limit is refused and recorded as malformed; a large one under it passes."""
    holder = make_runtime()
    huge = client_event("@a:good.test", "$huge", content={"body": "x" * 70_000})
    status, body = await post(holder, huge)
    assert status == 403 and "over the 65536-byte PDU limit" in body["error"]
    fine = client_event("@a:good.test", "$fine", content={"body": "x" * 60_000})
    assert (await post(holder, fine))[0] == 200
    assert [(r["rule"], r["event_id"]) for r in recorded_findings(holder)] == [
        ("malformed.pdu", "$huge")
    ]


async def test_a_restricted_join_in_the_client_format_is_not_refused_as_unsigned(make_runtime):
    """synapse-http-antispam sends no signatures: a join authorised by a joined user with
    enough power is allowed (Synapse verified the signatures itself)."""
    room = policy()
    room = dataclasses.replace(room, joined=frozenset({"@mod:good.test"}))
    holder = make_runtime(source=StaticStateSource({ROOM: room}))
    join = client_event(
        "@new:other.test",
        "$join",
        type="m.room.member",
        state_key="@new:other.test",
        content={"membership": "join", "join_authorised_via_users_server": "@mod:good.test"},
    )
    assert await post(holder, join) == (200, {})
