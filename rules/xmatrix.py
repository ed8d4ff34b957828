"""X-Matrix request authentication (spec: Server-Server API, "Request Authentication").

    Authorization: X-Matrix origin="a.org",destination="b.org",key="ed25519:1",sig="…"

Parsing follows Synapse's `_parse_auth_header`: parameters split at commas, names
case-insensitive, values quoted (with backslash escapes) or bare.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from nacl.exceptions import BadSignatureError
from signedjson.sign import sign_json
from unpaddedbase64 import decode_base64

from rules.canonical import encode_canonical_json
from rules.servername import parse_server_name

__all__ = [
    "XMatrixAuth",
    "parse_xmatrix",
    "request_signing_bytes",
    "sign_request",
    "verify_request_signature",
]

_SCHEME = re.compile(r"^X-Matrix +", re.IGNORECASE)
_SPLIT = re.compile(r"[ \t]*,[ \t]*")
_ESCAPE = re.compile(r"\\(.)")
MAX_HEADER = 8192


@dataclass(frozen=True, slots=True)
class XMatrixAuth:
    origin: str
    destination: str | None
    key_id: str
    signature: str


def _unquote(value: str) -> str:
    if value.startswith('"'):
        if len(value) < 2 or not value.endswith('"'):
            raise ValueError("unterminated quote")
        inner = value[1:-1]
        return _ESCAPE.sub(lambda m: m.group(1), inner) if "\\" in inner else inner
    return value


def parse_xmatrix(header_value: str) -> XMatrixAuth | None:
    """Parse one Authorization header value; None when it is not valid X-Matrix."""
    if not isinstance(header_value, str) or len(header_value) > MAX_HEADER:
        return None
    scheme = _SCHEME.match(header_value)
    if not scheme:
        return None
    params: dict[str, str] = {}
    try:
        for param in _SPLIT.split(header_value[scheme.end() :].strip()):
            name, sep, value = param.partition("=")
            name = name.strip().lower()
            # A name given twice (two credentials folded into one header, say): Synapse
            # keeps the last value, and which one counts must never be a guess.
            if not sep or name in params:
                return None
            params[name] = _unquote(value.strip())
    except ValueError:
        return None
    origin, key_id, sig = params.get("origin"), params.get("key"), params.get("sig")
    if not origin or not key_id or not sig or parse_server_name(origin) is None:
        return None
    if not key_id.startswith("ed25519:") or len(key_id) == len("ed25519:"):
        return None
    return XMatrixAuth(origin, params.get("destination"), key_id, sig)


def _request_object(
    method: str, uri: str, origin: str, destination: str, content: object | None
) -> dict[str, Any]:
    obj: dict[str, Any] = {
        "method": method,
        "uri": uri,
        "origin": origin,
        "destination": destination,
    }
    if content is not None:
        obj["content"] = content
    return obj


def request_signing_bytes(
    method: str, uri: str, origin: str, destination: str, content: object | None
) -> bytes:
    return encode_canonical_json(_request_object(method, uri, origin, destination, content))


def verify_request_signature(
    auth: XMatrixAuth,
    method: str,
    uri: str,
    destination: str,
    content: object | None,
    verify_key: Any,
) -> bool:
    """Whether `auth.signature` is the origin's signature of this request. Never raises.

    What signedjson's verify_signed_json does, with modgud's canonical JSON encoder (a
    /send body is re-encoded for every request: the stdlib encoder behind signedjson
    took about 0.5 ms for 50 PDUs)."""
    try:
        signed = request_signing_bytes(method, uri, auth.origin, destination, content)
        verify_key.verify(signed, decode_base64(auth.signature))
    except (BadSignatureError, ValueError, TypeError, RecursionError):
        return False
    return True


def sign_request(
    method: str, uri: str, origin: str, destination: str, content: object | None, signing_key: Any
) -> str:
    """The Authorization header value for a request signed by `origin`."""
    signed = sign_json(
        _request_object(method, uri, origin, destination, content), origin, signing_key
    )
    key_id = f"{signing_key.alg}:{signing_key.version}"
    sig = signed["signatures"][origin][key_id]
    return f'X-Matrix origin="{origin}",destination="{destination}",key="{key_id}",sig="{sig}"'
