"""Fuzzing the event hook (proxy_addons/eventhook.py make_app) over real HTTP, in every
deployment mode, with and without a hook token: arbitrary JSON bodies and paths,
near-valid events of every kind, bodies that are not JSON, not UTF-8 or nested too deeply.

Every answer of a callback is 200, 400, 401 or 403 with a JSON body, never a 5xx; the
internal-error count does not move; the findings store keeps running.

HOOK_BUGS lists what this found in eventhook.py (fixed); each smallest input stays as a
regression test."""

from __future__ import annotations

import json
from urllib.parse import quote

import pytest
from aiohttp.test_utils import TestClient, TestServer
from hypothesis import strategies as st

from proxy_addons.eventhook import make_app
from proxy_addons.verdicts import EdgeVerdict
from rules.findings import Decision
from tests.fuzz.harness import fuzz, internal_errors
from tests.fuzz.strategies import (
    event_ids,
    events,
    json_bytes,
    json_values,
    junk,
    mutated,
    strings,
    users,
)
from tests.fuzz.world import DEPLOYMENTS, ROOMS

TOKEN = "hook-secret"
CALLBACKS = ("check_event_for_spam", "federated_user_may_invite", "user_may_invite", "ping")
# Callbacks modgud does not decide (answered "not spam"), as synapse-http-antispam names them.
OTHER_CALLBACKS = ("user_may_join_room", "check_username_for_spam", "user_may_create_room")
CONTENT_TYPES = (
    None,
    "application/json",
    "application/json; charset=utf-8",
    "application/json; charset=latin-1",
    "application/json; charset=utf-16",
    "application/json; charset=no-such-charset",
    "text/plain",
)


@pytest.fixture
async def hook_clients(world, tmp_path):
    """A test client of the hook per deployment, with a hook token and without; the edge
    has refused $e1 and allowed $prev."""
    (tmp_path / "hook.token").write_text(TOKEN)
    holders = {f"{name}": h for name, h in world().items()}
    holders |= {f"{name}+token": h for name, h in world("hook: {token_file: hook.token}\n").items()}
    clients = {}
    for name, holder in holders.items():
        runtime = holder.runtime
        runtime.verdicts.put("$e1", EdgeVerdict(Decision.REFUSE, "refused at the edge", "x.test"))
        runtime.verdicts.put_allowed("$prev", None, runtime.policy.current)
        clients[name] = client = TestClient(TestServer(make_app(holder)))
        await client.start_server()
    yield {name: (clients[name], holders[name].runtime) for name in holders}
    for client in clients.values():
        await client.close()


@st.composite
def client_events(draw: st.DrawFn) -> dict[str, object]:
    """An event as synapse-http-antispam sends it (client format, with its event_id)."""
    event = draw(events())
    event.pop("signatures", None)
    event.pop("hashes", None)
    event["event_id"] = draw(event_ids)
    return draw(mutated(event)) if draw(st.integers(0, 2)) == 0 else event


@st.composite
def hook_bodies(draw: st.DrawFn, callback: str) -> bytes:
    kind = draw(st.sampled_from(["near-valid", "near-valid", "json", "bytes"]))
    if kind == "near-valid":
        if callback == "user_may_invite":
            value: object = {
                "inviter": draw(users),
                "invitee": draw(users),
                "room_id": draw(st.sampled_from(ROOMS) | strings),
            }
        elif callback == "ping":
            value = {"id": draw(json_values)}
        else:
            value = {"event": draw(client_events())}
        if draw(st.integers(0, 3)) == 0:
            value = draw(mutated(value))
        return json.dumps(value).encode()
    if kind == "json":
        return draw(json_bytes())
    return draw(st.binary(max_size=100) | junk)


@st.composite
def hook_requests(draw: st.DrawFn) -> tuple[str, str, bytes, dict[str, str]]:
    callback = draw(st.sampled_from(CALLBACKS + OTHER_CALLBACKS))
    path = "/" + callback
    if draw(st.integers(0, 5)) == 0:
        path = "/" + "/".join(
            quote(p, safe="", errors="surrogatepass")
            for p in draw(
                st.lists(
                    st.text(min_size=1, max_size=12) | st.sampled_from(CALLBACKS),
                    min_size=1,
                    max_size=3,
                )
            )
        )
    method = draw(st.sampled_from(["POST"] * 8 + ["GET", "PUT"]))
    headers = {}
    content_type = draw(st.sampled_from(CONTENT_TYPES))
    if content_type is not None:
        headers["Content-Type"] = content_type
    auth = draw(st.sampled_from([f"Bearer {TOKEN}", f"Bearer {TOKEN}", "Bearer nope", None]))
    if auth is not None:
        headers["Authorization"] = auth
    return method, path, draw(hook_bodies(callback)), headers


HOOK_BUGS = {
    # note_state_change: `event.get("type") in RELEVANT_STATE_TYPES` raises TypeError for
    # a list or object `type`: an internal error (on_error: closed refuses the event).
    "unhashable-event-type": (
        "/check_event_for_spam",
        b'{"event": {"room_id": "!room:hs.test", "type": [], "sender": "@a:good.test"}}',
        {},
    ),
    # request.json() raises RecursionError (not a ValueError) for deep nesting: an internal
    # error in check_event_for_spam and user_may_invite, an uncaught 500 in ping.
    "nested-too-deeply": ("/ping", b"[" * 5000 + b"]" * 5000, {}),
    # request.text() raises LookupError for an unknown charset in Content-Type: as above.
    "unknown-charset": (
        "/ping",
        b"{}",
        {"Content-Type": "application/json; charset=no-such-charset"},
    ),
}


def _assert_answer(method, path, status, content_type, text_body):
    if method == "POST" and path[1:] in CALLBACKS + OTHER_CALLBACKS:
        assert status in (200, 400, 401, 403, 413), (status, text_body[:200])
        assert content_type == "application/json"
        json.loads(text_body)
    else:
        assert status < 500, (status, text_body[:200])  # the router's 404 or 405 (say, "/{")


@fuzz(hook_requests(), st.sampled_from(sorted(DEPLOYMENTS)), st.booleans())
async def test_event_hook_answers(hook_clients, request_parts, deployment, token):
    """Any call of the hook: a JSON answer of the protocol, never a 5xx, no internal error"""
    method, path, body, headers = request_parts
    client, runtime = hook_clients[deployment + ("+token" if token else "")]
    errors = internal_errors(runtime)
    response = await client.request(method, path, data=body, headers=headers)
    text_body = await response.text()
    _assert_answer(method, path, response.status, response.content_type, text_body)
    assert internal_errors(runtime) == errors, "internal error: see the log above"
    assert runtime.store.pending == 0 or runtime.store.flush(5), "the store's writer died"


@pytest.mark.parametrize("bug", sorted(HOOK_BUGS))
async def test_hook_bugs_found_by_fuzzing_stay_fixed(hook_clients, bug):
    """Each bug's smallest input: a JSON answer of the protocol, no internal error."""
    path, body, headers = HOOK_BUGS[bug]
    client, runtime = hook_clients["enforce-open-verify"]
    errors = internal_errors(runtime)
    response = await client.post(path, data=body, headers=headers)
    _assert_answer("POST", path, response.status, response.content_type, await response.text())
    assert internal_errors(runtime) == errors
