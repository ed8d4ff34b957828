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

from rules.canonical import canonical_json_size
from rules.eventhash import compute_event_id
from rules.federation import MAX_PDU_BYTES, Edu, Pdu, Transaction, edu_rooms, edu_users
from rules.findings import Confidence, Decision, Finding, Rule, Severity
from rules.policy import NO_POLICY, Barrier, OperatorPolicy, authorise_server
from rules.roomstate import KNOCK_TYPES, RoomPolicy
from rules.servername import server_of_user
from rules.signatures import SignatureCheck

__all__ = [
    "UNAVAILABLE",
    "apply_actions",
    "apply_actions_to_transaction",
    "ItemVerdict",
    "RoomLookup",
    "StateUnavailable",
    "TransactionVerdict",
    "check_edu",
    "check_event",
    "check_invite",
    "check_outbound",
    "check_pdu",
    "check_references",
    "event_references",
    "is_legitimate_relay",
    "author_refusals",
    "judge_event",
    "pdu_bytes",
    "check_request_origin",
    "event_id_of",
    "pdu_finding",
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

    @property
    def reason(self) -> str:
        """The findings' details, as the refused party (and the log) is told them."""
        return "; ".join(f.detail for f in self.findings)


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


_ALWAYS = frozenset({"malformed", "error"})
_LEAKS = frozenset({Rule.LEAK_RELAYED, Rule.LEAK_REFERENCE})


def apply_actions(item: ItemVerdict, policy: OperatorPolicy) -> ItemVerdict:
    """The operator's per-check settings: `off` removes a check's findings, `flag` keeps
    them without refusing, a severity replaces the finding's. An item stays refused only
    while a finding that refuses remains (malformed input, unavailable state and checks
    set to `drop`)."""
    if not item.findings:
        return item
    kept: list[Finding] = []
    refuse = False
    for f in item.findings:
        setting = policy.setting(str(f.rule), f.room_id or item.room_id)
        if setting is None:
            kept.append(f)
            # malformed input and unavailable state (on_error: closed) still refuse
            refuse = refuse or (item.refused and str(f.rule).split(".")[0] in _ALWAYS)
            continue
        if setting.action == "off":
            continue
        if setting.severity is not None:
            f = replace(f, severity=Severity(setting.severity))
        kept.append(f)
        # Leak findings are evidence, not refusals, unless the operator says drop.
        refuse = refuse or (setting.action == "drop" and (item.refused or f.rule in _LEAKS))
    decision = Decision.REFUSE if refuse else Decision.ALLOW
    return item._replace(decision=decision, findings=tuple(kept))


def apply_actions_to_transaction(
    verdict: TransactionVerdict, policy: OperatorPolicy
) -> TransactionVerdict:
    if not any(i.findings for i in verdict.pdus) and not any(i.findings for i in verdict.edus):
        return verdict
    return TransactionVerdict(
        tuple(apply_actions(i, policy) for i in verdict.pdus),
        tuple(apply_actions(i, policy) for i in verdict.edus),
        verdict.findings,
    )


def check_outbound(
    txn: Transaction,
    local_server: str,
    destination: str,
    rooms: RoomLookup,
    policy: OperatorPolicy = NO_POLICY,
    *,
    fail_open: bool = True,
) -> TransactionVerdict:
    """Our own homeserver's transaction to `destination`: each PDU, and each EDU about a
    room (typing, receipts), is refused when the destination may not take part in its
    room — the homeserver knows nothing of policy lists or participation, and keeps
    sending to servers its ACL denies (Synapse picks destinations by membership alone).
    Blamed on the local server: it is the one leaking."""

    def verdict(position: int, room_ids: list[str], what: str, pdu: Pdu | None) -> ItemVerdict:
        findings: list[Finding] = []
        for room_id in room_ids:
            room = rooms.get(room_id)
            if isinstance(room, StateUnavailable):
                return _unavailable(position, fail_open, room_id, local_server)
            refusal = authorise_server(destination, room, policy) if room is not None else None
            if refusal is None:
                continue
            detail = f"{local_server} sends {what} to {destination}: {refusal.reason}"
            findings.append(
                pdu_finding(
                    pdu,
                    Rule.LEAK_OUTBOUND,
                    Severity.HIGH,
                    detail,
                    event_id=event_id_of(pdu, room) if room is not None else None,
                    origin=local_server,
                    attributed_to=local_server,
                )
                if pdu is not None
                else Finding(
                    Rule.LEAK_OUTBOUND,
                    Severity.HIGH,
                    detail,
                    room_id=room_id,
                    event_type=what,
                    origin=local_server,
                    attributed_to=local_server,
                )
            )
        if not findings:
            return ItemVerdict(
                position, Decision.ALLOW, (), None, room_ids[0] if room_ids else None
            )
        item = ItemVerdict(position, Decision.REFUSE, tuple(findings), None, findings[0].room_id)
        return apply_actions(item, policy)

    pdus = tuple(verdict(p.position, [p.room_id], "an event", p) for p in txn.pdus)
    edus = tuple(verdict(e.position, edu_rooms(e), e.edu_type, None) for e in txn.edus)
    return TransactionVerdict(pdus, edus, ())


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


def event_id_of(pdu: Pdu, policy: RoomPolicy) -> str | None:
    """The PDU's event ID under its room's version; None when it cannot be computed."""
    if policy.room_version is None:
        return None
    try:
        return compute_event_id(pdu.event, policy.room_version)
    except (ValueError, TypeError, RecursionError):
        return None


def pdu_finding(
    pdu: Pdu,
    rule: Rule,
    severity: Severity,
    detail: str,
    *,
    event_id: str | None,
    origin: str | None,
    attributed_to: str | None,
    confidence: Confidence = Confidence.HIGH,
) -> Finding:
    """A finding about one PDU: its room, type, sender and the sender's server filled in."""
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


_ORIGIN_RULES = {
    Barrier.ACL: Rule.ACL_ORIGIN,
    Barrier.POLICY: Rule.POLICY_ORIGIN,
    Barrier.PARTICIPATION: Rule.PARTICIPATION_ORIGIN,
}
_SENDER_RULES = {
    Barrier.ACL: Rule.ACL_SENDER,
    Barrier.POLICY: Rule.POLICY_SENDER,
    Barrier.PARTICIPATION: Rule.PARTICIPATION_SENDER,
}
_SERVER_RULES = frozenset({*_ORIGIN_RULES.values(), *_SENDER_RULES.values()})
# Findings that refuse the event; the others (unknown room version) only inform.
REFUSING_RULES = frozenset(
    {
        *_ORIGIN_RULES.values(),
        *_SENDER_RULES.values(),
        Rule.POLICY_USER,
        Rule.RESTRICTED_JOIN,
    }
)


def _is_own_knock(event_type: str, state_key: str | None, server: str) -> bool:
    """An MSC4124 m.server.knock by the server it names: how a server asks to take part."""
    return (
        event_type in KNOCK_TYPES and state_key is not None and state_key.lower() == server.lower()
    )


def check_restricted_join(
    event: Mapping[str, object],
    room: RoomPolicy,
    policy: OperatorPolicy = NO_POLICY,
    *,
    in_homeserver: bool = False,
    signatures_known: bool = True,
) -> str | None:
    """Why a join authorised through `join_authorised_via_users_server` (MSC3083) must be
    refused, or None: the authoriser's server must have signed it, the authoriser must be
    joined with at least the invite level now, and their server must be allowed here.

    `in_homeserver`: the homeserver asks about a join it may be vouching for itself
    (send_join to a room it is in), and it adds its own signature only after asking, so a
    missing signature of the protected homeserver is not held against the join there.
    `signatures_known=False`: the event came without its signatures (synapse-http-antispam
    sends the client format); the homeserver has verified them itself."""
    content = event.get("content")
    if event.get("type") != "m.room.member" or not isinstance(content, Mapping):
        return None
    if content.get("membership") != "join" or "join_authorised_via_users_server" not in content:
        return None
    via = content.get("join_authorised_via_users_server")
    via_server = server_of_user(via)
    if via_server is None or not isinstance(via, str):
        return "join_authorised_via_users_server is not a user ID"
    if signatures_known:
        signatures = event.get("signatures")
        signed = signatures.get(via_server) if isinstance(signatures, Mapping) else None
        local_pending = in_homeserver and via_server == policy.local_server
        if (not isinstance(signed, Mapping) or not signed) and not local_pending:
            return f"join authorised by {via} is not signed by {via_server}"
    if via not in room.joined:
        return f"join authorised by {via}, who is not joined to the room"
    if room.power.of(via) < room.power.invite:
        return (
            f"join authorised by {via}, whose power level {room.power.of(via):g} is below "
            f"the invite level {room.power.invite}"
        )
    refusal = authorise_server(via_server, room, policy)
    if refusal is not None:
        return f"join authorised by {via} of {via_server}: {refusal.reason}"
    return None


def author_refusals(
    sender: str,
    server: str,
    event_type: object,
    state_key: object,
    member_event: Mapping[str, object] | None,
    room: RoomPolicy | None,
    policy: OperatorPolicy,
    *,
    check_server: bool = True,
    in_homeserver: bool = False,
    signatures_known: bool = True,
) -> list[tuple[Rule, str]]:
    """What holds against an event whoever delivered it — the check of an event's author
    that the edge (check_pdu), the event hook and the Synapse module (check_event) all
    make: the author's server may not take part in the room (ACL, policy lists,
    participation; a server's own MSC4124 knock is exempt from participation), the author
    is banned by a policy list, or a restricted join (MSC3083) is not honestly authorised.

    `member_event`: the whole event when it is an m.room.member (only joins need more
    than these fields). `check_server=False`: the author's server delivered the event
    itself and was checked as the origin already."""
    out: list[tuple[Rule, str]] = []
    if check_server:
        knocking = isinstance(event_type, str) and _is_own_knock(
            event_type, state_key if isinstance(state_key, str) else None, server
        )
        refusal = authorise_server(server, room, policy, knocking=knocking)
        if refusal is not None:
            out.append((_SENDER_RULES[refusal.barrier], refusal.reason))
    if len(policy.bans) and policy.bans.bans_user(sender):
        out.append((Rule.POLICY_USER, f"{sender} is banned by a policy list"))
    if member_event is not None and room is not None:
        why = check_restricted_join(
            member_event,
            room,
            policy,
            in_homeserver=in_homeserver,
            signatures_known=signatures_known,
        )
        if why is not None:
            out.append((Rule.RESTRICTED_JOIN, why))
    return out


# How sure the edge is of each kind of finding about a PDU, and how grave it is.
_EDGE_GRADES: Mapping[Rule, tuple[Severity, Confidence]] = {
    **{rule: (Severity.HIGH, Confidence.MEDIUM) for rule in _SENDER_RULES.values()},
    Rule.POLICY_USER: (Severity.HIGH, Confidence.HIGH),
    Rule.RESTRICTED_JOIN: (Severity.HIGH, Confidence.MEDIUM),
}


_Refusal = tuple[Rule, Severity, Confidence, str]


def _edge_refusals(
    pdu: Pdu, origin: str, room: RoomPolicy, policy: OperatorPolicy, servers_checked: bool
) -> tuple[list[_Refusal], list[_Refusal]]:
    """What refuses a PDU at the edge: the servers (the delivering server's authorisation,
    else the author's server's), and the rest of the author's checks."""
    servers: list[_Refusal] = []
    check_author_server = not servers_checked and pdu.sender_server != origin
    if not servers_checked:
        knocking = _is_own_knock(pdu.event_type, pdu.state_key, pdu.sender_server)
        refusal = authorise_server(
            origin, room, policy, knocking=knocking and origin == pdu.sender_server
        )
        if refusal is not None:
            detail = f"delivering server {origin}: {refusal.reason}"
            servers.append(
                (_ORIGIN_RULES[refusal.barrier], Severity.WARNING, Confidence.HIGH, detail)
            )
            check_author_server = False  # the origin's refusal is the one that counts
    member = pdu.event if pdu.event_type == "m.room.member" else None
    author: list[_Refusal] = []
    for rule, reason in author_refusals(
        pdu.sender,
        pdu.sender_server,
        pdu.event_type,
        pdu.state_key,
        member,
        room,
        policy,
        check_server=check_author_server,
    ):
        severity, confidence = _EDGE_GRADES[rule]
        if rule in _SENDER_RULES.values():
            detail = f"event written by {pdu.sender_server} ({reason}) relayed by {origin}"
            servers.append((rule, severity, confidence, detail))
        else:
            author.append((rule, severity, confidence, reason))
    return servers, author


def event_references(event: Mapping[str, object]) -> list[str]:
    """The IDs in prev_events and auth_events, in either event format."""
    out: list[str] = []
    for name in ("prev_events", "auth_events"):
        refs = event.get(name)
        if not isinstance(refs, list):
            continue
        for ref in refs[:100]:
            if isinstance(ref, str):
                out.append(ref)
            elif isinstance(ref, list) and ref and isinstance(ref[0], str):
                out.append(ref[0])  # room v1/v2: [event_id, hashes]
    return out


def check_references(event: Mapping[str, object], refused: Mapping[str, str]) -> str | None:
    """Why an event builds on events written by servers refused in its room (its
    prev_events or auth_events name them), or None. `refused`: event ID → author server,
    for the room (spec: Server-Server API, "Server Access Control Lists": inspecting
    prev_events is the way to find servers that break ACLs)."""
    if not refused:
        return None
    hits = [(ref, refused[ref]) for ref in event_references(event) if ref in refused]
    if not hits:
        return None
    first, author = hits[0]
    more = f" and {len(hits) - 1} more" if len(hits) > 1 else ""
    return f"builds on {first}, written by {author} and refused in the room{more}"


_PASSED_ON = frozenset({"join", "leave", "knock"})


def is_legitimate_relay(pdu: Pdu) -> bool:
    """A server pushes (in /send) only events it wrote, with one exception: a resident
    server passes on the membership event a joining, leaving or knocking server built
    through it (send_join / send_leave / send_knock). That event is an m.room.member
    whose state_key is its own sender and whose membership is join, leave or knock."""
    if pdu.event_type != "m.room.member" or pdu.state_key != pdu.sender:
        return False
    content = pdu.event.get("content")
    membership = content.get("membership") if isinstance(content, Mapping) else None
    return isinstance(membership, str) and membership in _PASSED_ON


def _reference_refusals(pdu: Pdu, refused: Mapping[str, str]) -> list[_Refusal]:
    """An event that builds on events written by servers refused in its room."""
    why = check_references(pdu.event, refused) if refused else None
    if why is None:
        return []
    return [(Rule.LEAK_REFERENCE, Severity.HIGH, Confidence.MEDIUM, why)]


def _oversized_pdu(pdu: Pdu, origin: str, room: RoomPolicy | None) -> ItemVerdict:
    """A PDU over the size limit (spec: Server-Server API, "PDUs": 65,536 bytes), refused
    by its event ID when the room's version is known, so the homeserver's judges refuse
    it too."""
    event_id = event_id_of(pdu, room) if room is not None else None
    finding = pdu_finding(
        pdu,
        Rule.MALFORMED_PDU,
        Severity.WARNING,
        f"PDU {pdu.position} is {pdu.oversized} bytes, over the {MAX_PDU_BYTES}-byte limit",
        event_id=event_id,
        origin=origin,
        attributed_to=origin,
    )
    return ItemVerdict(pdu.position, Decision.REFUSE, (finding,), event_id, pdu.room_id)


def check_pdu(
    pdu: Pdu,
    origin: str,
    rooms: RoomLookup,
    *,
    fail_open: bool,
    policy: OperatorPolicy = NO_POLICY,
    servers_checked: bool = False,
    refused: Mapping[str, str] | None = None,
) -> ItemVerdict:
    """Check one PDU delivered by `origin` against its room's state and the operator's
    policy. `servers_checked`: origin and author already passed for this room."""
    room = rooms.get(pdu.room_id)
    if pdu.oversized:
        return _oversized_pdu(pdu, origin, room if isinstance(room, RoomPolicy) else None)
    if isinstance(room, StateUnavailable):
        return _unavailable(pdu.position, fail_open, pdu.room_id, origin)
    if room is None:
        # The homeserver does not know the room: no policy to apply, it decides itself.
        return ItemVerdict(pdu.position, Decision.ALLOW, room_id=pdu.room_id)
    refusals, by_author = _edge_refusals(pdu, origin, room, policy, servers_checked)
    if not refusals and pdu.sender_server != origin and not is_legitimate_relay(pdu):
        detail = f"event written by {pdu.sender_server} pushed by {origin}, which did not write it"
        refusals.append((Rule.LEAK_RELAYED, Severity.WARNING, Confidence.MEDIUM, detail))
    refusals += _reference_refusals(pdu, refused or {})
    refusals += by_author
    if not refusals:
        # Allowed PDUs need no event ID: the hook reaches the same verdict on its own.
        return ItemVerdict(pdu.position, Decision.ALLOW, room_id=pdu.room_id)
    event_id = event_id_of(pdu, room)

    def finding(
        rule: Rule,
        severity: Severity,
        detail: str,
        confidence: Confidence,
        attributed_to: str | None = origin,
    ) -> Finding:
        return pdu_finding(
            pdu,
            rule,
            severity,
            detail,
            event_id=event_id,
            origin=origin,
            attributed_to=attributed_to,
            confidence=confidence,
        )

    findings = [finding(rule, sev, detail, conf) for rule, sev, conf, detail in refusals]
    if event_id is None and room.room_version is None:
        version = room.room_version_id[:50]
        findings.append(
            finding(
                Rule.UNKNOWN_ROOM_VERSION,
                Severity.INFO,
                f"room version {version!r} is unknown to modgud; event ID not computed",
                Confidence.LOW,
                attributed_to=None,
            )
        )
    refuse = any(f.rule in REFUSING_RULES for f in findings)
    return ItemVerdict(
        pdu.position,
        Decision.REFUSE if refuse else Decision.ALLOW,
        tuple(findings),
        event_id,
        pdu.room_id,
    )


_EDU_RULES = {
    Barrier.ACL: Rule.ACL_EDU,
    Barrier.POLICY: Rule.POLICY_ORIGIN,
    Barrier.PARTICIPATION: Rule.PARTICIPATION_ORIGIN,
}


def check_edu(
    edu: Edu,
    origin: str,
    rooms: RoomLookup,
    *,
    fail_open: bool,
    policy: OperatorPolicy = NO_POLICY,
) -> ItemVerdict:
    """Check one EDU: users it names must be the origin's (spec: EDU types), and EDUs for
    a room (typing, receipts: MSC4163) are subject to the origin's authorisation there.
    An m.server.knock EDU is exempt from participation: it is how a server asks for it."""
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
    knocking = edu.edu_type in KNOCK_TYPES
    rooms_of_edu = edu_rooms(edu)
    refused_rooms: list[Finding] = []
    for room_id in rooms_of_edu:
        room = rooms.get(room_id)
        if isinstance(room, StateUnavailable):
            if not fail_open:
                return _unavailable(edu.position, fail_open, room_id, origin)
            continue
        if room is None:
            continue
        refusal = authorise_server(origin, room, policy, knocking=knocking)
        if refusal is not None:
            refused_rooms.append(
                Finding(
                    _EDU_RULES[refusal.barrier],
                    Severity.WARNING,
                    f"{edu.edu_type} EDU from {origin}: {refusal.reason}",
                    room_id=room_id,
                    event_type=edu.edu_type,
                    origin=origin,
                    attributed_to=origin,
                )
            )
    # An EDU cannot be cut: one about several rooms (a receipt EDU) is refused only when
    # every one of them refuses its origin, else its allowed rooms' part would be lost.
    # (The homeserver applies the ACL to each room's receipts itself, MSC4163.)
    refuse = bool(findings) or (bool(refused_rooms) and len(refused_rooms) == len(rooms_of_edu))
    if refused_rooms and not refuse:
        refused_rooms = [
            replace(f, detail=f"{f.detail} (passed on: the EDU is also about allowed rooms)")
            for f in refused_rooms
        ]
    return ItemVerdict(
        edu.position,
        Decision.REFUSE if refuse else Decision.ALLOW,
        tuple(findings + refused_rooms),
        room_id=next(iter(rooms_of_edu), None),
    )


def check_transaction(
    txn: Transaction,
    rooms: RoomLookup,
    *,
    fail_open: bool,
    policy: OperatorPolicy = NO_POLICY,
    refused: Mapping[str, Mapping[str, str]] | None = None,
) -> TransactionVerdict:
    """Check every item of a parsed transaction; the caller has checked `txn.error`.
    `refused`: per room, the events written by servers refused there (ID → author)."""
    refused = refused or {}
    origin = txn.origin or ""
    # A transaction's PDUs mostly share a room and an author: whether both servers may
    # take part is decided once per (room, author server) and transaction.
    # Only a PDU with nothing left to check per event takes the shortcut: no user bans to
    # match, no membership (restricted joins), not relayed, no refused events around.
    per_event_checks = bool(len(policy.bans))
    servers_ok: set[tuple[str, str]] = set()
    pdus: list[ItemVerdict] = []
    allow = Decision.ALLOW
    for pdu in txn.pdus:
        key = (pdu.room_id, pdu.sender_server)
        checked = key in servers_ok
        in_refused_room = pdu.room_id in refused
        if (
            checked
            and not per_event_checks
            and pdu.sender_server == origin
            and pdu.event_type != "m.room.member"
            and not in_refused_room
            and not pdu.oversized
        ):
            pdus.append(ItemVerdict(pdu.position, allow, (), None, pdu.room_id))
            continue
        item = check_pdu(
            pdu,
            origin,
            rooms,
            fail_open=fail_open,
            policy=policy,
            servers_checked=checked,
            refused=refused.get(pdu.room_id) if in_refused_room else None,
        )
        if not checked and not any(f.rule in _SERVER_RULES for f in item.findings):
            if not isinstance(rooms.get(pdu.room_id), StateUnavailable):
                servers_ok.add(key)
        pdus.append(item)
    pdus.extend(ItemVerdict(-1, Decision.REFUSE, (f,)) for f in txn.bad_pdus)
    edus = [check_edu(edu, origin, rooms, fail_open=fail_open, policy=policy) for edu in txn.edus]
    edus.extend(ItemVerdict(-1, Decision.REFUSE, (f,)) for f in txn.bad_edus)
    return TransactionVerdict(tuple(pdus), tuple(edus), txn.warnings)


def check_request_origin(
    origin: str,
    room_id: str,
    room: RoomPolicy | None | StateUnavailable,
    endpoint: str,
    *,
    fail_open: bool,
    policy: OperatorPolicy = NO_POLICY,
) -> ItemVerdict:
    """Room-data endpoints (make_join, send_join, state, backfill, …) MUST refuse a
    denied origin with 403 (spec: Server-Server API, "Server Access Control Lists");
    modgud refuses servers its policy lists ban and, where participation applies, servers
    not permitted, telling them to knock."""
    if isinstance(room, StateUnavailable):
        return _unavailable(0, fail_open, room_id, origin)
    refusal = authorise_server(origin, room, policy)
    if refusal is None:
        return ItemVerdict(0, Decision.ALLOW, room_id=room_id)
    finding = Finding(
        _ORIGIN_RULES[refusal.barrier],
        Severity.WARNING,
        f"{endpoint} from {origin}: {refusal.reason}",
        room_id=room_id,
        origin=origin,
        attributed_to=origin,
    )
    return ItemVerdict(0, Decision.REFUSE, (finding,), room_id=room_id)


def check_event(
    event: Mapping[str, object],
    room: RoomPolicy | None | StateUnavailable,
    local_server: str,
    *,
    fail_open: bool,
    policy: OperatorPolicy = NO_POLICY,
    pdu_bytes: int | None = None,
    signatures_known: bool = True,
) -> ItemVerdict:
    """The homeserver's question about one event, answered without knowing who delivered
    it — by the event hook and the Synapse module, for events of every path: pushed,
    pulled (/get_missing_events, /backfill, send_join) or local. Local events are allowed
    at once; a remote one is refused when it is over the PDU size limit or when
    `author_refusals` finds anything.

    `pdu_bytes`: the event's size as a PDU (canonical JSON without `unsigned`) when the
    caller knows it, or a lower bound of it. `signatures_known=False`: the event came
    without its signatures (the hook's client format)."""
    sender = event.get("sender")
    event_id = event.get("event_id")
    room_id = event.get("room_id")
    eid = event_id if isinstance(event_id, str) else None
    rid = room_id if isinstance(room_id, str) else None
    server = server_of_user(sender)
    if server is None or not isinstance(sender, str):
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
    event_type = event.get("type")
    kind = event_type if isinstance(event_type, str) else None
    if pdu_bytes is not None and pdu_bytes > MAX_PDU_BYTES:
        finding = Finding(
            Rule.MALFORMED_PDU,
            Severity.WARNING,
            f"event is {pdu_bytes} bytes, over the {MAX_PDU_BYTES}-byte PDU limit",
            room_id=rid,
            event_id=eid,
            event_type=kind,
            sender=sender,
            sender_server=server,
        )
        return ItemVerdict(0, Decision.REFUSE, (finding,), eid, rid)
    if isinstance(room, StateUnavailable):
        return _unavailable(0, fail_open, rid or "", server, eid)
    reasons = author_refusals(
        sender,
        server,
        event_type,
        event.get("state_key"),
        event if event_type == "m.room.member" else None,
        room,
        policy,
        in_homeserver=True,
        signatures_known=signatures_known,
    )
    if not reasons:
        return ItemVerdict(0, Decision.ALLOW, event_id=eid, room_id=rid)
    findings = tuple(
        Finding(
            rule,
            Severity.HIGH,
            f"event written by {server}: {detail}" if rule in _SENDER_RULES.values() else detail,
            room_id=rid,
            event_id=eid,
            event_type=kind,
            sender=sender,
            sender_server=server,
            confidence=Confidence.LOW,
        )
        for rule, detail in reasons
    )
    return ItemVerdict(0, Decision.REFUSE, findings, eid, rid)


def judge_event(
    event: Mapping[str, object],
    room: RoomPolicy | None | StateUnavailable,
    local_server: str,
    *,
    fail_open: bool,
    policy: OperatorPolicy = NO_POLICY,
    pdu_bytes: int | None = None,
    signatures_known: bool = True,
) -> ItemVerdict:
    """check_event with the operator's per-check actions applied: the one decision the
    event hook and the Synapse module make for the homeserver, so their answers cannot
    drift apart."""
    return apply_actions(
        check_event(
            event,
            room,
            local_server,
            fail_open=fail_open,
            policy=policy,
            pdu_bytes=pdu_bytes,
            signatures_known=signatures_known,
        ),
        policy,
    )


# Room for the spelling differences canonical_json_size allows below its exact range.
_SIZE_MARGIN = 4096


def pdu_bytes(
    event: Mapping[str, object], *, without: tuple[str, ...] = ("unsigned",)
) -> int | None:
    """The size of `event` as canonical JSON, leaving out the fields `without` (a PDU's
    size does not count `unsigned`): exact from a little below MAX_PDU_BYTES on, where it
    decides, and there None when it is not encodable; below, as canonical_json_size
    measures it (exact for JSON-decoded data)."""
    if any(k in event for k in without):
        event = {k: v for k, v in event.items() if k not in without}
    try:
        return canonical_json_size(event, exact_from=MAX_PDU_BYTES - _SIZE_MARGIN)
    except (ValueError, TypeError, RecursionError):
        return None


def check_invite(
    inviter: str,
    invitee: str,
    room: RoomPolicy | None | StateUnavailable,
    room_id: str,
    *,
    fail_open: bool,
    policy: OperatorPolicy = NO_POLICY,
) -> ItemVerdict:
    """A local user inviting `invitee` (synapse-http-antispam's user_may_invite): refused
    when the invitee's server may not take part in the room — the invite would hand the
    room to a server the room, a policy list or the room's participation keeps out."""
    server = server_of_user(invitee)
    if server is None:
        return ItemVerdict(0, Decision.ALLOW, room_id=room_id)
    if isinstance(room, StateUnavailable):
        return _unavailable(0, fail_open, room_id, server)
    refusal = authorise_server(server, room, policy)
    if refusal is None:
        return ItemVerdict(0, Decision.ALLOW, room_id=room_id)
    finding = Finding(
        _SENDER_RULES[refusal.barrier],
        Severity.WARNING,
        f"{inviter} invited {invitee}: {refusal.reason}",
        room_id=room_id,
        event_type="m.room.member",
        sender=inviter,
        sender_server=server,
        confidence=Confidence.HIGH,
    )
    return ItemVerdict(0, Decision.REFUSE, (finding,), room_id=room_id)


def with_signature_check(
    item: ItemVerdict, pdu: Pdu, origin: str, check: SignatureCheck
) -> ItemVerdict:
    """Fold a PDU's signature check into its verdict.

    A signature that does not verify refuses the PDU (Synapse drops such events too). A
    verified author signature makes an ACL_SENDER finding high-confidence: the denied
    server really wrote the event. Missing keys leave the verdict as it was.
    """
    if check.ok:
        if not item.findings or pdu.sender_server not in check.verified_servers:
            return item
        findings = tuple(
            replace(f, confidence=Confidence.HIGH)
            if f.rule in _SENDER_RULES.values() or f.rule is Rule.LEAK_RELAYED
            else f
            for f in item.findings
        )
        return item._replace(findings=findings)
    if check.missing_keys:
        return item
    finding = pdu_finding(
        pdu,
        Rule.BAD_EVENT_SIGNATURE,
        Severity.HIGH,
        f"event signature does not verify: {check.reason or 'invalid'}",
        event_id=item.event_id,
        origin=origin,
        attributed_to=origin,
        confidence=Confidence.MEDIUM,
    )
    return item._replace(decision=Decision.REFUSE, findings=(*item.findings, finding))
