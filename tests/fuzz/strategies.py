"""Strategies: arbitrary JSON, near-valid Matrix objects (events, EDUs, transactions,
X-Matrix headers, federation paths) and mutations of valid ones, at the tree and the byte
level."""

from __future__ import annotations

import copy
import json
from typing import Any
from urllib.parse import quote

from hypothesis import strategies as st

from proxy_addons.endpoints import ROOM_DATA
from rules.roomversion import KNOWN_ROOM_VERSIONS, get_room_version
from rules.signatures import sign_event
from rules.xmatrix import sign_request
from tests.fuzz.world import (
    LOCAL,
    ROOM_VERSIONS,
    ROOMS,
    SERVERS,
    SIGNING_KEYS,
    USERS,
)

# Keys and strings that mean something to modgud, so random trees hit its branches.
KEYS = (
    "room_id",
    "sender",
    "type",
    "state_key",
    "content",
    "event_id",
    "hashes",
    "sha256",
    "signatures",
    "prev_events",
    "auth_events",
    "depth",
    "origin",
    "origin_server_ts",
    "unsigned",
    "redacts",
    "membership",
    "join_authorised_via_users_server",
    "third_party_invite",
    "signed",
    "pdus",
    "edus",
    "edu_type",
    "event",
    "allow",
    "deny",
    "allow_ip_literals",
    "users",
    "users_default",
    "invite",
    "room_version",
    "creator",
    "additional_creators",
    "participation",
    "rule",
    "via",
    "entity",
    "recommendation",
    "user_id",
    "push",
    "m.read",
    "event_ids",
    "auth_chain",
    "state",
    "events",
    "id",
    "inviter",
    "invitee",
)
EVENT_TYPES = (
    "m.room.message",
    "m.room.member",
    "m.room.create",
    "m.room.server_acl",
    "m.room.power_levels",
    "m.room.join_rules",
    "m.room.redaction",
    "m.room.aliases",
    "m.room.history_visibility",
    "m.space.child",
    "m.server.participation",
    "me.marewolf.msc4124.server.participation",
    "m.server.knock_rule",
    "m.server.knock",
    "me.marewolf.msc4124.server.knock",
    "m.policy.rule.server",
    "m.policy.rule.user",
    "org.matrix.mjolnir.rule.server",
)
EDU_TYPES = (
    "m.typing",
    "m.receipt",
    "m.presence",
    "m.device_list_update",
    "m.signing_key_update",
    "m.direct_to_device",
    "m.server.knock",
    "me.marewolf.msc4124.server.knock",
    "org.example.custom",
)
ODD_STRINGS = (
    "",
    " ",
    "\x00",
    "\ud800",
    "\udcff",
    "\ufeff",
    "$",
    "!",
    "@",
    ":",
    "@:",
    "@u:",
    "@u:a.test:99999",
    "@u:[::1",
    "ed25519:",
    "ed25519:1",
    "*",
    "?",
    "*.*",
    "m.ban",
    "join",
    "leave",
    "knock",
    "invite",
    "ban",
    "permitted",
    "deny",
    "denied",
    "active",
    "passive",
    "1" * 300,
    "é" * 40,
)
text = st.text(max_size=12) | st.text(
    alphabet=st.characters(exclude_categories=()), max_size=6
)  # the second with lone surrogates
strings = (
    st.sampled_from(ODD_STRINGS)
    | st.sampled_from(USERS)
    | st.sampled_from(SERVERS)
    | st.sampled_from(ROOMS)
    | st.sampled_from(EVENT_TYPES)
    | text
)
numbers = (
    st.integers(min_value=-(2**64), max_value=2**64)
    | st.sampled_from([0, -1, 2**53, 2**53 - 1, -(2**63), 10**400])
    | st.floats()
)
json_scalars = st.none() | st.booleans() | numbers | strings
json_values = st.recursive(
    json_scalars,
    lambda children: (
        st.lists(children, max_size=5)
        | st.dictionaries(st.sampled_from(KEYS) | text, children, max_size=5)
    ),
    max_leaves=25,
)
json_objects = st.dictionaries(st.sampled_from(KEYS) | text, json_values, max_size=8)


