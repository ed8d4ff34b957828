"""The outbound listener: federation the protected homeserver sends itself, with modgud as
its `https_proxy` (mitmproxy's regular mode, beside the reverse mode of the inbound edge).

Two leaks only this side can see:
- outbound push (leak.outbound): the homeserver sending a room's PDUs, typing or receipts
  to a server refused in that room. Synapse picks destinations by membership alone, so it
  keeps sending to servers the room's ACL denies, and it knows nothing of policy lists or
  participation. In enforce mode a transaction of nothing but refused items is answered
  here, as delivered, and never reaches that server (an error would make the homeserver
  back off the destination for every room). A transaction that mixes refused and allowed
  items is rebuilt without the refused ones and signed again with the homeserver's key
  when the operator gave modgud that key (it is our own server's request); without it,
  it goes out as it is and is recorded.
- pulled (leak.pulled): answers to the homeserver's own requests (/get_missing_events,
  /backfill, /state, /event, send_join) carrying events written by servers refused in the
  room. The event hook keeps such events out of the room; here they are attributed to the
  server that served them — with low confidence, because a malicious server can serve
  another's events to frame it — together with the earliest server the event index knows
  delivered the event.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections import OrderedDict
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from mitmproxy import http
from mitmproxy.proxy.mode_specs import RegularMode

from proxy_addons.endpoints import EndpointClass, classify_path
from proxy_addons.eventindex import lookup_events
from proxy_addons.flowinfo import json_response, request_auth, request_body
from proxy_addons.recording import count_items, record_findings
from proxy_addons.runtime import Runtime, RuntimeHolder
from rules.checks import (
    ItemVerdict,
    TransactionVerdict,
    check_outbound,
    event_id_of,
    pdu_finding,
    rooms_of_transaction,
)
from rules.federation import Pdu, parse_json_body, parse_pdu, parse_transaction
from rules.findings import Confidence, Rule, Severity
from rules.policy import authorise_server
from rules.roomstate import KNOCK_RULE_TYPES, PARTICIPATION_TYPES, RoomPolicy
from rules.servername import strip_port
from rules.xmatrix import sign_request

__all__ = ["OutboundWatcher", "ensure_ca", "is_outbound", "is_proxied"]

logger = logging.getLogger(__name__)

# The homeserver's pulls, and where their answers keep the events.
PULLS: Mapping[str, tuple[str, ...]] = {
    "get_missing_events": ("events",),
    "backfill": ("pdus",),
    "event": ("pdus",),
    "state": ("pdus", "auth_chain"),
    "send_join": ("state", "auth_chain"),
}
MAX_PULLED_EVENTS = 5000
# Answers read at most: Synapse's own limit is 100 MiB (500 MiB for /send_join and
# /state, which it parses as a stream); modgud decodes an answer whole, and 5,000 events
# (MAX_PULLED_EVENTS) of a few KiB each fit well within this.
MAX_ANSWER_BYTES = 64 * 1024 * 1024
# State that decides which servers may receive a room's events.
_DESTINATION_STATE = frozenset(
    {"m.room.server_acl"} | PARTICIPATION_TYPES | KNOCK_RULE_TYPES
)  # checked per answer; a /state answer of a big room is thousands


def ensure_ca(ca_dir: str | Path) -> Path:
    """modgud's CA for the outbound listener (mitmproxy's own files in its confdir),
    created when missing; the path of the certificate the homeserver must trust."""
    from mitmproxy.certs import CertStore

    CertStore.from_store(Path(ca_dir), "mitmproxy", key_size=2048)
    return Path(ca_dir) / "mitmproxy-ca-cert.pem"


def is_outbound(flow: http.HTTPFlow, runtime: Runtime | None) -> bool:
    """A flow of the outbound listener, live."""
    return runtime is not None and runtime.config.outbound is not None and is_proxied(flow)


def is_proxied(flow: http.HTTPFlow) -> bool:
    """A flow of mitmproxy's regular (proxy) mode: the outbound listener's, also when read
    back from a capture."""
    return isinstance(flow.client_conn.proxy_mode, RegularMode)


def destination_of(flow: http.HTTPFlow) -> str:
    """The server a request is for: the X-Matrix destination, else the proxied host."""
    auth = request_auth(flow)
    if auth is not None and auth.destination:
        return auth.destination
    host = flow.request.pretty_host
    return host if flow.request.port == 8448 else f"{host}:{flow.request.port}"


class OutboundWatcher:
    def __init__(self, holder: RuntimeHolder) -> None:
        self.holder = holder
        self._reread: OrderedDict[tuple[str, str], None] = OrderedDict()

    async def request(self, flow: http.HTTPFlow) -> None:
        if flow.response is None and is_outbound(flow, self.holder.runtime):
            await self.inspect_request(flow)

    async def inspect_request(self, flow: http.HTTPFlow) -> None:
        runtime = self.holder.runtime
        endpoint = classify_path(flow.request.path)
        if runtime is None or endpoint.cls is not EndpointClass.SEND:
            return
        if flow.request.method != "PUT":
            return
        started = time.perf_counter()
        outcome, pdus = "forwarded", 0
        try:
            outcome, pdus = await self.check_push(runtime, flow, endpoint.txn_id or "")
        except Exception:
            # Our own server's traffic: an internal error lets it through, counted.
            logger.exception("internal error checking an outbound transaction")
            runtime.metrics.internal_errors.labels("outbound").inc()
            runtime.metrics.fail_open.labels("outbound").inc()
            outcome = "error"
        finally:
            elapsed = time.perf_counter() - started
            metrics = runtime.metrics
            metrics.requests.labels("outbound", "send", outcome).inc()
            metrics.transaction_seconds.labels("outbound").observe(elapsed)
            if pdus:
                metrics.pdu_seconds.labels("outbound").observe(elapsed / pdus)

    async def check_push(
        self, runtime: Runtime, flow: http.HTTPFlow, txn_id: str
    ) -> tuple[str, int]:
        """Judge and enforce one outbound /send; its outcome and PDU count."""
        config = runtime.config
        destination = destination_of(flow)
        txn = parse_transaction(request_body(flow), txn_id, config.server_name)
        if txn.error is not None:
            return "forwarded", 0  # our own homeserver's body: nothing modgud should judge
        rooms_needed = rooms_of_transaction(txn)
        for pdu in txn.pdus:
            # The homeserver sends an event once it has stored it: a change of who may
            # take part going out is already in force, so read the room again — once per
            # event, not once per destination it goes to.
            if pdu.event_type in _DESTINATION_STATE and pdu.state_key is not None:
                key = (pdu.room_id, pdu.content_hash or "")
                if key not in self._reread:
                    self._reread[key] = None
                    if len(self._reread) > 1000:
                        self._reread.popitem(last=False)
                    runtime.state.mark_stale(pdu.room_id)
        rooms = await runtime.state.get_many(rooms_needed, config.state_timeout_seconds)
        verdict = check_outbound(
            txn,
            config.server_name,
            destination,
            rooms,
            runtime.policy.current,
            fail_open=config.fail_open,
        )
        if runtime.index is not None:
            runtime.index.see(txn.pdus, config.server_name, direction="outbound")
        outcome = "forwarded"
        if config.enforcing and verdict.refused_any:
            outcome = self._enforce(runtime, flow, verdict, destination)
        elif verdict.refused_any:
            outcome = "mixed"
        action = "rejected" if outcome in ("refused", "rebuilt", "unavailable") else "flagged"

        def action_of(item: ItemVerdict) -> str:
            if item.refused and action == "rejected":
                return "rejected"
            return "flagged" if item.findings else "allowed"

        metrics = runtime.metrics
        count_items(metrics.pdus, "outbound", verdict.pdus, action_of)
        count_items(metrics.edus, "outbound", verdict.edus, action_of)
        findings = verdict.all_findings()
        if any(f.rule is Rule.STATE_UNAVAILABLE for f in findings) and outcome != "unavailable":
            metrics.fail_open.labels("outbound").inc()
        if findings:
            record_findings(
                runtime,
                findings,
                action=action,
                endpoint="send",
                txn_id=txn_id,
                direction="outbound",
            )
        return outcome, len(txn.pdus)

    def _enforce(
        self,
        runtime: Runtime,
        flow: http.HTTPFlow,
        verdict: TransactionVerdict,
        destination: str,
    ) -> str:
        """Keep the refused items from the destination; the request's outcome."""
        refused = [v for v in verdict.items if v.refused]
        if any(f.rule is Rule.STATE_UNAVAILABLE for v in refused for f in v.findings):
            # on_error: closed and the room's state unknown: not sent, and not claimed
            # delivered either — the homeserver retries the transaction later.
            json_response(
                flow, 503, {"errcode": "M_UNKNOWN", "error": "modgud: room state unavailable"}
            )
            return "unavailable"
        if verdict.refused_all:
            json_response(flow, 200, {"pdus": {}})
            return "refused"
        key = runtime.config.outbound_signing_key
        if key is None:
            return "mixed"  # no key to sign a smaller transaction with: sent as it is
        body = _without_refused(request_body(flow), verdict)
        if body is None:
            return "mixed"
        try:
            auth = sign_request(
                flow.request.method,
                flow.request.path,
                runtime.config.server_name,
                destination,
                json.loads(body),
                key,
            )
        except (ValueError, TypeError, RecursionError):
            # Not canonical JSON (a lone surrogate, say): it cannot be signed, so it goes
            # out as it is. Signed first, changed after: never a new body with the old
            # signature, which the destination would refuse.
            return "mixed"
        flow.request.content = body
        flow.request.headers.set_all("authorization", [auth])
        return "rebuilt"

    async def response(self, flow: http.HTTPFlow) -> None:
        if is_outbound(flow, self.holder.runtime):
            await self.inspect_response(flow)

    async def inspect_response(self, flow: http.HTTPFlow) -> None:
        runtime = self.holder.runtime
        if runtime is None or flow.response is None or flow.response.status_code != 200:
            return
        name = classify_path(flow.request.path).name
        if name not in PULLS:
            return
        try:
            await self.check_pull(runtime, flow, name)
        except Exception:
            logger.exception("internal error checking an answer to the homeserver's %s", name)
            runtime.metrics.internal_errors.labels("outbound").inc()

    async def check_pull(self, runtime: Runtime, flow: http.HTTPFlow, name: str) -> None:
        assert flow.response is not None
        config = runtime.config
        responder = destination_of(flow)
        body = _readable_answer(flow.response)
        if body is None:
            return
        if len(body) > MAX_ANSWER_BYTES:
            # Not parsed: decoded, it would take several times its size in memory. The
            # event hook still judges every event of it that the homeserver keeps.
            runtime.metrics.fail_open.labels("outbound").inc()
            logger.warning(
                "answer of %d bytes from %s to our %s not checked (over %d)",
                len(body),
                responder[:100],
                name,
                MAX_ANSWER_BYTES,
            )
            return
        answer, reason = parse_json_body(body)
        if reason is not None or not isinstance(answer, dict):
            return  # the homeserver itself refuses an answer it cannot read
        pdus = _answer_pdus(name, answer, responder)
        if runtime.index is not None:
            runtime.index.see(pdus, responder, direction="inbound", endpoint=name)
        local = strip_port(config.server_name)
        candidates = [p for p in pdus if strip_port(p.sender_server) != local]
        rooms = await runtime.state.get_many(
            {p.room_id for p in candidates}, config.state_timeout_seconds
        )
        policy = runtime.policy.current
        refused: list[tuple[Pdu, str, str | None]] = []
        for pdu in candidates:
            room = rooms.get(pdu.room_id)
            if not isinstance(room, RoomPolicy):
                continue
            refusal = authorise_server(pdu.sender_server, room, policy)
            if refusal is not None:
                refused.append((pdu, refusal.reason, event_id_of(pdu, room)))
        if not refused:
            return
        first = await self._first_deliverers(runtime, refused)
        findings = []
        for pdu, why, event_id in refused:
            known = first.get((pdu.room_id, pdu.content_hash or ""))
            earliest = (
                f"; first delivered to us by {known}"
                if known and known != responder
                else "; no earlier delivery known"
            )
            findings.append(
                pdu_finding(
                    pdu,
                    Rule.LEAK_PULLED,
                    Severity.WARNING,
                    f"{responder} served, in answer to our {name}, an event written by "
                    f"{pdu.sender_server} ({why}){earliest}",
                    event_id=event_id,
                    origin=responder,
                    attributed_to=responder,
                    confidence=Confidence.LOW,
                )
            )
        record_findings(runtime, findings, action="flagged", endpoint=name, direction="outbound")

    async def _first_deliverers(
        self, runtime: Runtime, events: list[tuple[Pdu, str, str | None]]
    ) -> dict[tuple[str, str], str]:
        """(room, content hash) → the first server the index saw deliver it; read in a
        thread, so the event loop never waits on SQLite."""
        by_room: dict[str, list[str]] = {}
        for pdu, _, _ in events:
            if pdu.content_hash:
                by_room.setdefault(pdu.room_id, []).append(pdu.content_hash)
        database = runtime.config.database
        if not by_room:
            return {}

        def lookup() -> dict[tuple[str, str], str]:
            out: dict[tuple[str, str], str] = {}
            # Index rows wait in the writer's queue for up to its flush interval: what this
            # modgud saw deliver a moment ago must be in the answer too.
            runtime.store.flush(2.0)
            if not Path(database).exists():
                return out
            for room_id, hashes in by_room.items():
                for content_hash, row in lookup_events(database, room_id, hashes).items():
                    if row.get("first_origin"):
                        out[(room_id, content_hash)] = str(row["first_origin"])
            return out

        try:
            return await asyncio.to_thread(lookup)
        except ValueError as e:
            logger.warning("event index unreadable: %s", e)
            return {}


