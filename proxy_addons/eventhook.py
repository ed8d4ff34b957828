"""The event hook: modgud's side of the synapse-http-antispam protocol.

synapse-http-antispam (a Synapse module) POSTs spam-checker callbacks as JSON to
`<base_url>/<callback>`; continuwuity speaks the same protocol. For
`check_event_for_spam` (`{"event": {...client format..., "event_id"}}`) any 2xx answer
allows the event; 403 with `{"errcode": "M_FORBIDDEN", "error": ...}` refuses it, and the
homeserver then redacts and soft-fails it. The hook answers from the edge's verdict for
that event ID (an allow only while the room's state and the policy it was decided under
are still in force), or — for events the edge never saw or decided under other state, such as ones the homeserver pulled
through /get_missing_events, /backfill or send_join — evaluates the event itself, waiting
at most `state.hook_timeout_seconds` for room state.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import socket
import sys
import threading
import time
from collections.abc import Callable, Coroutine, Iterable
from typing import Any

from aiohttp import web

from proxy_addons.recording import describe_refusal, record_verdict
from proxy_addons.runtime import Runtime, RuntimeHolder
from rules.checks import (
    ItemVerdict,
    StateUnavailable,
    apply_actions,
    check_event,
    check_invite,
    judge_event,
    pdu_bytes,
)
from rules.findings import Decision, Finding
from rules.roomstate import RELEVANT_STATE_TYPES, RoomPolicy
from rules.servername import server_of_user

__all__ = ["EventHook", "evaluate_event", "make_app", "quick_decision"]

logger = logging.getLogger(__name__)

HOOK_SWITCH_INTERVAL = 0.0005
# Synapse caps events at 64 KiB; a hook call carries one, in the client format.
MAX_HOOK_BODY = 1024 * 1024


def _allow() -> web.Response:
    return web.json_response({})


def _authorized(runtime: Runtime, request: web.Request) -> bool:
    token = runtime.config.hook_token
    if token is None:
        return True
    given = request.headers.get("Authorization", "")
    if hmac.compare_digest(given.encode(), f"Bearer {token}".encode()):
        return True
    logger.error("event hook call with a wrong or missing bearer token")
    return False


def _unauthorized() -> web.Response:
    return web.json_response(
        {"errcode": "M_UNKNOWN_TOKEN", "error": "modgud: bad hook token"}, status=401
    )


async def _read_json(request: web.Request) -> tuple[object, web.Response | None]:
    """The call's JSON body, or the answer to give instead: 413 over the size limit
    (synapse-http-antispam then applies its own fail_open), 400 for anything not JSON."""
    try:
        return await request.json(), None
    except web.HTTPRequestEntityTooLarge:
        logger.warning("hook call %s over %d bytes refused", request.path, MAX_HOOK_BODY)
        error = {"errcode": "M_TOO_LARGE", "error": "modgud: hook call body too large"}
        return None, web.json_response(error, status=413)
    except (ValueError, LookupError, RecursionError):  # not JSON, bad charset, too deep
        return None, web.json_response({"errcode": "M_NOT_JSON", "error": "not JSON"}, status=400)


def _refuse(reason: str) -> web.Response:
    return web.json_response({"errcode": "M_FORBIDDEN", "error": reason}, status=403)


def note_state_change(
    runtime: Runtime, event: dict[str, object], main_loop: asyncio.AbstractEventLoop | None
) -> None:
    """A state event that changes who may take part (a local ACL, a policy-list rule):
    the room's cached state is stale from now on, before any later event is answered."""
    room_id = event.get("room_id")
    if not isinstance(room_id, str):
        return
    event_type = event.get("type")
    if not isinstance(event_type, str):  # any JSON: a list or an object is unhashable
        return
    if event_type in RELEVANT_STATE_TYPES and isinstance(event.get("state_key"), str):
        cached = runtime.state.peek(room_id)
        # Not for an old state event the homeserver checks again (it pulled it).
        if not (isinstance(cached, RoomPolicy) and cached.reflects(event)):
            runtime.state.mark_stale(room_id)  # one attribute: safe from the hook's thread
            _call_on(main_loop, runtime.mark_stale, room_id)  # and the refetches after it
    if runtime.policy.watches(room_id, event_type):
        _call_on(main_loop, runtime.policy.mark_stale)