def _deep(depth: int, opener: str = "[") -> str:
    closer = {"[": "]", "{": "}"}[opener]
    if opener == "{":
        return '{"a":' * depth + "1" + closer * depth
    return opener * depth + closer * depth


# Byte strings that trip decoders: deep nesting, huge numbers, NaN, bad UTF-8, escapes.
JUNK = (
    b"",
    b" ",
    b"null",
    b"NaN",
    b"-Infinity",
    b"1e400",
    b"1" * 4400,
    b"\xff\xfe",
    b"\xc3",
    b'"\x80"',
    b'{"a": "\xed\xa0\x80"}',
    b'"\\ud800"',
    b'"\\u0000"',
    b"\x00",
    _deep(3000).encode(),
    _deep(1500, "{").encode(),
    b"[" * 50_000,
    b'{"a": [], "a": {}}',
    b"\xef\xbb\xbf{}",
)
junk = st.sampled_from(JUNK)


def dumps(value: object, compact: bool = False, ascii_only: bool = True) -> bytes:
    """JSON bytes of a value; lone surrogates outside ASCII mode become invalid UTF-8, as a
    hostile sender would write them."""
    separators = (",", ":") if compact else None
    text = json.dumps(value, separators=separators, ensure_ascii=ascii_only)
    return text.encode("utf-8", "surrogatepass")


@st.composite
def json_bytes(draw: st.DrawFn, values: st.SearchStrategy[Any] = json_values) -> bytes:
    value = draw(values)
    return dumps(value, draw(st.booleans()), draw(st.booleans()))


# --- near-valid events ------------------------------------------------------------------

servers = st.sampled_from(SERVERS)
# Valid user IDs with any local part (lone surrogates too), and anything else.
users = (
    st.sampled_from(USERS)
    | st.builds(lambda local, server: f"@{local}:{server}", text, servers)
    | strings
)
event_ids = st.sampled_from(["$prev", "$create", "$acl", "$e1", "$"]) | strings
refs = st.lists(event_ids | st.lists(event_ids | json_values, max_size=2), max_size=4)
globs = st.sampled_from(["*", "*.test", "denied.test", "?ood.test", "*.*", "a*a*a*a*b"]) | text


def _content(event_type: str) -> st.SearchStrategy[dict[str, Any]]:
    if event_type == "m.room.member":
        return st.fixed_dictionaries(
            {"membership": st.sampled_from(["join", "leave", "invite", "knock", "ban"]) | strings},
            optional={
                "join_authorised_via_users_server": users,
                "third_party_invite": json_values,
                "displayname": text,
            },
        )
    if event_type == "m.room.server_acl":
        return st.fixed_dictionaries(
            {},
            optional={
                "allow": st.lists(globs | json_values, max_size=6) | json_values,
                "deny": st.lists(globs | json_values, max_size=6) | json_values,
                "allow_ip_literals": st.booleans() | json_values,
            },
        )
    if event_type == "m.room.create":
        return st.fixed_dictionaries(
            {},
            optional={
                "room_version": st.sampled_from(sorted(KNOWN_ROOM_VERSIONS)) | json_values,
                "creator": users,
                "additional_creators": st.lists(users, max_size=3) | json_values,
            },
        )
    if event_type == "m.room.power_levels":
        levels = st.integers(-(2**63), 2**63) | st.sampled_from(["50", " 100", "-1", "x"])
        return st.fixed_dictionaries(
            {},
            optional={
                "users": st.dictionaries(users, levels | json_values, max_size=4) | json_values,
                "users_default": levels | json_values,
                "invite": levels | json_values,
            },
        )
    if "participation" in event_type:
        return st.fixed_dictionaries({"participation": strings | json_values})
    if "knock_rule" in event_type:
        return st.fixed_dictionaries({"rule": strings | json_values})
    if event_type == "m.space.child":
        return st.fixed_dictionaries({"via": st.lists(servers, max_size=2) | json_values})
    if "rule" in event_type:
        return st.fixed_dictionaries(
            {"entity": globs | users | json_values, "recommendation": strings | json_values}
        )
    if event_type == "m.room.redaction":
        return st.fixed_dictionaries({"redacts": event_ids})
    return st.fixed_dictionaries({"body": text, "msgtype": st.just("m.text")}) | json_objects