def _readable_answer(response: http.Response) -> bytes | None:
    """An answer's bytes as the homeserver reads them; None for a content-encoded one.
    Synapse does not decode a federation answer (it refuses a compressed one as not
    JSON), and decoding it here would let a small compressed answer expand without bound,
    so modgud reads the raw bytes and leaves an encoded answer alone."""
    encoding = response.headers.get("content-encoding", "").strip().lower()
    if encoding not in ("", "identity"):
        return None
    return response.raw_content or b""


def _answer_pdus(name: str, answer: dict[str, Any], responder: str) -> list[Pdu]:
    raw: list[object] = []
    for key in PULLS[name]:
        value = answer.get(key)
        if isinstance(value, list):
            raw.extend(value)
    if name == "send_join" and isinstance(answer.get("event"), dict):
        raw.append(answer["event"])
    out = []
    for i, event in enumerate(raw[:MAX_PULLED_EVENTS]):
        pdu = parse_pdu(event, i, responder, check_size=False)
        if isinstance(pdu, Pdu):
            out.append(pdu)
    return out


def _without_refused(body: bytes, verdict: TransactionVerdict) -> bytes | None:
    """The transaction's body without its refused PDUs and EDUs (a receipt EDU loses only
    the rooms refused to the destination); None when it cannot be rebuilt."""
    raw, reason = parse_json_body(body)
    if reason is not None or not isinstance(raw, dict):
        return None
    pdus, edus = raw.get("pdus") or [], raw.get("edus") or []
    if not isinstance(pdus, list) or not isinstance(edus, list):
        return None
    refused_pdus = {v.position for v in verdict.pdus if v.refused}
    refused_edus = {v.position: v for v in verdict.edus if v.refused}
    kept_edus = []
    for position, edu in enumerate(edus):
        v = refused_edus.get(position)
        if v is None:
            kept_edus.append(edu)
        elif isinstance(edu, dict) and edu.get("edu_type") == "m.receipt":
            content = edu.get("content")
            rooms = {f.room_id for f in v.findings}
            if isinstance(content, dict) and any(r not in rooms for r in content):
                kept_edus.append(
                    {**edu, "content": {r: c for r, c in content.items() if r not in rooms}}
                )
    kept_pdus = [p for position, p in enumerate(pdus) if position not in refused_pdus]
    return json.dumps({**raw, "pdus": kept_pdus, "edus": kept_edus}).encode()
