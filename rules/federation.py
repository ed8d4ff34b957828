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


@dataclass(slots=True)  # not frozen: a frozen __init__ costs 3x, and there are 50 per txn
class Pdu:
    """A PDU of a transaction with the fields checks need; `event` is the raw dict.
    Treat as immutable."""

    index: int
    event: Mapping[str, object]
    room_id: str
    sender: str
    sender_server: str
    event_type: str
    state_key: str | None


@dataclass(frozen=True, slots=True)
class Edu:
    index: int
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
    except (msgspec.DecodeError, RecursionError):
        pass
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
    index: int,
    origin: str | None,
    *,
    check_size: bool = True,
    servers: dict[str, bool] | None = None,
) -> Pdu | Finding:
    """Check a PDU's shape and size; a Finding when it is malformed.

    `servers` memoises the server-name check across one transaction's PDUs.
    `check_size=False` skips the size check when the caller knows the PDU came from a body
    no bigger than the limit (canonical JSON is never longer than the JSON it came from, floats aside, which no
    valid event holds).
    """
    if not isinstance(raw, dict):
        return _malformed(Rule.MALFORMED_PDU, f"PDU {index} is not a JSON object", origin)
    room_id = raw.get("room_id")
    sender = raw.get("sender")
    event_type = raw.get("type")
    state_key = raw.get("state_key")
    if event_type == "m.room.create" and room_id is None:
        # Room v12: the create event has no room_id; the room ID is derived from its hash.
        try:
            room_id = compute_room_id_v12(raw)
        except (ValueError, TypeError, RecursionError):
            room_id = None
    problems = []
    if not isinstance(room_id, str):
        problems.append("room_id")
    if not isinstance(sender, str):
        problems.append("sender")
    if not isinstance(event_type, str):
        problems.append("type")
    if state_key is not None and not isinstance(state_key, str):
        problems.append("state_key")
    if problems:
        return _malformed(
            Rule.MALFORMED_PDU, f"PDU {index} lacks or mistypes: {', '.join(problems)}", origin
        )
    assert isinstance(room_id, str) and isinstance(sender, str) and isinstance(event_type, str)
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
            Rule.MALFORMED_PDU, f"PDU {index} has an invalid sender", origin, room_id=room_id
        )
    if not check_size:
        return Pdu(index, raw, room_id, sender, sender_server, event_type, state_key)
    try:
        size = len(encode_canonical_json(raw))
    except (ValueError, TypeError, RecursionError):
        return _malformed(
            Rule.MALFORMED_PDU, f"PDU {index} is not encodable as canonical JSON", origin
        )
    if size > MAX_PDU_BYTES:
        return _malformed(
            Rule.MALFORMED_PDU,
            f"PDU {index} is {size} bytes, over the {MAX_PDU_BYTES}-byte limit",
            origin,
            room_id=room_id,
            sender=sender,
        )
    return Pdu(index, raw, room_id, sender, sender_server, event_type, state_key)


def parse_transaction(body: bytes, txn_id: str, origin: str | None) -> Transaction:
    """Parse a /send body; `origin` is the authenticated (X-Matrix) origin, if known."""
    data, reason = parse_json_body(body)
    if reason is not None:
        return Transaction(txn_id, origin, error=_malformed(Rule.MALFORMED_REQUEST, reason, origin))
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
    warnings: list[Finding] = []
    body_origin = data.get("origin")
    if origin is not None and body_origin != origin:
        warnings.append(
            _malformed(
                Rule.MALFORMED_REQUEST,
                f"body origin {str(body_origin)[:100]!r} differs from the X-Matrix origin",
                origin,
            )
        )
    pdus: list[Pdu] = []
    bad_pdus: list[Finding] = []
    check_size = len(body) > MAX_PDU_BYTES
    servers: dict[str, bool] = {}
    for index, raw in enumerate(pdus_raw):
        parsed = parse_pdu(raw, index, origin, check_size=check_size, servers=servers)
        if isinstance(parsed, Pdu):
            pdus.append(parsed)
        else:
            bad_pdus.append(parsed)
    edus: list[Edu] = []
    bad_edus: list[Finding] = []
    for index, raw in enumerate(edus_raw):
        if (
            isinstance(raw, dict)
            and isinstance(raw.get("edu_type"), str)
            and isinstance(raw.get("content"), dict)
        ):
            edus.append(Edu(index, raw["edu_type"], raw["content"]))
        else:
            bad_edus.append(
                _malformed(Rule.MALFORMED_EDU, f"EDU {index} lacks edu_type or content", origin)
            )
    return Transaction(
        txn_id,
        origin,
        tuple(pdus),
        tuple(edus),
        tuple(bad_pdus),
        tuple(bad_edus),
        None,
        tuple(warnings),
    )


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
    """Rooms an EDU is about, for the ACL check on EDUs (MSC4163): typing and receipts."""
    if edu.edu_type == "m.typing":
        room_id = edu.content.get("room_id")
        return [room_id] if isinstance(room_id, str) else []
    if edu.edu_type == "m.receipt":
        return [r for r in edu.content if isinstance(r, str)]
    return []
