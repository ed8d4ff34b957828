"""The checks: plain data in, a verdict with findings out. Never raises on hostile input.

The spec checks a room's server ACL only against the server making the request
(Server-Server API, "Server Access Control Lists"); modgud also checks the server that
*wrote* each event, which is how events a permitted server relays for a denied one
("leaks") are caught.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import NamedTuple

from rules.acl import check_server_acl
from rules.eventhash import compute_event_id
from rules.federation import Edu, Pdu, Transaction, edu_rooms, edu_users
from rules.findings import Confidence, Decision, Finding, Rule, Severity
from rules.roomstate import RoomPolicy
from rules.servername import server_of_user
from rules.signatures import SignatureCheck

__all__ = [
    "UNAVAILABLE",
    "ItemVerdict",
    "RoomLookup",
    "StateUnavailable",
    "TransactionVerdict",
    "check_edu",
    "check_event",
    "check_pdu",
    "check_request_origin",
    "check_transaction",
    "rooms_of_transaction",
    "with_signature_check",
]


class StateUnavailable:
    """Marks a room whose state could not be had (homeserver down, timeout)."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "UNAVAILABLE"


UNAVAILABLE = StateUnavailable()

# room_id → its policy; None: the homeserver does not know the room (nothing to enforce).
RoomLookup = Mapping[str, RoomPolicy | None | StateUnavailable]


class ItemVerdict(NamedTuple):
    """The verdict on one PDU or EDU (or a whole request, for non-/send endpoints).

    A NamedTuple, not a frozen dataclass: just as immutable, and three times cheaper to
    build, which matters at one verdict per PDU on the hot path."""

    position: int  # where the item sits in the transaction; -1: unparseable
    decision: Decision
    findings: tuple[Finding, ...] = ()
    event_id: str | None = None
    room_id: str | None = None

    @property
    def refused(self) -> bool:
        return self.decision is Decision.REFUSE


@dataclass(frozen=True, slots=True)
class TransactionVerdict:
    pdus: tuple[ItemVerdict, ...]
    edus: tuple[ItemVerdict, ...]
    findings: tuple[Finding, ...]  # transaction-level findings (e.g. origin mismatch)

    @property
    def items(self) -> tuple[ItemVerdict, ...]:
        return self.pdus + self.edus

    @property
    def refused_all(self) -> bool:
        """Every PDU and EDU refused (and there is at least one): answer locally."""
        items = self.items
        return bool(items) and all(v.refused for v in items)

    @property
    def refused_any(self) -> bool:
        return any(v.refused for v in self.items)

    def all_findings(self) -> list[Finding]:
        out = list(self.findings)
        for verdict in self.items:
            out.extend(verdict.findings)
        return out


def rooms_of_transaction(txn: Transaction) -> set[str]:
    """Every room whose policy the checks of this transaction need."""
    rooms = {pdu.room_id for pdu in txn.pdus}
    for edu in txn.edus:
        rooms.update(edu_rooms(edu))
    return rooms


def _unavailable(
    index: int, fail_open: bool, room_id: str, origin: str, event_id: str | None = None
) -> ItemVerdict:
    finding = Finding(
        Rule.STATE_UNAVAILABLE,
        Severity.WARNING,
        "room state unavailable; "
        + ("allowed (on_error: open)" if fail_open else "refused (on_error: closed)"),
        room_id=room_id,
        event_id=event_id,
        origin=origin,
        confidence=Confidence.LOW,
    )
    decision = Decision.ALLOW if fail_open else Decision.REFUSE
    return ItemVerdict(index, decision, (finding,), event_id, room_id)


def _event_id(pdu: Pdu, policy: RoomPolicy) -> str | None:
    if policy.room_version is None:
        return None
    try:
        return compute_event_id(pdu.event, policy.room_version)
    except (ValueError, TypeError, RecursionError):
        return None