_STATE_KEYED = frozenset(EVENT_TYPES) - {"m.room.message", "m.room.redaction"}


any_room = st.sampled_from(ROOMS)


@st.composite
def events(
    draw: st.DrawFn,
    room_ids: st.SearchStrategy[str] = any_room,
    sign: bool = True,
    senders: st.SearchStrategy[Any] | None = None,
) -> dict[str, Any]:
    """An event of the wire (PDU) format, often validly hashed and signed by its sender's
    server under its room's version."""
    event_type = draw(st.sampled_from(EVENT_TYPES) | strings)
    room_id = draw(room_ids)
    sender = draw(st.sampled_from(USERS) | users if senders is None else senders)
    event: dict[str, Any] = {
        "room_id": room_id,
        "sender": sender,
        "type": event_type,
        "content": draw(_content(event_type)),
        "origin_server_ts": draw(st.integers(0, 2**53) | numbers),
        "depth": draw(st.integers(0, 100)),
        "prev_events": draw(refs),
        "auth_events": draw(refs),
    }
    if event_type in _STATE_KEYED or draw(st.booleans()):
        event["state_key"] = draw(st.sampled_from(["", sender]) | servers | strings)
    if event_type == "m.room.create" and draw(st.booleans()):
        del event["room_id"]  # room v12: the room ID is derived from the create event
    if draw(st.booleans()):
        event["event_id"] = draw(event_ids)  # room v1/v2 carry it
    if draw(st.booleans()):
        event["unsigned"] = draw(json_values)
    if draw(st.integers(0, 5)) == 0:
        event["hashes"] = {"sha256": draw(strings)}  # replaced when signed below
    version = get_room_version(ROOM_VERSIONS.get(room_id, "10")) or KNOWN_ROOM_VERSIONS["10"]
    server = sender.partition(":")[2] if isinstance(sender, str) else ""
    if sign and server in SIGNING_KEYS and draw(st.integers(0, 3)):
        try:
            event = sign_event(event, version, server, SIGNING_KEYS[server])
        except (ValueError, TypeError):
            pass  # floats, NaN: not signable, sent as they are
    return event


@st.composite
def edus(draw: st.DrawFn) -> dict[str, Any]:
    edu_type = draw(st.sampled_from(EDU_TYPES) | strings)
    user, room_id = draw(users), draw(st.sampled_from(ROOMS) | strings)
    content: Any
    if edu_type == "m.typing":
        content = {"room_id": room_id, "user_id": user, "typing": True}
    elif edu_type == "m.receipt":
        receipts = {user: {"event_ids": ["$e1"], "data": {"ts": 1}}}
        content = {room_id: {"m.read": receipts}}
        if draw(st.booleans()):
            content[draw(st.sampled_from(ROOMS))] = draw(json_values)
    elif edu_type == "m.presence":
        content = {"push": [{"user_id": user, "presence": "online"}, draw(json_values)]}
    elif edu_type == "m.direct_to_device":
        content = {"sender": user, "type": "m.x", "message_id": "1", "messages": {}}
    elif "knock" in edu_type:
        content = {"room_id": room_id}
    else:
        content = {"user_id": user, "device_id": "D", "stream_id": 1}
    edu: dict[str, Any] = {"edu_type": edu_type, "content": content}
    if draw(st.integers(0, 4)) == 0:
        edu = draw(mutated(edu))
    return edu


