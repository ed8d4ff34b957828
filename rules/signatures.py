"""Event signatures (spec: Server-Server API, "Signing Events", "Validating hashes and
signatures on received events"; Appendices, "Signing JSON"). Required signers follow
Synapse's `_check_sigs_on_pdu`."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from nacl.exceptions import BadSignatureError
from signedjson.sign import sign_json
from unpaddedbase64 import decode_base64

from rules.canonical import encode_canonical_json
from rules.eventhash import compute_content_hash, encode_unpadded_base64
from rules.redaction import redact_event
from rules.roomversion import EventFormat, RoomVersion
from rules.servername import parse_server_name

__all__ = [
    "KeyLookup",
    "ServerKey",
    "SignatureCheck",
    "required_signers",
    "sign_event",
    "signing_bytes",
    "verify_event_signatures",
]


@dataclass(frozen=True, slots=True)
class ServerKey:
    """A server's verify key. `valid_until_ts` None means unknown: such a key is accepted
    for room versions without key-validity enforcement only."""

    server_name: str
    key_id: str
    verify_key: Any  # signedjson / nacl VerifyKey
    valid_until_ts: int | None


class KeyLookup(Protocol):
    def __call__(self, server_name: str, key_id: str) -> ServerKey | None: ...


@dataclass(frozen=True, slots=True)
class SignatureCheck:
    ok: bool
    missing_keys: tuple[tuple[str, str], ...] = ()
    reason: str | None = None
    verified_servers: frozenset[str] = frozenset()


def _domain(identifier: object, sigil: str) -> str | None:
    if not isinstance(identifier, str) or not identifier.startswith(sigil):
        return None
    _, sep, domain = identifier.partition(":")
    return domain if sep and parse_server_name(domain) is not None else None


def required_signers(event: Mapping[str, object], room_version: RoomVersion) -> frozenset[str]:
    """Servers whose signature the event must carry. Empty when the sender is malformed
    (the caller treats that as a failure)."""
    sender = _domain(event.get("sender"), "@")
    if sender is None:
        return frozenset()
    content = event.get("content")
    content = content if isinstance(content, Mapping) else {}
    servers: set[str] = set()
    # A member event made from a 3pid invite is exempt from the sender's signature
    # (Synapse: _check_sigs_on_pdu); everything else needs it.
    if not (event.get("type") == "m.room.member" and content.get("third_party_invite") is not None):
        servers.add(sender)
    if room_version.event_format is EventFormat.V1:
        event_domain = _domain(event.get("event_id"), "$")
        if event_domain is not None:
            servers.add(event_domain)
    if (
        room_version.restricted_join_rule
        and event.get("type") == "m.room.member"
        and content.get("membership") == "join"
        and "join_authorised_via_users_server" in content
    ):
        authoriser = _domain(content.get("join_authorised_via_users_server"), "@")
        if authoriser is not None:
            servers.add(authoriser)
    return frozenset(servers)


def signing_bytes(event: Mapping[str, object], room_version: RoomVersion) -> bytes | None:
    """What an event's signatures sign, and what its reference hash hashes: the canonical
    JSON of the redacted event without `signatures` and `unsigned`. None when the event
    cannot be redacted or encoded."""
    try:
        redacted = redact_event(event, room_version)
        redacted.pop("signatures", None)
        redacted.pop("unsigned", None)
        return encode_canonical_json(redacted)
    except (TypeError, ValueError, RecursionError):
        return None


def verify_event_signatures(
    event: Mapping[str, object],
    room_version: RoomVersion,
    keys: KeyLookup,
    *,
    now_ts: int | None = None,
    signed: bytes | None = None,
    signers: frozenset[str] | None = None,
) -> SignatureCheck:
    """Verify every required signature over the redacted event. Never raises.

    Any one valid ed25519 key of a server suffices. From v5 a key's validity must cover
    the event's origin_server_ts. `signed` and `signers` are the event's signing_bytes
    and required_signers when the caller has them already. `now_ts` is unused for now
    (kept for key freshness).
    """
    if signers is None:
        signers = required_signers(event, room_version)
    if not signers:
        return SignatureCheck(False, reason="no valid sender")
    signatures = event.get("signatures")
    if not isinstance(signatures, Mapping):
        return SignatureCheck(False, reason="no signatures")
    if signed is None:
        signed = signing_bytes(event, room_version)
    if signed is None:
        return SignatureCheck(False, reason="event cannot be redacted")
    ts = event.get("origin_server_ts")
    ts = ts if isinstance(ts, int) else 0
    missing: list[tuple[str, str]] = []
    verified: set[str] = set()
    for server in sorted(signers):
        server_sigs = signatures.get(server)
        if not isinstance(server_sigs, Mapping):
            return SignatureCheck(
                False, reason=f"not signed by {server}", verified_servers=frozenset(verified)
            )
        key_ids = [k for k in server_sigs if isinstance(k, str) and k.startswith("ed25519:")]
        if not key_ids:
            return SignatureCheck(False, reason=f"no ed25519 signature from {server}")
        server_missing: list[tuple[str, str]] = []
        failure: str | None = None
        for key_id in key_ids:
            key = keys(server, key_id)
            if key is None:
                server_missing.append((server, key_id))
                continue
            if room_version.enforce_key_validity and (key.valid_until_ts or 0) < ts:
                failure = f"key {key_id} of {server} was not valid at origin_server_ts"
                continue
            try:
                key.verify_key.verify(signed, decode_base64(str(server_sigs[key_id])))
            except (BadSignatureError, ValueError, TypeError):
                failure = f"bad signature from {server}"
                continue
            verified.add(server)
            break
        else:
            if server_missing and failure is None:
                missing.extend(server_missing)
                continue
            return SignatureCheck(
                False,
                reason=failure or f"not signed by {server}",
                verified_servers=frozenset(verified),
            )
    if missing:
        return SignatureCheck(False, tuple(missing), "keys unavailable", frozenset(verified))
    return SignatureCheck(True, verified_servers=frozenset(verified))


def sign_event(
    event: Mapping[str, object], room_version: RoomVersion, server_name: str, signing_key: Any
) -> dict[str, object]:
    """Add the content hash, then sign the redacted event (spec: "Signing Events")."""
    out = dict(event)
    out["hashes"] = {"sha256": encode_unpadded_base64(compute_content_hash(out))}
    redacted = redact_event(out, room_version)
    redacted.pop("unsigned", None)
    signed = sign_json(redacted, server_name, signing_key)
    out["signatures"] = signed["signatures"]
    return out