def check_pdu(pdu: Pdu, origin: str, rooms: RoomLookup, *, fail_open: bool) -> ItemVerdict:
    """Check one PDU delivered by `origin` against its room's policy."""
    policy = rooms.get(pdu.room_id)
    if isinstance(policy, StateUnavailable):
        return _unavailable(pdu.position, fail_open, pdu.room_id, origin)
    if policy is None:
        # The homeserver does not know the room: no policy to apply, it decides itself.
        return ItemVerdict(pdu.position, Decision.ALLOW, room_id=pdu.room_id)
    origin_acl = check_server_acl(policy.acl, origin)
    sender_acl = origin_acl
    if origin_acl.allowed and pdu.sender_server != origin:
        sender_acl = check_server_acl(policy.acl, pdu.sender_server)
    if sender_acl.allowed:
        # Allowed PDUs need no event ID: the hook reaches the same verdict on its own.
        return ItemVerdict(pdu.position, Decision.ALLOW, room_id=pdu.room_id)
    event_id: str | None = None
    findings: list[Finding] = []

    def finding(
        rule: Rule,
        severity: Severity,
        detail: str,
        confidence: Confidence = Confidence.HIGH,
        attributed_to: str | None = origin,
    ) -> Finding:
        return Finding(
            rule,
            severity,
            detail,
            room_id=pdu.room_id,
            event_id=event_id,
            event_type=pdu.event_type,
            sender=pdu.sender,
            sender_server=pdu.sender_server,
            origin=origin,
            attributed_to=attributed_to,
            confidence=confidence,
        )

    if not origin_acl.allowed:
        findings.append(
            finding(
                Rule.ACL_ORIGIN,
                Severity.WARNING,
                f"delivering server {origin}: {origin_acl.reason}",
            )
        )
    else:
        detail = f"event written by {pdu.sender_server} ({sender_acl.reason}) relayed by {origin}"
        findings.append(finding(Rule.ACL_SENDER, Severity.HIGH, detail, Confidence.MEDIUM))
    event_id = _event_id(pdu, policy)
    if event_id is None and policy.room_version is None:
        version = policy.room_version_id[:50]
        findings.append(
            finding(
                Rule.UNKNOWN_ROOM_VERSION,
                Severity.INFO,
                f"room version {version!r} is unknown to modgud; event ID not computed",
                Confidence.LOW,
                attributed_to=None,
            )
        )
    findings = [replace(f, event_id=event_id) for f in findings]
    refuse = any(f.rule in (Rule.ACL_ORIGIN, Rule.ACL_SENDER) for f in findings)
    return ItemVerdict(
        pdu.position,
        Decision.REFUSE if refuse else Decision.ALLOW,
        tuple(findings),
        event_id,
        pdu.room_id,
    )


def check_edu(edu: Edu, origin: str, rooms: RoomLookup, *, fail_open: bool) -> ItemVerdict:
    """Check one EDU: users it names must be the origin's (spec: EDU types), and typing
    and receipts are subject to the room's ACL for the origin (MSC4163)."""
    findings: list[Finding] = []
    for user in edu_users(edu):
        server = server_of_user(user)
        if server != origin:
            findings.append(
                Finding(
                    Rule.EDU_IMPERSONATION,
                    Severity.HIGH,
                    f"{edu.edu_type} EDU from {origin} speaks for "
                    f"{str(user)[:100]!r}" + ("" if server else " (not a valid user ID)"),
                    event_type=edu.edu_type,
                    sender=user if isinstance(user, str) else None,
                    sender_server=server,
                    origin=origin,
                    attributed_to=origin,
                )
            )
            break
    for room_id in edu_rooms(edu):
        policy = rooms.get(room_id)
        if isinstance(policy, StateUnavailable):
            if not fail_open:
                return _unavailable(edu.position, fail_open, room_id, origin)
            continue
        if policy is None:
            continue
        decision = check_server_acl(policy.acl, origin)
        if not decision.allowed:
            findings.append(
                Finding(
                    Rule.ACL_EDU,
                    Severity.WARNING,
                    f"{edu.edu_type} EDU from {origin}: {decision.reason}",
                    room_id=room_id,
                    event_type=edu.edu_type,
                    origin=origin,
                    attributed_to=origin,
                )
            )
    room = next(iter(edu_rooms(edu)), None)
    return ItemVerdict(
        edu.position, Decision.REFUSE if findings else Decision.ALLOW, tuple(findings), room_id=room
    )


def check_transaction(
    txn: Transaction, rooms: RoomLookup, *, fail_open: bool
) -> TransactionVerdict:
    """Check every item of a parsed transaction; the caller has checked `txn.error`."""
    origin = txn.origin or ""
    # A transaction's PDUs mostly share a room and an author: an allowed (room, author)
    # pair is decided once per transaction, not once per PDU.
    allowed: set[tuple[str, str]] = set()
    pdus: list[ItemVerdict] = []
    for pdu in txn.pdus:
        key = (pdu.room_id, pdu.sender_server)
        if key in allowed:
            pdus.append(ItemVerdict(pdu.position, Decision.ALLOW, room_id=pdu.room_id))
            continue
        item = check_pdu(pdu, origin, rooms, fail_open=fail_open)
        if item.decision is Decision.ALLOW and not item.findings:
            allowed.add(key)
        pdus.append(item)
    pdus.extend(ItemVerdict(-1, Decision.REFUSE, (f,)) for f in txn.bad_pdus)
    edus = [check_edu(edu, origin, rooms, fail_open=fail_open) for edu in txn.edus]
    edus.extend(ItemVerdict(-1, Decision.REFUSE, (f,)) for f in txn.bad_edus)
    return TransactionVerdict(tuple(pdus), tuple(edus), txn.warnings)