@st.composite
def transactions(
    draw: st.DrawFn, origin: str, event_strategy: st.SearchStrategy[dict[str, Any]] | None = None
) -> dict[str, Any]:
    """A /send body from `origin`: up to a few PDUs and EDUs; now and then more than the
    limits allow."""
    pdu_strategy = events() if event_strategy is None else event_strategy
    pdu_list = st.lists(pdu_strategy, max_size=draw(st.sampled_from([0, 3, 6])))
    txn: dict[str, Any] = {
        "origin": draw(st.just(origin) | servers),
        "origin_server_ts": 1,
        "pdus": draw(pdu_list),
        "edus": draw(st.lists(edus(), max_size=3)),
    }
    if draw(st.integers(0, 20)) == 0:  # over the limits: 51 PDUs or 101 EDUs
        key, count = draw(st.sampled_from([("pdus", 51), ("edus", 101)]))
        item = txn[key][0] if txn[key] else {}
        txn[key] = [item] * count
    return txn


# --- mutations ----------------------------------------------------------------------------


def _places(value: Any, out: list[tuple[Any, Any]]) -> list[tuple[Any, Any]]:
    """(container, key) of every value inside a JSON tree."""
    if isinstance(value, dict):
        for key in list(value):
            out.append((value, key))
            _places(value[key], out)
    elif isinstance(value, list):
        for i, item in enumerate(value):
            out.append((value, i))
            _places(item, out)
    return out


@st.composite
def mutated(draw: st.DrawFn, value: Any, max_mutations: int = 3) -> Any:
    """`value` with a few places replaced, deleted, retyped, wrapped or multiplied."""
    value = copy.deepcopy(value)
    for _ in range(draw(st.integers(0, max_mutations))):
        places = _places(value, [])
        if not places:
            break
        container, key = draw(st.sampled_from(places))
        old = container[key]
        op = draw(st.sampled_from(["replace", "delete", "retype", "grow"]))
        if op == "replace":
            container[key] = draw(json_values)
        elif op == "delete":
            del container[key]
        elif op == "retype":
            container[key] = draw(
                st.sampled_from(
                    [None, 0, 1.5, "", [], {}, True, [old], {"x": old}, str(old)[:50], -(2**70)]
                )
            )
        elif isinstance(container, list):
            container[key:key] = [old] * draw(st.integers(1, 60))
        else:
            container[draw(st.sampled_from(KEYS) | text)] = draw(json_values)
    return value


@st.composite
def mangled(draw: st.DrawFn, raw: bytes) -> bytes:
    """`raw` with bytes cut, flipped, inserted or deleted, or junk spliced in."""
    for _ in range(draw(st.integers(1, 3))):
        pos = draw(st.integers(0, len(raw)))
        op = draw(st.sampled_from(["cut", "flip", "insert", "delete", "splice"]))
        if op == "cut":
            raw = raw[:pos]
        elif op == "flip" and pos < len(raw):
            raw = raw[:pos] + bytes([raw[pos] ^ draw(st.integers(1, 255))]) + raw[pos + 1 :]
        elif op == "insert":
            raw = raw[:pos] + draw(st.binary(min_size=1, max_size=4)) + raw[pos:]
        elif op == "delete":
            raw = raw[:pos] + raw[pos + draw(st.integers(1, 8)) :]
        else:
            raw = raw[:pos] + draw(junk) + raw[pos:]
    return raw


# --- X-Matrix headers ----------------------------------------------------------------------

_QUOTINGS = ('"{}"', "{}", '"{}', '{}"', '"{}\\"', "  {}  ", '"\\{}"')