def _judged_as(event: dict[str, object]) -> dict[str, Any]:
    """How the hook's event is judged: synapse-http-antispam sends the client format,
    without signatures, hashes or prev/auth events, so its size is a lower bound of the
    PDU's (the `event_id` it adds aside) and signatures are judged only if present."""
    return {
        "pdu_bytes": pdu_bytes(event, without=("unsigned", "event_id")),
        "signatures_known": "signatures" in event,
    }


def _log_refusal(
    enforcing: bool, event: dict[str, object], findings: Iterable[Finding], by: str
) -> None:
    logger.info(
        "hook: %s (%s) %s",
        "refused" if enforcing else "would refuse (audit)",
        by,
        describe_refusal(event, findings),
    )


def quick_decision(runtime: Runtime, event: dict[str, object]) -> tuple[web.Response, str] | None:
    """The answers that need no I/O — local events, the edge's verdict, an event the
    cached room state finds nothing against — given on the hook's own thread; None when
    the event must be evaluated on the main loop (state to fetch, findings to record)."""
    config = runtime.config
    if server_of_user(event.get("sender")) == config.server_name:
        return _allow(), "local"
    event_id = event.get("event_id")
    if not isinstance(event_id, str):
        return None
    edge = runtime.verdicts.get(event_id)
    if edge is not None:
        if edge.decision is Decision.REFUSE:
            _log_refusal(config.enforcing, event, edge.findings, "the edge's verdict")
            if config.enforcing:
                return _refuse(edge.reason), "edge"
        return _allow(), "edge"
    room_id = event.get("room_id")
    if not isinstance(room_id, str):
        return None
    room = runtime.state.peek(room_id)
    allowed = runtime.verdicts.allowed_under(event_id)
    if allowed is not None and allowed[0] is room and allowed[1] is runtime.policy.current:
        return _allow(), "edge"
    if isinstance(room, RoomPolicy):
        # The room's state is at hand: a clean event is judged right here. One with
        # findings goes to the main loop, which records them.
        verdict = check_event(
            event,
            room,
            config.server_name,
            fail_open=config.fail_open,
            policy=runtime.policy.current,
            **_judged_as(event),
        )
        if not verdict.findings:
            return _allow(), "hook"
    return None


async def evaluate_event(runtime: Runtime, event: dict[str, object]) -> tuple[web.Response, str]:
    """Judge an event the edge did not decide (pulled by the homeserver, or decided under
    other state), waiting at most `state.hook_timeout_seconds` for the room's state. Runs
    on modgud's main loop, where room state and the store live."""
    config = runtime.config
    room_id = event.get("room_id")
    policy = (
        await runtime.state.get(room_id, config.hook_state_timeout_seconds)
        if isinstance(room_id, str)
        else None
    )
    verdict: ItemVerdict = judge_event(
        event,
        policy,
        config.server_name,
        fail_open=config.fail_open,
        policy=runtime.policy.current,
        **_judged_as(event),
    )
    if isinstance(policy, StateUnavailable) and not verdict.refused:
        runtime.metrics.fail_open.labels("state").inc()
        logger.warning("hook: no room state for %s, event passed unchecked", room_id)
    if verdict.refused:
        _log_refusal(config.enforcing, event, verdict.findings, "the hook")
    if verdict.findings:
        runtime.refused.add_findings(verdict.findings)
    if record_verdict(runtime, verdict, enforcing=config.enforcing, endpoint="hook"):
        return _refuse(verdict.reason), "hook"
    return _allow(), "hook"