def check_request_origin(
    origin: str,
    room_id: str,
    policy: RoomPolicy | None | StateUnavailable,
    endpoint: str,
    *,
    fail_open: bool,
) -> ItemVerdict:
    """Room-data endpoints (make_join, send_join, state, backfill, …) MUST refuse a
    denied origin with 403 (spec: Server-Server API, "Server Access Control Lists")."""
    if isinstance(policy, StateUnavailable):
        return _unavailable(0, fail_open, room_id, origin)
    decision = check_server_acl(policy.acl if policy else None, origin)
    if decision.allowed:
        return ItemVerdict(0, Decision.ALLOW, room_id=room_id)
    finding = Finding(
        Rule.ACL_ORIGIN,
        Severity.WARNING,
        f"{endpoint} from {origin}: {decision.reason}",
        room_id=room_id,
        origin=origin,
        attributed_to=origin,
    )
    return ItemVerdict(0, Decision.REFUSE, (finding,), room_id=room_id)


def check_event(
    event: Mapping[str, object],
    policy: RoomPolicy | None | StateUnavailable,
    local_server: str,
    *,
    fail_open: bool,
) -> ItemVerdict:
    """The event hook's own evaluation of an event the edge never saw (one the homeserver
    pulled, or a local one): is its author's server allowed in the room?"""
    sender = event.get("sender")
    event_id = event.get("event_id")
    room_id = event.get("room_id")
    eid = event_id if isinstance(event_id, str) else None
    rid = room_id if isinstance(room_id, str) else None
    server = server_of_user(sender)
    if server is None:
        finding = Finding(
            Rule.MALFORMED_PDU,
            Severity.WARNING,
            "event has no valid sender",
            room_id=rid,
            event_id=eid,
        )
        return ItemVerdict(0, Decision.ALLOW, (finding,), eid, rid)
    if server == local_server:
        return ItemVerdict(0, Decision.ALLOW, event_id=eid, room_id=rid)
    if isinstance(policy, StateUnavailable):
        return _unavailable(0, fail_open, rid or "", server, eid)
    decision = check_server_acl(policy.acl if policy else None, server)
    if decision.allowed:
        return ItemVerdict(0, Decision.ALLOW, event_id=eid, room_id=rid)
    event_type = event.get("type")
    finding = Finding(
        Rule.ACL_SENDER,
        Severity.HIGH,
        f"event written by {server}: {decision.reason} (not seen at the edge: pulled or relayed)",
        room_id=rid,
        event_id=eid,
        event_type=event_type if isinstance(event_type, str) else None,
        sender=sender if isinstance(sender, str) else None,
        sender_server=server,
        confidence=Confidence.LOW,
    )
    return ItemVerdict(0, Decision.REFUSE, (finding,), eid, rid)


def with_signature_check(
    item: ItemVerdict, pdu: Pdu, origin: str, check: SignatureCheck
) -> ItemVerdict:
    """Fold a PDU's signature check into its verdict.

    A signature that does not verify refuses the PDU (Synapse drops such events too). A
    verified author signature makes an ACL_SENDER finding high-confidence: the denied
    server really wrote the event. Missing keys leave the verdict as it was.
    """
    if check.ok:
        if pdu.sender_server not in check.verified_servers:
            return item
        findings = tuple(
            replace(f, confidence=Confidence.HIGH) if f.rule is Rule.ACL_SENDER else f
            for f in item.findings
        )
        return item._replace(findings=findings)
    if check.missing_keys:
        return item
    finding = Finding(
        Rule.BAD_EVENT_SIGNATURE,
        Severity.HIGH,
        f"event signature does not verify: {check.reason or 'invalid'}",
        room_id=pdu.room_id,
        event_id=item.event_id,
        event_type=pdu.event_type,
        sender=pdu.sender,
        sender_server=pdu.sender_server,
        origin=origin,
        attributed_to=origin,
        confidence=Confidence.MEDIUM,
    )
    return item._replace(decision=Decision.REFUSE, findings=(*item.findings, finding))