@st.composite
def xmatrix_headers(draw: st.DrawFn) -> str:
    """Authorization values built from parts: scheme, parameters in any order, quoted or
    bare, missing, doubled, with odd names, values and separators."""
    scheme = draw(
        st.sampled_from(["X-Matrix ", "x-matrix  ", "X-MATRIX\t", "X-Matrix", "Bearer ", ""])
    )
    values = {
        "origin": st.sampled_from(SERVERS) | strings,
        "destination": st.sampled_from([LOCAL, "other.test"]) | strings,
        "key": st.sampled_from(["ed25519:1", "ed25519:a_key", "ed25519:", "rsa:1"]) | strings,
        "sig": st.sampled_from(["c2ln", "AAAA" * 22]) | strings,
    }
    names = draw(st.permutations(list(values)))
    params = []
    for name in names[: draw(st.integers(0, 4))] + draw(
        st.lists(st.sampled_from(names), max_size=1)
    ):
        shown = draw(st.sampled_from([name, name.upper(), f" {name} ", name + "x"]))
        quoting = draw(st.sampled_from(_QUOTINGS))
        params.append(f"{shown}={quoting.format(draw(values[name]))}")
    if draw(st.booleans()):
        params.append(draw(text))
    separator = draw(st.sampled_from([",", ", ", " ,\t", ",,", ";"]))
    return scheme + separator.join(params)


def signed_header(
    method: str, path: str, origin: str, content: object | None, destination: str = LOCAL
) -> str | None:
    """A valid X-Matrix header of `origin`'s for this request; None when the world has no
    key of `origin` or the content cannot be signed."""
    key = SIGNING_KEYS.get(origin)
    if key is None:
        return None
    try:
        return sign_request(method, path, origin, destination, content, key)
    except (ValueError, TypeError, RecursionError):
        return None


# --- paths -----------------------------------------------------------------------------

FEDERATION_NAMES = (
    "send",
    "event",
    *sorted(ROOM_DATA),
    "query",
    "user",
    "publicRooms",
    "version",
)
segments = (
    st.sampled_from(ROOMS)
    | st.sampled_from(["$e1", "$", "txn1", "@u:good.test", "", ".", "..", "%", "%zz", "%00"])
    | text
    | st.integers(1000, 20_000).map(lambda n: "a" * n)
)


@st.composite
def federation_paths(draw: st.DrawFn) -> str:
    """/_matrix/federation/{version}/{name}/{segments}[?query], segments percent-encoded,
    raw, doubled or garbage; sometimes very long."""
    version = draw(st.sampled_from(["v1", "v2", "v3", "V1", ""]))
    name = draw(st.sampled_from(FEDERATION_NAMES) | text)
    parts = draw(st.lists(segments, max_size=4))
    encode = draw(st.sampled_from(["quote", "raw", "double"]))
    if encode == "quote":
        parts = [quote(p, safe="", errors="surrogatepass") for p in parts]
    elif encode == "double":
        parts = [quote(quote(p, safe="", errors="surrogatepass"), safe="") for p in parts]
    path = f"/_matrix/federation/{version}/{name}" + "".join("/" + p for p in parts)
    if draw(st.booleans()):
        path += "?" + draw(st.sampled_from(["limit=10", "v=1&v=2", "", "%", "a=\x00"]) | text)
    return path


paths = (
    federation_paths()
    | st.sampled_from(["/_matrix/key/v2/server", "/_matrix/key/v2/query", "/", "", "*"])
    | st.text(max_size=40).map(lambda t: "/" + t)
)
raw_paths = (
    paths.map(lambda p: p.encode("utf-8", "surrogatepass"))
    | st.builds(
        lambda name, segment: b"/_matrix/federation/v1/" + name + b"/" + segment,
        st.sampled_from([b"send", b"state", b"event", b"make_join"]),
        st.binary(max_size=20),
    )
    | st.binary(max_size=60)
)
methods = st.sampled_from(["PUT", "GET", "POST", "DELETE", "HEAD", "OPTIONS", "put", "PUT "]) | (
    st.binary(min_size=1, max_size=8)
)


def room_version_of(room_id: str) -> str:
    return ROOM_VERSIONS.get(room_id, "10")
