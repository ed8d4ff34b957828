"""Fuzzing the parsers of rules/: transactions and JSON bodies, X-Matrix headers, server
names, ACLs and globs, room state, policy lists. Hostile input never raises out of them
(rules/federation.py: "Parsing never raises"); it becomes a finding or a None."""

from __future__ import annotations

import re

from hypothesis import strategies as st

from rules.acl import GlobSet, ServerAcl, check_server_acl, is_ip_literal_host
from rules.federation import (
    MAX_EDUS,
    MAX_PDUS,
    Edu,
    Pdu,
    Transaction,
    edu_rooms,
    edu_users,
    parse_json_body,
    parse_pdu,
    parse_transaction,
)
from rules.findings import Finding, Rule
from rules.glob import compile_glob
from rules.policy import BanList, authorise_server
from rules.roomstate import RoomPolicy, room_policy_from_state
from rules.roomversion import get_room_version, room_version_of_create
from rules.servername import parse_server_name, server_of_user, strip_port
from rules.xmatrix import XMatrixAuth, parse_xmatrix, sign_request, verify_request_signature
from tests.fuzz.harness import fuzz
from tests.fuzz.strategies import (
    dumps,
    edus,
    events,
    globs,
    json_bytes,
    json_values,
    junk,
    mangled,
    mutated,
    strings,
    text,
    transactions,
    xmatrix_headers,
)
from tests.fuzz.world import LOCAL, SERVERS, SIGNING_KEYS

origins = st.none() | st.sampled_from(SERVERS)


def _check_transaction_shape(txn: Transaction) -> None:
    assert isinstance(txn, Transaction)
    if txn.error is not None:
        assert txn.error.rule is Rule.MALFORMED_REQUEST
        assert (txn.pdus, txn.edus, txn.bad_pdus, txn.bad_edus) == ((), (), (), ())
        return
    assert len(txn.pdus) + len(txn.bad_pdus) <= MAX_PDUS
    assert len(txn.edus) + len(txn.bad_edus) <= MAX_EDUS
    for pdu in txn.pdus:
        assert isinstance(pdu, Pdu)
        assert isinstance(pdu.room_id, str) and isinstance(pdu.sender, str)
        assert pdu.sender_server == server_of_user(pdu.sender)
        assert isinstance(pdu.event, dict)  # the lazily decoded event, never an exception
        repr(pdu)
    for edu in txn.edus:
        assert isinstance(edu, Edu) and isinstance(edu.content, dict)
        edu_users(edu)
        assert all(isinstance(r, str) for r in edu_rooms(edu))
    for finding in (*txn.bad_pdus, *txn.bad_edus, *txn.warnings):
        assert isinstance(finding, Finding) and finding.detail


@fuzz(st.binary(max_size=400) | junk, origins)
def test_parse_transaction_on_arbitrary_bytes(body, origin):
    """Any byte string is a transaction or a malformed.request finding."""
    _check_transaction_shape(parse_transaction(body, "t", origin))


@fuzz(
    json_bytes()
    | json_bytes(st.dictionaries(st.sampled_from(["pdus", "edus", "origin"]), json_values)),
    origins,
)
def test_parse_transaction_on_arbitrary_json(body, origin):
    """Any JSON value, and objects with pdus/edus/origin of any shape."""
    _check_transaction_shape(parse_transaction(body, "t", origin))


@fuzz(st.data(), st.sampled_from(SERVERS))
def test_parse_transaction_on_mutated_transactions(data, origin):
    """Valid transactions with parts replaced, deleted, retyped or multiplied, then
    perhaps damaged byte by byte."""
    txn = data.draw(mutated(data.draw(transactions(origin))))
    body = dumps(txn, data.draw(st.booleans()), data.draw(st.booleans()))
    if data.draw(st.booleans()):
        body = data.draw(mangled(body))
    _check_transaction_shape(parse_transaction(body, data.draw(text), origin))


@fuzz(json_values, st.integers(-1, 60), origins, st.booleans())
def test_parse_pdu_on_arbitrary_values(raw, position, origin, check_size):
    """A decoded PDU of any shape is a Pdu or a malformed.pdu finding."""
    result = parse_pdu(raw, position, origin, check_size=check_size, servers={})
    assert isinstance(result, Pdu | Finding)
    if isinstance(result, Finding):
        assert result.rule is Rule.MALFORMED_PDU
    else:
        assert isinstance(result.event, dict)


@fuzz(st.binary(max_size=300) | junk | json_bytes())
def test_parse_json_body_never_raises(body):
    """(value, None) or (None, reason), for any bytes."""
    value, reason = parse_json_body(body)
    assert reason is None or (value is None and isinstance(reason, str) and reason)


@fuzz(st.text(max_size=200) | st.text(alphabet=st.characters(exclude_categories=())) | strings)
def test_parse_xmatrix_on_arbitrary_strings(header):
    """Any header value is a well-formed XMatrixAuth or None."""
    _check_xmatrix(parse_xmatrix(header))


def _check_xmatrix(auth: XMatrixAuth | None) -> None:
    if auth is None:
        return
    assert parse_server_name(auth.origin) is not None
    assert auth.key_id.startswith("ed25519:") and len(auth.key_id) > len("ed25519:")
    assert isinstance(auth.signature, str) and auth.signature
    assert auth.destination is None or isinstance(auth.destination, str)


