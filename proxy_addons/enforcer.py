"""The edge: checks inbound federation requests and refuses what the policy refuses.

A forwarded request is never edited (the origin's X-Matrix signature covers the body), so
in enforce mode a transaction whose every PDU and EDU is refused is answered locally in
Synapse's own shape, any other transaction is forwarded untouched and the event hook
refuses its refused events inside the homeserver, and room-data requests from a denied
origin are answered 403 M_FORBIDDEN.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Iterable, Mapping
from dataclasses import replace

from mitmproxy import http

from proxy_addons.config import Mode
from proxy_addons.endpoints import EndpointClass
from proxy_addons.flowinfo import (
    FlowState,
    declared_body_size,
    flow_state,
    json_response,
    known_flow_state,
    request_body,
)
from proxy_addons.outbound import is_outbound
from proxy_addons.recording import count_items, record_findings
from proxy_addons.runtime import Runtime, RuntimeHolder
from proxy_addons.store import KnockRecord
from proxy_addons.verdicts import EdgeVerdict
from rules.checks import (
    ItemVerdict,
    StateUnavailable,
    TransactionVerdict,
    apply_actions,
    apply_actions_to_transaction,
    check_request_origin,
    check_transaction,
    rooms_of_transaction,
    with_signature_check,
)
from rules.eventhash import event_id_from_reference_hash
from rules.federation import Transaction, parse_json_body, parse_transaction
from rules.findings import Confidence, Finding, Rule, Severity, refuses_deliverer_only
from rules.roomstate import KNOCK_TYPES, RELEVANT_STATE_TYPES, RoomPolicy
from rules.roomversion import RoomVersion
from rules.signatures import (
    SignatureCheck,
    required_signers,
    signing_bytes,
    verify_event_signatures,
)
from rules.xmatrix import verify_request_signature

__all__ = ["Enforcer"]

logger = logging.getLogger(__name__)


def _forbidden(flow: http.HTTPFlow, message: str) -> None:
    json_response(flow, 403, {"errcode": "M_FORBIDDEN", "error": message})


def _answer_as_sink(flow: http.HTTPFlow, state: FlowState) -> None:
    """Mirror sink: nothing is ever forwarded. /send gets Synapse's answer shape (every
    PDU accepted: a mirror's answers are thrown away, and refusing would say nothing);
    other federation requests an empty JSON object."""
    if state.endpoint.cls is EndpointClass.SEND:
        json_response(flow, 200, {"pdus": {}})
    elif state.endpoint.cls is EndpointClass.NOT_FEDERATION:
        json_response(flow, 404, {"errcode": "M_UNRECOGNIZED", "error": "modgud sink"})
    else:
        json_response(flow, 200, {})
    state.answered_locally = True


def _retry_later(flow: http.HTTPFlow, what: str) -> None:
    """A 5xx: the sending server keeps the transaction and retries it later."""
    json_response(flow, 503, {"errcode": "M_UNKNOWN", "error": f"modgud: {what}, retry later"})


class Enforcer:
    """Inbound federation requests: authenticate, check, enforce or audit, record."""

    def __init__(self, holder: RuntimeHolder) -> None:
        self.holder = holder

    def requestheaders(self, flow: http.HTTPFlow) -> None:
        """A body over `max_body_bytes`, or one whose headers do not bound its length, is
        dealt with before mitmproxy reads it: mitmproxy holds a request's whole body before
        the `request` hook, so any client could otherwise make modgud hold any amount of
        memory.

        A request modgud checks (/send, room data, /event) is closed unread when enforcing,
        as Synapse's own listener does with a body over its limit, and streamed to the
        homeserver unread when auditing; a finding says which, blaming nobody (nothing was
        verified). A request modgud does not read is streamed through unread (the
        homeserver applies its own limits). A sink, which forwards nothing, closes both."""
        runtime = self.holder.runtime
        if runtime is None or flow.response or not flow.live or is_outbound(flow, runtime):
            return
        size, limit = declared_body_size(flow), runtime.config.max_body_bytes
        if size is not None and size <= limit:
            return
        state = flow_state(flow)
        mode = runtime.config.mode
        checked = state.endpoint.cls in _AUTHENTICATED
        close = mode is Mode.SINK or (checked and mode is Mode.ENFORCE)
        if checked:
            what = (
                "of undeclared length (chunked or unbounded)"
                if size is None
                else f"of {size} bytes is over the {limit}-byte limit"
            )
            action = "connection closed unread" if close else "streamed to the homeserver unread"
            finding = _oversized(state, f"{state.endpoint.name} body {what}; {action}")
            self._record(runtime, state, [finding], rejected=close)
        if close:
            flow.kill()
        else:
            flow.request.stream = True
            state.unread = True
        outcome = "refused" if close else "forwarded"
        runtime.metrics.requests.labels("inbound", state.endpoint.cls.value, outcome).inc()

    async def request(self, flow: http.HTTPFlow) -> None:
        if flow.response or flow.error or not flow.live:
            return
        runtime = self.holder.runtime
        if runtime is None or is_outbound(flow, runtime):
            return
        if (known := known_flow_state(flow)) is not None and known.unread:
            return  # streamed unread (requestheaders); there is no body to check
        # Counted from here, not from forwarding: a stop that begins while the checks
        # await must still wait for this request's answer if it is then forwarded.
        runtime.inflight.add(flow.id)
        try:
            await self.inspect_request(flow)
        finally:
            if flow.response is not None:
                runtime.inflight.finished(flow.id)

    async def inspect_request(self, flow: http.HTTPFlow) -> None:
        """Check one inbound request, enforce or record; also used to replay captures."""
        runtime = self.holder.runtime
        if runtime is None:
            return
        started = time.perf_counter()
        state = flow_state(flow)
        endpoint = state.endpoint
        outcome = "forwarded"
        try:
            if runtime.inflight.closing:
                _retry_later(flow, "shutting down")
                state.answered_locally = True
                outcome = "unavailable"
            elif endpoint.cls in _AUTHENTICATED:
                if len(request_body(flow)) > runtime.config.max_body_bytes:
                    outcome = self._refuse_oversized(runtime, flow, state)
                elif not await self._authenticate(runtime, flow, state):
                    outcome = "unauthenticated"
                elif endpoint.cls is EndpointClass.SEND and flow.request.method == "PUT":
                    outcome = await self._check_send(runtime, flow, state)
                elif endpoint.cls is EndpointClass.ROOM_DATA:
                    outcome = await self._check_room_data(runtime, flow, state)
        except Exception:
            outcome = self._internal_error(runtime, flow, "edge")
        finally:
            state.content = None  # the decoded body: not kept for the flow's lifetime
            if runtime.config.mode is Mode.SINK and flow.response is None:
                _answer_as_sink(flow, state)
                outcome = "sink"
            elapsed = time.perf_counter() - started
            metrics = runtime.metrics
            metrics.requests.labels("inbound", endpoint.cls.value, outcome).inc()
            metrics.transaction_seconds.labels("inbound").observe(elapsed)
            if state.pdu_count:
                metrics.pdu_seconds.labels("inbound").observe(elapsed / state.pdu_count)
            trusted = state.auth is not None and _origin_trusted(runtime, state)
            server = metrics.server_label(state.auth.origin if state.auth and trusted else None)
            if server is not None:
                metrics.server_requests.labels(server, outcome).inc()

    async def response(self, flow: http.HTTPFlow) -> None:
        runtime = self.holder.runtime
        if runtime is None or is_outbound(flow, runtime):
            return
        runtime.inflight.finished(flow.id)
        state = known_flow_state(flow)
        if state is None or state.answered_locally:
            return
        if flow.response is None or flow.response.status_code != 200:
            return
        # The homeserver has accepted the transaction: state it changed is refetched.
        for room_id in state.stale_rooms:
            runtime.mark_stale(room_id)
        if state.endpoint.name in _MEMBERSHIP_ENDPOINTS and state.endpoint.room_id:
            runtime.mark_stale(state.endpoint.room_id)  # a join/knock/leave/invite went in
        if state.endpoint.cls is EndpointClass.EVENT and state.auth is not None:
            try:
                await self._check_event_answer(runtime, flow, state)
            except Exception:
                self._internal_error(runtime, flow, "edge")

    def error(self, flow: http.HTTPFlow) -> None:
        """The homeserver did not answer (unreachable, connection lost, client gone)."""
        if (runtime := self.holder.runtime) is not None:
            runtime.inflight.finished(flow.id)

    async def _check_event_answer(
        self, runtime: Runtime, flow: http.HTTPFlow, state: FlowState
    ) -> None:
        """/v1/event/{eventId} names no room: the room is learned from the homeserver's
        answer, and a denied origin gets 403 instead of the event (a response is not
        covered by the requester's signature, so replacing it is legitimate)."""
        assert state.auth is not None and flow.response is not None
        answer, reason = parse_json_body(flow.response.content or b"")
        pdus = answer.get("pdus") if isinstance(answer, dict) and reason is None else None
        first = pdus[0] if isinstance(pdus, list) and pdus else None
        room_id = first.get("room_id") if isinstance(first, dict) else None
        if not isinstance(room_id, str):
            return
        config = runtime.config
        policy = await runtime.state.get(room_id, config.state_timeout_seconds)
        item = check_request_origin(
            state.auth.origin,
            room_id,
            policy,
            "event",
            fail_open=config.fail_open,
            policy=runtime.policy.current,
        )
        item = apply_actions(item, runtime.policy.current)
        if not item.findings:
            return
        if not _origin_trusted(runtime, state):
            item = item._replace(findings=_unattributed(item.findings, state.auth.origin))
        refuse = item.refused and config.enforcing
        record_findings(
            runtime,
            [replace(f, event_id=state.endpoint.event_id) for f in item.findings],
            action="rejected" if refuse else "flagged",
            endpoint="event",
        )
        if refuse:
            if isinstance(policy, StateUnavailable):
                _retry_later(flow, "room state unavailable")
            else:
                _forbidden(flow, _reason(item))
            runtime.metrics.requests.labels("inbound", "event", "refused").inc()

    @staticmethod
    def _internal_error(runtime: Runtime, flow: http.HTTPFlow, where: str) -> str:
        logger.exception(
            "internal error checking %s %s", flow.request.method, flow.request.path[:200]
        )
        runtime.metrics.internal_errors.labels(where).inc()
        if runtime.config.fail_open or not runtime.config.enforcing:
            runtime.metrics.fail_open.labels(where).inc()
            return "fail_open"
        _retry_later(flow, "internal error")
        return "error"

    async def _authenticate(self, runtime: Runtime, flow: http.HTTPFlow, state: FlowState) -> bool:
        """Check the X-Matrix request signature, so nobody is blamed on a forged origin.

        False when the request was answered locally (enforce) or must not be attributed.
        """
        auth = state.auth
        config = runtime.config
        if auth is None:
            detail = f"{state.endpoint.name} request without a valid X-Matrix Authorization header"
            self._unauthorized(
                runtime,
                flow,
                state,
                Severity.WARNING,
                detail,
                "Missing or invalid X-Matrix authorization",
            )
            return False
        if auth.destination is not None and auth.destination != config.server_name:
            # Signed for another server: Synapse answers 401 too ("Destination mismatch in
            # auth header"). Accepted, a request one server sent to another could be
            # replayed here and blamed on its origin.
            detail = f"X-Matrix destination {auth.destination[:100]!r} is not {config.server_name}"
            self._unauthorized(
                runtime,
                flow,
                state,
                Severity.WARNING,
                detail,
                "Destination mismatch in auth header",
            )
            return False
        if not config.verify_signatures:
            return True
        key = await runtime.keys.ensure(auth.origin, auth.key_id)
        if key is None:
            if config.enforcing and not config.fail_open:
                # on_error: closed. Nothing unverified passes; the sender retries later.
                logger.warning(
                    "no key %s for %s; request refused for now (on_error: closed)",
                    auth.key_id,
                    auth.origin,
                )
                _retry_later(flow, "the origin's signing key is unavailable")
                state.answered_locally = True
                return False
            # Unverifiable: checked, but nobody is blamed on its word and it leaves nothing
            # behind (see _origin_trusted).
            runtime.metrics.fail_open.labels("request_key").inc()
            logger.warning(
                "no key %s for %s; request signature not checked", auth.key_id, auth.origin
            )
            return True
        body = request_body(flow)
        content = None
        if body:
            content, reason = parse_json_body(body)
            if reason is not None:
                content = None
        state.content = content  # the /send checks take their PDUs' events from it
        ok = verify_request_signature(
            auth,
            flow.request.method,
            flow.request.path,
            auth.destination or config.server_name,
            content,
            key.verify_key,
        )
        if ok:
            state.origin_verified = True
            return True
        detail = f"X-Matrix signature claiming origin {auth.origin[:100]} does not verify"
        self._unauthorized(
            runtime, flow, state, Severity.HIGH, detail, "Invalid X-Matrix signature"
        )
        return False

    def _unauthorized(
        self,
        runtime: Runtime,
        flow: http.HTTPFlow,
        state: FlowState,
        severity: Severity,
        detail: str,
        error: str,
    ) -> None:
        """A request whose origin is not authenticated: recorded blaming nobody (its claim is
        unproven), and answered 401 when enforcing."""
        finding = Finding(Rule.BAD_REQUEST_SIGNATURE, severity, detail, confidence=Confidence.LOW)
        self._record(runtime, state, [finding], rejected=runtime.config.enforcing)
        if runtime.config.enforcing:
            json_response(flow, 401, {"errcode": "M_UNAUTHORIZED", "error": error})
            state.answered_locally = True

    def _refuse_oversized(self, runtime: Runtime, flow: http.HTTPFlow, state: FlowState) -> str:
        """Over max_body_bytes: refused before anything parses it, X-Matrix included (its
        verification needs the body), so the claimed origin is not blamed."""
        size, limit = len(request_body(flow)), runtime.config.max_body_bytes
        detail = f"{state.endpoint.name} body of {size} bytes is over the {limit}-byte limit"
        finding = _oversized(state, detail)
        return self._refuse_request(runtime, flow, state, finding, 413, "M_TOO_LARGE")

    async def _check_send(self, runtime: Runtime, flow: http.HTTPFlow, state: FlowState) -> str:
        config = runtime.config
        assert state.auth is not None
        origin = state.auth.origin
        txn_id = state.endpoint.txn_id or ""
        body = request_body(flow)
        txn = parse_transaction(body, txn_id, origin, decoded=state.content)
        state.pdu_count = len(txn.pdus)
        if txn.error is not None:
            return self._refuse_request(runtime, flow, state, txn.error, 400, "M_BAD_JSON")
        rooms = await runtime.state.get_many(
            rooms_of_transaction(txn), config.state_timeout_seconds
        )
        policy = runtime.policy.current
        verdict = check_transaction(
            txn, rooms, fail_open=config.fail_open, policy=policy, refused=runtime.refused.rooms
        )
        unverified = 0
        if config.verify_signatures:
            verdict, unverified = await self._check_signatures(runtime, txn, rooms, verdict)
        verdict = apply_actions_to_transaction(verdict, policy)
        trusted = _origin_trusted(runtime, state)
        if not trusted:
            verdict = _unattributed_verdict(verdict, origin)
        for item in verdict.pdus:
            if item.findings and trusted:
                runtime.refused.add_findings(item.findings)
        for pdu in txn.pdus:
            if pdu.state_key is None:  # only state changes a room's or the policy's state
                continue
            if pdu.event_type in RELEVANT_STATE_TYPES:
                state.stale_rooms.add(pdu.room_id)
            if runtime.policy.watches(pdu.room_id, pdu.event_type):
                runtime.policy.mark_stale()
        if trusted:
            _queue_knocks(runtime, txn, rooms, verdict)
        if runtime.index is not None and trusted:
            event_ids = {i.position: i.event_id for i in verdict.pdus if i.event_id}
            runtime.index.see(txn.pdus, origin, event_ids=event_ids)
        for item in verdict.pdus:
            if item.event_id is None or not trusted:
                # An unauthenticated origin leaves no verdict for the hook, which judges
                # those events itself: a forged delivery must not decide for a real one.
                continue
            if not item.findings:
                # Only when the room's state is not changing under it: the hook answers
                # from this while that state and the policy are still the ones in force.
                room = rooms.get(item.room_id or "")
                if isinstance(room, RoomPolicy) and item.room_id not in state.stale_rooms:
                    runtime.verdicts.put_allowed(item.event_id, room, policy)
                continue
            if any(f.rule is Rule.STATE_UNAVAILABLE for f in item.findings):
                continue
            if refuses_deliverer_only(item.findings):
                # Refused for who delivered it, not for who wrote it: that must not decide
                # for the same event from a permitted server (else a refused server could
                # get any event refused by delivering it first). The hook judges it itself.
                continue
            runtime.verdicts.put(
                item.event_id,
                EdgeVerdict(item.decision, item.reason or "allowed", origin, item.findings),
            )

        def action_of(item: ItemVerdict) -> str:
            return _action(config.enforcing, item, verdict)

        count_items(runtime.metrics.pdus, "inbound", verdict.pdus, action_of)
        count_items(runtime.metrics.edus, "inbound", verdict.edus, action_of)
        if unverified:
            # Whatever on_error says: the policy checks ran, and the homeserver verifies
            # every event's signatures itself (it drops what it cannot verify). Refusing
            # the transaction instead would wedge the origin's whole stream on one event
            # whose signer's keys are gone for good.
            runtime.metrics.fail_open.labels("event_key").inc(unverified)
            logger.warning(
                "transaction %s from %s: %d PDUs passed with signatures unchecked by modgud "
                "(keys unavailable)",
                txn_id,
                origin,
                unverified,
            )
        unavailable = any(isinstance(room, StateUnavailable) for room in rooms.values())
        missing = _unavailable_findings(verdict) if unavailable else []
        if missing and (config.fail_open or not config.enforcing):
            runtime.metrics.fail_open.labels("state").inc(len(missing))
            logger.warning(
                "transaction %s from %s: room state unavailable for %d items, passed "
                "unchecked (on_error: open)",
                txn_id,
                origin,
                len(missing),
            )
        if config.enforcing and not config.fail_open and missing:
            # on_error: closed, and a room's state could not be had: nothing unverified
            # passes, and a 5xx makes the sender retry the transaction later.
            record_findings(
                runtime,
                _unavailable_findings(verdict),
                action="rejected",
                endpoint="send",
                txn_id=txn_id,
            )
            _retry_later(flow, "room state unavailable")
            state.answered_locally = True
            return "unavailable"
        answer_locally = config.enforcing and verdict.refused_all
        for item in verdict.items:
            if item.findings:
                record_findings(
                    runtime,
                    item.findings,
                    action=_action(config.enforcing, item, verdict),
                    endpoint="send",
                    txn_id=txn_id,
                )
        if verdict.findings:
            record_findings(
                runtime, verdict.findings, action="flagged", endpoint="send", txn_id=txn_id
            )
        if answer_locally:
            # Synapse's /send answer: 200 with a per-PDU error for each refused event.
            pdus = {
                item.event_id: {"errcode": "M_FORBIDDEN", "error": _reason(item)}
                for item in verdict.pdus
                if item.event_id is not None
            }
            json_response(flow, 200, {"pdus": pdus})
            state.answered_locally = True
            logger.info("refused transaction %s from %s: every item refused", txn_id, origin)
            return "refused"
        return "mixed" if verdict.refused_any else "forwarded"

    async def _check_signatures(
        self,
        runtime: Runtime,
        txn: Transaction,
        rooms: dict[str, RoomPolicy | None | StateUnavailable],
        verdict: TransactionVerdict,
    ) -> tuple[TransactionVerdict, int]:
        """Verify each PDU's signatures (spec: Server-Server API, "Checks performed on
        receipt of a PDU"); a bad one is refused, a verified author raises confidence.
        Also returns how many PDUs could not be checked for want of keys."""
        by_index = {item.position: item for item in verdict.pdus}
        checked: list[ItemVerdict] = []
        unverified = 0
        for pdu in txn.pdus:
            item = by_index[pdu.position]
            policy = rooms.get(pdu.room_id)
            if not isinstance(policy, RoomPolicy) or policy.room_version is None:
                checked.append(item)
                continue
            result, digest = await _verify_signatures(runtime, pdu.event, policy.room_version)
            if item.event_id is None and digest is not None:
                # The signatures sign what the reference hash hashes: the event ID is free.
                item = item._replace(
                    event_id=event_id_from_reference_hash(digest, pdu.event, policy.room_version)
                )
            if result.missing_keys and not item.refused:
                unverified += 1
            checked.append(with_signature_check(item, pdu, txn.origin or "", result))
        others = [item for item in verdict.pdus if item.position < 0]
        return (
            TransactionVerdict(tuple(checked + others), verdict.edus, verdict.findings),
            unverified,
        )

    async def _check_room_data(
        self, runtime: Runtime, flow: http.HTTPFlow, state: FlowState
    ) -> str:
        config = runtime.config
        endpoint = state.endpoint
        assert state.auth is not None and endpoint.room_id is not None
        policy = await runtime.state.get(endpoint.room_id, config.state_timeout_seconds)
        item = check_request_origin(
            state.auth.origin,
            endpoint.room_id,
            policy,
            endpoint.name,
            fail_open=config.fail_open,
            policy=runtime.policy.current,
        )
        item = apply_actions(item, runtime.policy.current)
        if not item.findings:
            return "forwarded"
        if not _origin_trusted(runtime, state):
            item = item._replace(findings=_unattributed(item.findings, state.auth.origin))
        refuse = item.refused and config.enforcing
        if refuse and isinstance(policy, StateUnavailable):
            record_findings(runtime, item.findings, action="rejected", endpoint=endpoint.name)
            _retry_later(flow, "room state unavailable")
            state.answered_locally = True
            return "unavailable"
        record_findings(
            runtime,
            item.findings,
            action="rejected" if refuse else "flagged",
            endpoint=endpoint.name,
        )
        if refuse:
            _forbidden(flow, _reason(item))
            state.answered_locally = True
            return "refused"
        return "forwarded"

    def _refuse_request(
        self,
        runtime: Runtime,
        flow: http.HTTPFlow,
        state: FlowState,
        finding: Finding,
        status: int,
        errcode: str,
    ) -> str:
        enforcing = runtime.config.enforcing
        self._record(runtime, state, [finding], rejected=enforcing)
        if enforcing:
            json_response(flow, status, {"errcode": errcode, "error": finding.detail})
            state.answered_locally = True
            return "refused"
        return "forwarded"

    @staticmethod
    def _record(
        runtime: Runtime, state: FlowState, findings: list[Finding], *, rejected: bool
    ) -> None:
        record_findings(
            runtime,
            findings,
            action="rejected" if rejected else "flagged",
            endpoint=state.endpoint.name,
            txn_id=state.endpoint.txn_id,
        )


def _oversized(state: FlowState, detail: str) -> Finding:
    """A body over the limit: its X-Matrix signature was not checked (that needs the
    body), so the claimed origin is named but not blamed."""
    return Finding(
        Rule.MALFORMED_REQUEST,
        Severity.WARNING,
        detail,
        origin=state.auth.origin if state.auth else None,
        confidence=Confidence.LOW,
    )


def _queue_knocks(
    runtime: Runtime,
    txn: Transaction,
    rooms: dict[str, RoomPolicy | None | StateUnavailable],
    verdict: TransactionVerdict,
) -> None:
    """Servers asking to take part (m.server.knock EDUs and MSC4124 knock state events)
    that are not yet permitted go into the approval queue (`modgud knocks`)."""
    origin = txn.origin or ""
    refused_edus = {i.position for i in verdict.edus if i.refused and i.position >= 0}
    refused_pdus = {i.position for i in verdict.pdus if i.refused and i.position >= 0}
    asks: list[tuple[bool, str]] = []  # (refused outright, room)
    for edu in txn.edus:
        room_id = edu.content.get("room_id")
        if edu.edu_type in KNOCK_TYPES and isinstance(room_id, str):
            asks.append((edu.position in refused_edus, room_id))
    for pdu in txn.pdus:
        if pdu.event_type in KNOCK_TYPES and (pdu.state_key or "").lower() == origin.lower():
            asks.append((pdu.position in refused_pdus, pdu.room_id))
    if not asks:
        return
    policy = runtime.policy.current
    records = []
    for refused, room_id in asks:
        room = rooms.get(room_id)
        if refused or not isinstance(room, RoomPolicy):
            continue  # refused outright (ACL, ban, deny) or a room the homeserver lacks
        if room.participation.get(origin.lower()) == "permitted":
            continue
        banned = len(policy.bans) and policy.bans.bans_server(origin)
        records.append(
            KnockRecord(time.time(), room_id, origin, "banned by a policy list" if banned else None)
        )
    runtime.store.record(records)
    runtime.metrics.knocks.inc(len(records))


_MEMBERSHIP_ENDPOINTS = frozenset({"send_join", "send_knock", "send_leave", "invite"})
_AUTHENTICATED = (EndpointClass.SEND, EndpointClass.ROOM_DATA, EndpointClass.EVENT)


def _origin_trusted(runtime: Runtime, state: FlowState) -> bool:
    """Whether the request's origin may be blamed and remembered: its X-Matrix signature
    verified, or the operator turned verification off (claims are then taken as made).
    A request let through because the origin's key could not be had (on_error: open) is
    still checked, but a forged origin — any server name with a made-up key ID — must
    not get another server blamed, its knocks queued, its deliveries indexed, or leave
    verdicts the hook would apply to the real events."""
    return state.origin_verified or not runtime.config.verify_signatures


def _unattributed(findings: Iterable[Finding], origin: str) -> tuple[Finding, ...]:
    """Findings of a request whose origin is only claimed: nobody is blamed."""
    note = f" (origin {origin[:100]} not authenticated)"
    return tuple(
        replace(f, attributed_to=None, confidence=Confidence.LOW, detail=f.detail + note)
        for f in findings
    )


def _unattributed_verdict(verdict: TransactionVerdict, origin: str) -> TransactionVerdict:
    def item(i: ItemVerdict) -> ItemVerdict:
        return i._replace(findings=_unattributed(i.findings, origin)) if i.findings else i

    return TransactionVerdict(
        tuple(item(i) for i in verdict.pdus),
        tuple(item(i) for i in verdict.edus),
        _unattributed(verdict.findings, origin),
    )


def _unavailable_findings(verdict: TransactionVerdict) -> list[Finding]:
    return [f for f in verdict.all_findings() if f.rule is Rule.STATE_UNAVAILABLE]


async def _verify_signatures(
    runtime: Runtime, event: Mapping[str, object], room_version: RoomVersion
) -> tuple[SignatureCheck, bytes | None]:
    """An event's signature check and its reference hash (None if it has none). The check
    comes from the cache when the same event with the same signatures was checked before
    (relayed, or delivered again); keys are fetched as needed."""
    signed = signing_bytes(event, room_version)
    digest = hashlib.sha256(signed).digest() if signed is not None else None
    signatures = event.get("signatures")
    key: bytes | None = None
    signers: frozenset[str] | None = None
    if digest is not None and isinstance(signatures, dict):
        key = runtime.signatures.key(digest, signatures)
        cached = runtime.signatures.get(key) if key is not None else None
        if cached is not None:
            return cached, digest
        signers = required_signers(event, room_version)
        for server in signers:
            key_ids = signatures.get(server)
            if isinstance(key_ids, dict):
                for key_id in list(key_ids)[:4]:
                    if (
                        isinstance(key_id, str)
                        and key_id.startswith("ed25519:")
                        and runtime.keys.lookup(server, key_id) is None
                    ):
                        await runtime.keys.ensure(server, key_id)
    result = verify_event_signatures(
        event, room_version, runtime.keys.lookup, signed=signed, signers=signers
    )
    if key is not None:
        runtime.signatures.put(key, result)
    return result, digest


def _reason(item: ItemVerdict) -> str:
    return (
        "; ".join(f.detail for f in item.findings if f.rule is not Rule.UNKNOWN_ROOM_VERSION)
        or "refused"
    )


def _action(enforcing: bool, item: ItemVerdict, verdict: TransactionVerdict) -> str:
    """What happens to an item: `allowed`; `rejected` (answered locally); `dropped` (the
    event hook refuses it inside the homeserver); `flagged` (recorded, not refused here)."""
    if not item.refused:
        return "flagged" if item.findings else "allowed"
    if not enforcing:
        return "flagged"
    if verdict.refused_all:
        return "rejected"
    if item.event_id is not None:
        return "dropped"
    return "flagged"
