"""The event hook over real HTTP (aiohttp on loopback), speaking synapse-http-antispam's
protocol: 2xx allows, 403 JSON refuses."""

from __future__ import annotations

from aiohttp.test_utils import TestClient, TestServer

from proxy_addons.eventhook import make_app
from proxy_addons.store import query_findings
from proxy_addons.verdicts import EdgeVerdict
from rules.findings import Decision
from tests.proxy_addons.conftest import ROOM, StaticStateSource


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