@fuzz(xmatrix_headers(), json_values, st.sampled_from(["PUT", "GET"]), text)
def test_parse_xmatrix_on_near_valid_headers(header, content, method, uri):
    """Headers built from parts parse to a well-formed XMatrixAuth or None, and checking
    the signature of what they claim never raises."""
    auth = parse_xmatrix(header)
    _check_xmatrix(auth)
    if auth is not None:
        key = SIGNING_KEYS["good.test"]
        assert isinstance(
            verify_request_signature(auth, method, uri, LOCAL, content, key.verify_key), bool
        )


@fuzz(st.sampled_from(sorted(SIGNING_KEYS)), st.sampled_from([LOCAL, "[::1]:8448"]), st.text())
def test_signed_headers_parse_back(origin, destination, uri):
    """What sign_request writes, parse_xmatrix reads back."""
    key = SIGNING_KEYS[origin]
    header = sign_request("PUT", uri, origin, destination, {"a": uri}, key)
    auth = parse_xmatrix(header)
    assert auth is not None
    assert (auth.origin, auth.destination, auth.key_id) == (
        origin,
        destination,
        f"ed25519:{key.version}",
    )


@fuzz(strings | st.text(alphabet="[]:.0123456789abcdef-", max_size=50) | json_values)
def test_server_names(name):
    """parse_server_name, strip_port and server_of_user on anything: None or a parse whose
    printed form parses to itself."""
    parsed = parse_server_name(name)
    if parsed is not None:
        assert parse_server_name(str(parsed)) == parsed
        assert strip_port(name) == parsed.host
    if isinstance(name, str):
        strip_port(name)
        is_ip_literal_host(strip_port(name))
        server_of_user("@u:" + name)
    server = server_of_user(name)
    assert server is None or parse_server_name(server) is not None


def _glob_regex(pattern: str) -> re.Pattern[str]:
    """The spec's glob semantics, as a regular expression: the reference."""
    body = "".join(".*" if c == "*" else "." if c == "?" else re.escape(c) for c in pattern.lower())
    return re.compile(body, re.DOTALL)


@fuzz(
    st.lists(globs | st.text(alphabet="ab.*?", max_size=8), max_size=12),
    st.lists(strings | st.text(alphabet="ab.", max_size=10), min_size=1, max_size=6),
)
def test_globset_agrees_with_a_regex_reference(patterns, names):
    """A GlobSet matches a name exactly when a regex built from one of its globs does."""
    index = GlobSet(patterns)
    for name in names:
        lowered = name.lower()
        expected = any(_glob_regex(p).fullmatch(lowered) for p in patterns)
        assert index.matches(lowered) is expected, (patterns, name)
        assert any(compile_glob(p).matches(lowered) for p in patterns) is expected


@fuzz(
    json_values
    | st.dictionaries(st.sampled_from(["allow", "deny", "allow_ip_literals"]), json_values),
    st.lists(strings, max_size=4),
)
def test_server_acl_from_any_content(content, names):
    """Any ACL content compiles and answers for any name."""
    acl = ServerAcl.from_content(content)
    for name in [*names, *SERVERS]:
        assert isinstance(check_server_acl(acl, name).allowed, bool)
        assert acl.check(name) == acl.check(name)


state_events = st.lists(events(sign=False) | json_values | st.builds(dict), max_size=12)


@fuzz(st.data())
def test_room_policy_from_any_state(data):
    """Room state of any shape gives a RoomPolicy, and deciding about servers in it never
    raises."""
    state = data.draw(state_events)
    if data.draw(st.booleans()):
        state = data.draw(mutated(state))
    room = room_policy_from_state(data.draw(text), state)
    assert isinstance(room, RoomPolicy)
    assert room.room_version == get_room_version(room.room_version_id)
    for server in data.draw(st.lists(strings, max_size=3)) + list(SERVERS[:4]):
        authorise_server(server, room)
        room.power.of(server)
    room_version_of_create(data.draw(json_values))


policy_events = st.lists(
    st.fixed_dictionaries(
        {
            "type": st.sampled_from(
                ["m.policy.rule.server", "m.policy.rule.user", "m.room.rule.server", "x"]
            )
            | strings,
            "content": st.fixed_dictionaries(
                {},
                optional={
                    "entity": globs | strings | json_values,
                    "recommendation": st.sampled_from(["m.ban", "org.matrix.mjolnir.ban"])
                    | json_values,
                },
            )
            | json_values,
        }
    )
    | json_values,
    max_size=10,
)


@fuzz(policy_events, st.lists(strings, max_size=4))
def test_banlist_from_any_state(state, names):
    """Policy-list state of any shape compiles; any name gets an answer."""
    bans = BanList.from_state(state)
    assert len(bans) == len(bans.servers) + len(bans.users)
    for name in [*names, *SERVERS]:
        assert isinstance(bans.bans_server(name), bool)
        assert isinstance(bans.bans_user(name), bool)


@fuzz(st.lists(edus() | json_values, max_size=4))
def test_edus_of_any_shape(raw_edus):
    """EDUs of any content shape: the users and rooms they name never raise."""
    txn = parse_transaction(dumps({"edus": raw_edus}), "t", "good.test")
    _check_transaction_shape(txn)
