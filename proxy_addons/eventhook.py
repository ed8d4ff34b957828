"""The event hook: modgud's side of the synapse-http-antispam protocol.

synapse-http-antispam (a Synapse module) POSTs spam-checker callbacks as JSON to
`<base_url>/<callback>`; continuwuity speaks the same protocol. For
`check_event_for_spam` (`{"event": {...client format..., "event_id"}}`) any 2xx answer
allows the event; 403 with `{"errcode": "M_FORBIDDEN", "error": ...}` refuses it, and the
homeserver then redacts and soft-fails it. The hook answers from the edge's verdict for
that event ID, or — for events the edge never saw, such as ones the homeserver pulled
through /get_missing_events, /backfill or send_join — evaluates the event itself, waiting
at most `state.hook_timeout_seconds` for room state.
"""

from __future__ import annotations

import hmac
import logging
import time

from aiohttp import web

from proxy_addons.recording import record_findings
from proxy_addons.runtime import Runtime, RuntimeHolder
from rules.checks import ItemVerdict, apply_actions, check_event, check_invite
from rules.findings import Decision
from rules.roomstate import RELEVANT_STATE_TYPES
from rules.servername import server_of_user

__all__ = ["EventHook", "make_app"]

logger = logging.getLogger(__name__)


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


def _refuse(reason: str) -> web.Response:
    return web.json_response({"errcode": "M_FORBIDDEN", "error": reason}, status=403)


async def decide_event(runtime: Runtime, event: dict[str, object]) -> tuple[web.Response, str]:
    """Decide one check_event_for_spam call; returns the answer and what decided it."""
    config = runtime.config
    event_id = event.get("event_id")
    room_id = event.get("room_id")
    if (
        event.get("type") in RELEVANT_STATE_TYPES
        and isinstance(event.get("state_key"), str)
        and isinstance(room_id, str)
    ):
        runtime.mark_stale(room_id)
    if isinstance(room_id, str) and runtime.policy.watches(room_id, event.get("type")):
        runtime.policy.mark_stale()
    if server_of_user(event.get("sender")) == config.server_name:
        return _allow(), "local"
    edge = runtime.verdicts.get(event_id) if isinstance(event_id, str) else None
    if edge is not None:
        if edge.decision is Decision.REFUSE and config.enforcing:
            return _refuse(edge.reason), "edge"
        return _allow(), "edge"
    policy = (
        await runtime.state.get(room_id, config.hook_state_timeout_seconds)
        if isinstance(room_id, str)
        else None
    )
    verdict: ItemVerdict = apply_actions(
        check_event(
            event,
            policy,
            config.server_name,
            fail_open=config.fail_open,
            policy=runtime.policy.current,
        ),
        runtime.policy.current,
    )
    if verdict.findings:
        runtime.refused.add_findings(verdict.findings)
        refuse = verdict.refused and config.enforcing
        record_findings(
            runtime, verdict.findings, action="dropped" if refuse else "flagged", endpoint="hook"
        )
    if verdict.refused and config.enforcing:
        return _refuse("; ".join(f.detail for f in verdict.findings)), "hook"
    return _allow(), "hook"


def make_app(holder: RuntimeHolder) -> web.Application:
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
            try:
                body = await request.json()
            except ValueError:
                body = None
            event = body.get("event") if isinstance(body, dict) else None
            if not isinstance(event, dict):
                decided_by = "malformed"
                return web.json_response(
                    {"errcode": "M_BAD_JSON", "error": 'expected {"event": {...}}'}, status=400
                )
            answer, decided_by = await decide_event(runtime, event)
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
        """A local user invites someone: refused when the invitee's server may not take
        part in the room (ACL, policy lists, participation)."""
        runtime = holder.runtime
        if runtime is None or not _authorized(runtime, request):
            return _allow() if runtime is None else _unauthorized()
        answer = _allow()
        started = time.perf_counter()
        try:
            body = await request.json()
            inviter, invitee, room_id = (body.get(k) for k in ("inviter", "invitee", "room_id"))
            if not all(isinstance(v, str) for v in (inviter, invitee, room_id)):
                return web.json_response({"errcode": "M_BAD_JSON", "error": "bad body"}, status=400)
            config = runtime.config
            room = await runtime.state.get(room_id, config.hook_state_timeout_seconds)
            policy = runtime.policy.current
            verdict = apply_actions(
                check_invite(
                    inviter, invitee, room, room_id, fail_open=config.fail_open, policy=policy
                ),
                policy,
            )
            refuse = verdict.refused and config.enforcing
            if verdict.findings:
                record_findings(
                    runtime,
                    verdict.findings,
                    action="dropped" if refuse else "flagged",
                    endpoint="hook",
                )
            if refuse:
                answer = _refuse("; ".join(f.detail for f in verdict.findings))
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
        try:
            body = await request.json()
        except ValueError:
            body = {}
        req_id = body.get("id") if isinstance(body, dict) else None
        return web.json_response({"id": req_id, "status": "ok"})

    async def other_callback(request: web.Request) -> web.Response:
        # Callbacks modgud does not decide: always "not spam", so enabling more callbacks
        # in synapse-http-antispam never refuses anything by accident.
        return _allow()

    app = web.Application(client_max_size=1024 * 1024)
    app.router.add_post("/check_event_for_spam", check_event_for_spam)
    # A remote server's invite is an event like any other: judged as check_event_for_spam.
    app.router.add_post("/federated_user_may_invite", check_event_for_spam)
    app.router.add_post("/user_may_invite", user_may_invite)
    app.router.add_post("/ping", ping)
    app.router.add_post("/{callback}", other_callback)
    return app


class EventHook:
    """Serves the hook on `hook.listen` (127.0.0.1 by default) while mitmproxy runs."""

    def __init__(self, holder: RuntimeHolder) -> None:
        self.holder = holder
        self._runner: web.AppRunner | None = None

    async def running(self) -> None:
        runtime = self.holder.runtime
        if runtime is None or runtime.config.hook is None or self._runner is not None:
            return
        listen = runtime.config.hook
        self._runner = web.AppRunner(make_app(self.holder), access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, listen.host, listen.port)
        await site.start()
        logger.info("event hook listening on http://%s", listen)

    async def done(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
