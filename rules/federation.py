"""Federation transactions, PDUs and EDUs as modgud sees them on the wire.

Spec: Server-Server API, "Transactions" (PUT /_matrix/federation/v1/send/{txnId}) and
"PDUs"/"EDUs". Parsing never raises: a malformed transaction or item becomes a Finding.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field

import msgspec

from rules.canonical import encode_canonical_json
from rules.eventhash import compute_room_id_v12
from rules.findings import Finding, Rule, Severity
from rules.servername import parse_server_name, server_of_user

__all__ = [
    "MAX_EDUS",
    "MAX_PDUS",
    "MAX_PDU_BYTES",
    "Edu",
    "Pdu",
    "Transaction",
    "edu_rooms",
    "edu_users",
    "parse_json_body",
    "parse_pdu",
    "parse_transaction",
]

# Spec: Server-Server API, "Transactions": at most 50 PDUs and 100 EDUs;
# "PDUs": an event is at most 65,536 bytes as canonical JSON.
MAX_PDUS = 50
MAX_EDUS = 100
MAX_PDU_BYTES = 65_536


class Pdu:
    """A PDU of a transaction with the fields checks need. Immutable by convention.

    `event` is the whole event as a dict. On the fast path it is decoded from the PDU's own
    bytes on first use: most PDUs of a busy transaction are decided on room, sender and type
    alone and never need it. Not decoding them is what keeps modgud near plain mitmproxy's
    throughput: 50 decoded PDUs are ~1,500 fresh containers per transaction, and the cyclic
    garbage collector's passes over them cost more than the decoding itself.
    """

    __slots__ = (
        "_event",
        "_raw",
        "_source",
        "content_hash",
        "event_type",
        "oversized",
        "position",
        "room_id",
        "sender",
        "sender_server",
        "state_key",
    )

    def __init__(
        self,
        position: int,
        event: Mapping[str, object] | None,
        room_id: str,
        sender: str,
        sender_server: str,
        event_type: str,
        state_key: str | None,
        raw: bytes | None = None,
        content_hash: str | None = None,
        source: TransactionBytes | None = None,
    ) -> None:
        self.position = position  # where the PDU sits in the transaction
        # The sender's claimed content hash (hashes.sha256): the event's identity for the
        # event index, read without computing the event ID.
        self.content_hash = content_hash
        self._event = event
        self._raw = raw
        self._source = source  # the transaction's bytes, cut into PDUs on first use
        self.room_id = room_id
        self.sender = sender
        self.sender_server = sender_server
        self.event_type = event_type
        self.state_key = state_key
        # Its canonical JSON's size when over MAX_PDU_BYTES, else 0. An oversized PDU is
        # kept as a PDU, not only as a finding: the checks refuse it by its event ID, so
        # the homeserver's judges (the hook, the Synapse module) refuse it too.
        self.oversized = 0

    @property
    def event(self) -> Mapping[str, object]:
        if self._event is None:
            raw = self._raw
            if raw is None and self._source is not None:
                raw = self._source.pdu(self.position)
            self._event = _decode_event(raw or b"{}")
        return self._event

    def __repr__(self) -> str:
        return f"Pdu({self.position}, {self.room_id!r}, {self.sender!r}, {self.event_type!r})"


class TransactionBytes:
    """A /send body that has been decoded for its PDUs' fields only. The bytes of a PDU
    are cut out of it when a check first needs the whole event (one decode for the whole
    transaction, then shared): most transactions never need any."""

    __slots__ = ("_body", "_pdus")

    def __init__(self, body: bytes) -> None:
        self._body = body
        self._pdus: list[msgspec.Raw] | None = None

    def pdu(self, position: int) -> bytes:
        if self._pdus is None:
            try:
                self._pdus = _TXN_DECODER.decode(self._body).pdus
            except (msgspec.DecodeError, UnicodeDecodeError, RecursionError):
                self._pdus = []  # cannot happen: the same body decoded a moment ago
        return bytes(self._pdus[position]) if position < len(self._pdus) else b"{}"


@dataclass(frozen=True, slots=True)
class Edu:
    position: int
    edu_type: str
    content: Mapping[str, object]


@dataclass(frozen=True, slots=True)
class Transaction:
    """A parsed /send body. `error` set means the body as a whole is unusable."""

    txn_id: str
    origin: str | None
    pdus: tuple[Pdu, ...] = ()
    edus: tuple[Edu, ...] = ()
    # Items that could not be parsed, with the finding that says why.
    bad_pdus: tuple[Finding, ...] = ()
    bad_edus: tuple[Finding, ...] = ()
    error: Finding | None = None
    warnings: tuple[Finding, ...] = field(default=())


def _reject_constant(name: str) -> object:
    raise ValueError(f"{name} is not JSON")


_DECODER = msgspec.json.Decoder()


def parse_json_body(body: bytes) -> tuple[object, str | None]:
    """Decode a JSON body; (value, None) or (None, reason). Never raises.

    msgspec decodes the common case about twice as fast as the stdlib and gives the same
    values; whatever it refuses (NaN, lone surrogates, …) is decided by the stdlib, the
    homeserver's own decoder, so the two accept and refuse exactly the same bodies.
    """
    try:
        return _DECODER.decode(body), None
    except (msgspec.DecodeError, UnicodeDecodeError, RecursionError):
        pass  # msgspec raises UnicodeDecodeError for invalid UTF-8 inside a string
    return _parse_json_stdlib(body)


def _parse_json_stdlib(body: bytes) -> tuple[object, str | None]:
    try:
        return json.loads(body, parse_constant=_reject_constant), None
    except RecursionError:
        return None, "JSON nested too deeply"
    except UnicodeDecodeError:
        return None, "body is not UTF-8"
    except ValueError as e:  # JSONDecodeError, and int digit limits
        return None, f"body is not valid JSON: {str(e)[:80]}"


def _decode_event(raw: bytes) -> Mapping[str, object]:
    """A PDU's bytes (found well-formed by the fast path) as a dict, decoded as the
    homeserver decodes them. Should the decoders ever disagree (their nesting limits can
    differ by a frame or two), the event is empty: its hashes and signatures then fail."""
    value, reason = parse_json_body(raw)
    return value if reason is None and isinstance(value, dict) else {}


class _WirePdu(msgspec.Struct, gc=False):
    """The fields of a PDU the checks need; the rest is skipped over, not decoded."""

    room_id: object = None
    sender: object = None
    type: object = None
    state_key: object = None
    hashes: object = None


class _WireTransaction(msgspec.Struct, gc=False):
    origin: object = None
    pdus: list[msgspec.Raw] = []
    edus: list[object] = []


class _WireTransactionFields(msgspec.Struct, gc=False):
    origin: object = None
    pdus: list[_WirePdu] = []
    edus: list[object] = []


_TXN_DECODER = msgspec.json.Decoder(_WireTransaction)
_PDU_DECODER = msgspec.json.Decoder(_WirePdu)
_TXN_FIELDS_DECODER = msgspec.json.Decoder(_WireTransactionFields)
# Skipping over a field, msgspec checks neither UTF-8 nor the stdlib's 4,300-digit limit
# on integers; these two cheap scans send such bodies to the stdlib path instead.
_DIGIT_RUNS = bytes(0x39 if 0x30 <= b <= 0x39 else 0x20 for b in range(256))
_MAX_DIGITS = 4300
_TOO_MANY_DIGITS = b"9" * (_MAX_DIGITS + 1)


def _has_too_many_digits(body: bytes) -> bool:
    """Whether `body` holds a run of more than 4,300 digits. Such a run covers one of the
    positions 4300, 8601, 12902, … (every 4,301st byte), and 4,301 of its digits lie
    within 4,300 bytes either side of it: only the windows around the positions that hold
    a digit are scanned, not the whole body."""
    run = _MAX_DIGITS + 1
    for i in range(_MAX_DIGITS, len(body), run):
        if 0x30 <= body[i] <= 0x39:
            window = body[max(0, i - _MAX_DIGITS) : i + run]
            if _TOO_MANY_DIGITS in window.translate(_DIGIT_RUNS):
                return True
    return False


def _malformed(
    rule: Rule,
    detail: str,
    origin: str | None,
    room_id: str | None = None,
    sender: str | None = None,
) -> Finding:
    return Finding(
        rule,
        Severity.WARNING,
        detail,
        room_id=room_id,
        sender=sender,
        origin=origin,
        attributed_to=origin,
    )


def parse_pdu(
    raw: object,
    position: int,
    origin: str | None,
    *,
    check_size: bool = True,
    servers: dict[str, bool] | None = None,
) -> Pdu | Finding:
    """Check a decoded PDU's shape and size; a Finding when it is malformed.

    `servers` memoises the server-name check across one transaction's PDUs.
    `check_size=False` skips the size check when the caller knows the PDU's JSON is no
    longer than the limit (canonical JSON is never longer than the JSON it came from,
    floats aside, which no valid event holds).
    """
    if not isinstance(raw, dict):
        return _malformed(Rule.MALFORMED_PDU, f"PDU {position} is not a JSON object", origin)
    fields = (raw.get("room_id"), raw.get("sender"), raw.get("type"), raw.get("state_key"))
    return _make_pdu(position, fields, raw, None, origin, check_size, servers, raw.get("hashes"))


def _make_pdu(
    position: int,
    fields: tuple[object, object, object, object],
    event: Mapping[str, object] | None,
    raw: bytes | None,
    origin: str | None,
    check_size: bool,
    servers: dict[str, bool] | None,
    hashes: object = None,
    source: TransactionBytes | None = None,
) -> Pdu | Finding:
    room_id, sender, event_type, state_key = fields
    if room_id is None and event_type == "m.room.create":
        # Room v12: the create event has no room_id; the room ID is derived from its hash.
        if event is None:
            if raw is None and source is not None:
                raw = source.pdu(position)
            event = _decode_event(raw or b"{}")
        try:
            room_id = compute_room_id_v12(event)
        except (ValueError, TypeError, RecursionError):
            room_id = None
    if not (
        isinstance(room_id, str)
        and isinstance(sender, str)
        and isinstance(event_type, str)
        and (state_key is None or isinstance(state_key, str))
    ):
        return _mistyped(position, fields, origin)
    if servers is None:
        sender_server = server_of_user(sender)
    else:
        # Validate each distinct server name once per transaction, not once per sender.
        server = sender.partition(":")[2]
        valid = servers.get(server)
        if valid is None:
            valid = servers[server] = parse_server_name(server) is not None
        sender_server = server if valid and sender.startswith("@") else None
    if sender_server is None:
        return _malformed(
            Rule.MALFORMED_PDU, f"PDU {position} has an invalid sender", origin, room_id=room_id
        )
    sha256 = hashes.get("sha256") if isinstance(hashes, dict) else None
    pdu = Pdu(
        position,
        event,
        room_id,
        sender,
        sender_server,
        event_type,
        state_key,
        raw,
        sha256 if isinstance(sha256, str) and len(sha256) < 100 else None,
        source,
    )
    if not check_size:
        return pdu
    try:
        size = len(encode_canonical_json(pdu.event))
    except (ValueError, TypeError, RecursionError):
        return _malformed(
            Rule.MALFORMED_PDU, f"PDU {position} is not encodable as canonical JSON", origin
        )
    if size > MAX_PDU_BYTES:
        pdu.oversized = size
    return pdu


def _mistyped(
    position: int, fields: tuple[object, object, object, object], origin: str | None
) -> Finding:
    room_id, sender, event_type, state_key = fields
    problems = [
        name
        for name, value in (("room_id", room_id), ("sender", sender), ("type", event_type))
        if not isinstance(value, str)
    ]
    if state_key is not None and not isinstance(state_key, str):
        problems.append("state_key")
    return _malformed(
        Rule.MALFORMED_PDU, f"PDU {position} lacks or mistypes: {', '.join(problems)}", origin
    )


def _parse_fast(body: bytes, txn_id: str, origin: str | None) -> Transaction | None:
    """The common case: msgspec decodes only the fields the checks need and keeps each PDU
    as bytes. None hands the body to the stdlib path, which decides anything unusual
    (wrong types, a PDU that is not an object, NaN, …), so both paths accept and refuse
    exactly the same bodies (tests/rules/test_federation.py checks this with hypothesis)."""
    try:
        body.decode("utf-8")
        if _has_too_many_digits(body):
            return None
        # Up to the PDU size limit, no PDU can be over it: one decode reads every PDU's
        # fields, and a PDU's bytes are cut out only if a check needs the whole event.
        # Longer bodies are cut into PDUs, each measured in its own bytes.
        small = len(body) <= MAX_PDU_BYTES
        wire = (_TXN_FIELDS_DECODER if small else _TXN_DECODER).decode(body)
        if len(wire.pdus) > MAX_PDUS or len(wire.edus) > MAX_EDUS:
            return None
        fields_of: list[_WirePdu]
        raws: list[bytes | None]
        source: TransactionBytes | None = None
        if isinstance(wire, _WireTransactionFields):
            fields_of, raws = wire.pdus, [None] * len(wire.pdus)
            source = TransactionBytes(body)
        else:
            fields_of = [_PDU_DECODER.decode(raw) for raw in wire.pdus]
            raws = [bytes(raw) for raw in wire.pdus]
    except (msgspec.DecodeError, UnicodeDecodeError, RecursionError):
        return None
    servers: dict[str, bool] = {}
    parsed: list[Pdu | Finding] = []
    for position, (f, raw) in enumerate(zip(fields_of, raws, strict=True)):
        fields = (f.room_id, f.sender, f.type, f.state_key)
        check_size = raw is not None and len(raw) > MAX_PDU_BYTES
        parsed.append(
            _make_pdu(position, fields, None, raw, origin, check_size, servers, f.hashes, source)
        )
    return _transaction(txn_id, origin, wire.origin, parsed, wire.edus)


def _transaction(
    txn_id: str,
    origin: str | None,
    body_origin: object,
    parsed: list[Pdu | Finding],
    edus_raw: list[object],
) -> Transaction:
    pdus = tuple(p for p in parsed if isinstance(p, Pdu))
    bad_pdus = tuple(p for p in parsed if isinstance(p, Finding))
    edus: list[Edu] = []
    bad_edus: list[Finding] = []
    for position, raw in enumerate(edus_raw):
        if isinstance(raw, dict):
            edu_type = raw.get("edu_type")
            content = raw.get("content")
            if isinstance(edu_type, str) and isinstance(content, dict):
                edus.append(Edu(position, edu_type, content))
                continue
        bad_edus.append(
            _malformed(Rule.MALFORMED_EDU, f"EDU {position} lacks edu_type or content", origin)
        )
    warnings: tuple[Finding, ...] = ()
    if origin is not None and body_origin != origin:
        detail = f"body origin {str(body_origin)[:100]!r} differs from the X-Matrix origin"
        warnings = (_malformed(Rule.MALFORMED_REQUEST, detail, origin),)
    return Transaction(txn_id, origin, pdus, tuple(edus), bad_pdus, tuple(bad_edus), None, warnings)


def parse_transaction(
    body: bytes, txn_id: str, origin: str | None, *, decoded: object = None
) -> Transaction:
    """Parse a /send body; `origin` is the authenticated (X-Matrix) origin, if known.

    `decoded` is the whole body as parse_json_body gave it, when the caller has it (to
    check the request's signature): the transaction is read from it, or for a body over
    the PDU size limit (whose PDUs are measured in their bytes) the PDUs' events are
    taken from it, not decoded again one by one."""
    if isinstance(decoded, dict) and len(body) <= MAX_PDU_BYTES:
        # Decoded as the homeserver decodes it: the reference path, without decoding.
        return _from_decoded(decoded, len(body), txn_id, origin)
    fast = _parse_fast(body, txn_id, origin)
    if fast is None:
        return _parse_stdlib(body, txn_id, origin)
    if isinstance(decoded, dict):
        events = decoded.get("pdus")
        if isinstance(events, list) and len(events) == len(fast.pdus) + len(fast.bad_pdus):
            for pdu in fast.pdus:
                event = events[pdu.position]
                if isinstance(event, dict) and pdu._event is None:
                    pdu._event = event
    return fast


def _parse_stdlib(body: bytes, txn_id: str, origin: str | None) -> Transaction:
    """The reference path: the whole body decoded as the homeserver decodes it."""
    data, reason = _parse_json_stdlib(body)
    if reason is not None:
        return Transaction(txn_id, origin, error=_malformed(Rule.MALFORMED_REQUEST, reason, origin))
    return _from_decoded(data, len(body), txn_id, origin)


def _from_decoded(data: object, size: int, txn_id: str, origin: str | None) -> Transaction:
    """A transaction from its decoded body (`size` bytes long)."""
    if not isinstance(data, dict):
        return Transaction(
            txn_id,
            origin,
            error=_malformed(Rule.MALFORMED_REQUEST, "transaction is not a JSON object", origin),
        )
    pdus_raw = data.get("pdus", [])
    edus_raw = data.get("edus", [])
    if not isinstance(pdus_raw, list) or not isinstance(edus_raw, list):
        return Transaction(
            txn_id,
            origin,
            error=_malformed(Rule.MALFORMED_REQUEST, "pdus and edus must be lists", origin),
        )
    if len(pdus_raw) > MAX_PDUS or len(edus_raw) > MAX_EDUS:
        detail = (
            f"transaction has {len(pdus_raw)} PDUs and {len(edus_raw)} EDUs; "
            f"the limits are {MAX_PDUS} and {MAX_EDUS}"
        )
        return Transaction(txn_id, origin, error=_malformed(Rule.MALFORMED_REQUEST, detail, origin))
    check_size = size > MAX_PDU_BYTES
    servers: dict[str, bool] = {}
    parsed = [
        parse_pdu(raw, position, origin, check_size=check_size, servers=servers)
        for position, raw in enumerate(pdus_raw)
    ]
    return _transaction(txn_id, origin, data.get("origin"), parsed, edus_raw)


def edu_users(edu: Edu) -> list[object]:
    """The user IDs an EDU speaks for (spec: Server-Server API, EDU types)."""
    c = edu.content
    t = edu.edu_type
    if t in ("m.typing", "m.device_list_update", "m.signing_key_update"):
        return [c.get("user_id")]
    if t == "m.direct_to_device":
        return [c.get("sender")]
    if t == "m.presence":
        push = c.get("push")
        if not isinstance(push, list):
            return [None]
        return [p.get("user_id") if isinstance(p, dict) else None for p in push]
    if t == "m.receipt":
        users: list[object] = []
        for room in c.values():
            if not isinstance(room, dict):
                users.append(None)
                continue
            for receipts in room.values():
                if not isinstance(receipts, dict):
                    users.append(None)
                    continue
                users.extend(receipts.keys())
        return users
    return []


def edu_rooms(edu: Edu) -> list[str]:
    """Rooms an EDU is about: typing and receipts (the ACL applies to them, MSC4163) and
    a server's knock (MSC4124's m.server.knock EDU, `{room_id}`)."""
    if edu.edu_type in ("m.typing", "m.server.knock", "me.marewolf.msc4124.server.knock"):
        room_id = edu.content.get("room_id")
        return [room_id] if isinstance(room_id, str) else []
    if edu.edu_type == "m.receipt":
        return [r for r in edu.content if isinstance(r, str)]
    return []