def _call_on(
    loop: asyncio.AbstractEventLoop | None, callback: Callable[..., object], *args: object
) -> None:
    if loop is None:
        callback(*args)
    else:
        loop.call_soon_threadsafe(callback, *args)


async def _on_main[T](loop: asyncio.AbstractEventLoop | None, coro: Coroutine[Any, Any, T]) -> T:
    """Run `coro` on modgud's main loop, from the hook's thread (or right here in tests,
    where the hook shares the loop)."""
    if loop is None or loop is asyncio.get_running_loop():
        return await coro
    return await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(coro, loop))


async def decide_invite(runtime: Runtime, inviter: str, invitee: str, room_id: str) -> web.Response:
    """A local user invites someone: refused when the invitee's server may not take part
    in the room (ACL, policy lists, participation)."""
    config = runtime.config
    room = await runtime.state.get(room_id, config.hook_state_timeout_seconds)
    policy = runtime.policy.current
    verdict = apply_actions(
        check_invite(inviter, invitee, room, room_id, fail_open=config.fail_open, policy=policy),
        policy,
    )
    if record_verdict(runtime, verdict, enforcing=config.enforcing, endpoint="hook"):
        return _refuse(verdict.reason)
    return _allow()


def make_app(
    holder: RuntimeHolder, main_loop: asyncio.AbstractEventLoop | None = None
) -> web.Application:
    """The hook's routes. `main_loop`: modgud's loop, when the app is served on a thread of
    its own; the answers that need state or the store are computed there."""

    async def check_event_for_spam(request: web.Request) -> web.Response:
        runtime = holder.runtime
        if runtime is None:
            return _allow()
        started = time.perf_counter()
        answer, decided_by = _allow(), "error"
        try:
            if not _authorized(runtime, request):
                decided_by = "unauthorized"
                answer = _unauthorized()
                return answer
            body, problem = await _read_json(request)
            if problem is not None:
                decided_by = "malformed"
                answer = problem
                return answer
            event = body.get("event") if isinstance(body, dict) else None
            if not isinstance(event, dict):
                decided_by = "malformed"
                return web.json_response(
                    {"errcode": "M_BAD_JSON", "error": 'expected {"event": {...}}'}, status=400
                )
            note_state_change(runtime, event, main_loop)
            quick = quick_decision(runtime, event)
            answer, decided_by = (
                quick
                if quick is not None
                else await _on_main(main_loop, evaluate_event(runtime, event))
            )
            return answer
        except Exception:
            logger.exception("internal error in the event hook")
            runtime.metrics.internal_errors.labels("hook").inc()
            if runtime.config.fail_open or not runtime.config.enforcing:
                runtime.metrics.fail_open.labels("hook").inc()
                answer = _allow()
            else:
                answer = _refuse("modgud: internal error (on_error: closed)")
            return answer
        finally:
            callback = (
                "federated_user_may_invite"
                if request.path.endswith("federated_user_may_invite")
                else "check_event_for_spam"
            )
            runtime.metrics.hook_calls.labels(
                callback, "refuse" if answer.status == 403 else "allow", decided_by
            ).inc()
            runtime.metrics.hook_seconds.labels(callback).observe(time.perf_counter() - started)

    async def user_may_invite(request: web.Request) -> web.Response:
        runtime = holder.runtime
        if runtime is None or not _authorized(runtime, request):
            return _allow() if runtime is None else _unauthorized()
        answer = _allow()
        started = time.perf_counter()
        try:
            body, problem = await _read_json(request)
            if problem is not None:
                answer = problem
                return answer
            if not isinstance(body, dict):
                body = {}
            inviter, invitee, room_id = (body.get(k) for k in ("inviter", "invitee", "room_id"))
            if not (
                isinstance(inviter, str) and isinstance(invitee, str) and isinstance(room_id, str)
            ):
                answer = web.json_response(
                    {"errcode": "M_BAD_JSON", "error": "bad body"}, status=400
                )
                return answer
            answer = await _on_main(main_loop, decide_invite(runtime, inviter, invitee, room_id))
            return answer
        except Exception:
            logger.exception("internal error in the invite hook")
            runtime.metrics.internal_errors.labels("hook").inc()
            if runtime.config.fail_open or not runtime.config.enforcing:
                return _allow()
            answer = _refuse("modgud: internal error (on_error: closed)")
            return answer
        finally:
            runtime.metrics.hook_calls.labels(
                "user_may_invite", "refuse" if answer.status == 403 else "allow", "hook"
            ).inc()
            runtime.metrics.hook_seconds.labels("user_may_invite").observe(
                time.perf_counter() - started
            )

    async def ping(request: web.Request) -> web.Response:
        body, _ = await _read_json(request)
        req_id = body.get("id") if isinstance(body, dict) else None
        return web.json_response({"id": req_id, "status": "ok"})

    async def other_callback(request: web.Request) -> web.Response:
        # Callbacks modgud does not decide: always "not spam", so enabling more callbacks
        # in synapse-http-antispam never refuses anything by accident.
        return _allow()

    app = web.Application(client_max_size=MAX_HOOK_BODY)
    app.router.add_post("/check_event_for_spam", check_event_for_spam)
    # A remote server's invite is an event like any other: judged as check_event_for_spam.
    app.router.add_post("/federated_user_may_invite", check_event_for_spam)
    app.router.add_post("/user_may_invite", user_may_invite)
    app.router.add_post("/ping", ping)
    app.router.add_post("/{callback}", other_callback)
    return app


class EventHook:
    """Serves the hook on `hook.listen` (127.0.0.1 by default) while mitmproxy runs, on a
    thread and event loop of its own: the homeserver calls the hook once per event, one
    after another, so its answers must not queue behind a flood of /send transactions on
    mitmproxy's loop. Answers that need room state or the store run on the main loop."""

    def __init__(self, holder: RuntimeHolder) -> None:
        self.holder = holder
        self._thread: threading.Thread | None = None
        self._started = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._runner: web.AppRunner | None = None

    def running(self) -> None:
        """Bind the port here, so a taken port fails modgud's start; serve on the thread.

        Synchronous on purpose: mitmproxy's listeners already accept clients, and any
        await inside the `running` event would let one in before mitmproxy's own TLS
        addon is ready (it then fails the connection and mitmproxy exits)."""
        runtime = self.holder.runtime
        if runtime is None or runtime.config.hook is None or self._thread is not None:
            return
        listen = runtime.config.hook
        family = socket.AF_INET6 if ":" in listen.host else socket.AF_INET
        sock = socket.create_server((listen.host, listen.port), family=family)
        main_loop = asyncio.get_running_loop()
        # A thread waiting for the GIL gets it after at most this long (default 5 ms).
        sys.setswitchinterval(HOOK_SWITCH_INTERVAL)
        self._thread = threading.Thread(
            target=self._serve, args=(main_loop, sock), name="modgud-hook", daemon=True
        )
        self._thread.start()
        logger.info("event hook listening on http://%s", listen)

    def _serve(self, main_loop: asyncio.AbstractEventLoop, sock: socket.socket) -> None:
        loop = asyncio.new_event_loop()
        runner = web.AppRunner(make_app(self.holder, main_loop), access_log=None)
        try:
            loop.run_until_complete(runner.setup())
            loop.run_until_complete(web.SockSite(runner, sock).start())
        except Exception:
            logger.exception("the event hook could not start")
            sock.close()
            loop.close()
            self._started.set()
            return
        self._loop, self._runner = loop, runner
        self._started.set()
        try:
            loop.run_forever()
        finally:
            loop.run_until_complete(runner.cleanup())
            loop.close()

    async def done(self) -> None:
        thread = self._thread
        if thread is None:
            return
        await asyncio.to_thread(self._started.wait, 10)
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._loop.stop)
        await asyncio.to_thread(thread.join, 10)
        self._thread = self._loop = self._runner = None
