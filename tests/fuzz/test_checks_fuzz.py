"""Fuzzing the checks (rules/checks.py: "Never raises on hostile input") with arbitrary
PDUs and EDUs, in rooms of every kind (known and unknown versions, with and without ACL,
participation, unknown to the homeserver, state unavailable), under the operator policy
of the fuzz world and under none."""

from __future__ import annotations

from hypothesis import strategies as st

from rules.checks import (
    UNAVAILABLE,
    ItemVerdict,
    TransactionVerdict,
    apply_actions,
    apply_actions_to_transaction,
    check_event,
    check_invite,
    check_outbound,
    check_request_origin,
    check_transaction,
    rooms_of_transaction,
    with_signature_check,
)
from rules.federation import parse_transaction
from rules.findings import Decision, Finding
from rules.policy import NO_POLICY
from rules.roomstate import room_policy_from_state
from rules.signatures import SignatureCheck
from tests.fuzz.harness import fuzz
from tests.fuzz.strategies import (
    dumps,
    events,
    json_objects,
    json_values,
    mutated,
    strings,
    transactions,
    users,
)
from tests.fuzz.world import DOWN_ROOM, LOCAL, ROOMS, SERVERS, operator_policy, room_policies

POLICIES = room_policies()
ROOM_LOOKUP = {**POLICIES, DOWN_ROOM: UNAVAILABLE}
OPERATOR = operator_policy(POLICIES)
operators = st.sampled_from([OPERATOR, NO_POLICY])
origins = st.sampled_from(SERVERS)
rooms_or_strings = st.sampled_from(ROOMS) | strings


def _rooms(txn_rooms: set[str], extra_state: list[object]) -> dict[str, object]:
    """The lookup the edge would build: every room of the transaction, from the world or,
    for a room the world lacks, from arbitrary state or unknown to the homeserver."""
    rooms: dict[str, object] = {}
    for i, room_id in enumerate(sorted(txn_rooms)):
        if room_id in ROOM_LOOKUP:
            rooms[room_id] = ROOM_LOOKUP[room_id]
        elif i % 2 and extra_state:
            rooms[room_id] = room_policy_from_state(room_id, extra_state)
    return rooms


def _check_verdict(verdict: TransactionVerdict, n_pdus: int, n_edus: int) -> None:
    assert len(verdict.pdus) == n_pdus and len(verdict.edus) == n_edus
    for item in verdict.items:
        assert isinstance(item, ItemVerdict) and isinstance(item.decision, Decision)
        assert all(isinstance(f, Finding) and f.detail for f in item.findings)
        if item.refused:
            assert item.findings


@fuzz(st.data(), origins, operators, st.booleans())
def test_check_transaction_on_arbitrary_pdus_and_edus(data, origin, policy, fail_open):
    """Near-valid transactions, mutated, parsed as the edge parses them, checked in the
    world's rooms; then the operator's actions and an arbitrary signature check."""
    raw = data.draw(mutated(data.draw(transactions(origin))))
    txn = parse_transaction(dumps(raw), "t", origin)
    if txn.error is not None:
        return
    extra = data.draw(st.lists(events(sign=False) | json_values, max_size=4))
    rooms = _rooms(rooms_of_transaction(txn), extra)
    refused = data.draw(
        st.dictionaries(rooms_or_strings, st.dictionaries(strings, strings, max_size=3), max_size=2)
    )
    verdict = check_transaction(txn, rooms, fail_open=fail_open, policy=policy, refused=refused)
    n_pdus, n_edus = len(txn.pdus) + len(txn.bad_pdus), len(txn.edus) + len(txn.bad_edus)
    _check_verdict(verdict, n_pdus, n_edus)
    _check_verdict(apply_actions_to_transaction(verdict, policy), n_pdus, n_edus)
    check = SignatureCheck(
        data.draw(st.booleans()),
        tuple(data.draw(st.lists(st.tuples(strings, strings), max_size=2))),
        data.draw(st.none() | strings),
        frozenset(data.draw(st.lists(origins, max_size=2))),
    )
    for pdu, item in zip(txn.pdus, verdict.pdus, strict=False):
        checked = with_signature_check(item, pdu, origin, check)
        assert isinstance(checked, ItemVerdict)
    outbound = check_outbound(txn, LOCAL, origin, rooms, policy, fail_open=fail_open)
    assert len(outbound.pdus) == len(txn.pdus) and len(outbound.edus) == len(txn.edus)


@st.composite
def hook_events(draw: st.DrawFn) -> dict[str, object]:
    """Events as the hook gets them: near-valid ones (in client format or not), mutated
    ones and arbitrary objects."""
    event = draw(events() | json_objects)
    if draw(st.booleans()):
        event = draw(mutated(event))
    return event if isinstance(event, dict) else {"event": event}


@fuzz(hook_events(), st.sampled_from(ROOMS), operators, st.booleans())
def test_check_event_on_arbitrary_events(event, room_id, policy, fail_open):
    """The hook's own evaluation, for any event, in any kind of room."""
    room = ROOM_LOOKUP.get(room_id)
    for local in (LOCAL, "good.test"):
        item = check_event(event, room, local, fail_open=fail_open, policy=policy)
        assert isinstance(item, ItemVerdict)
        assert isinstance(apply_actions(item, policy), ItemVerdict)


@fuzz(users, users, st.sampled_from(ROOMS), origins, operators, st.booleans())
def test_room_requests_and_invites(inviter, invitee, room_id, origin, policy, fail_open):
    """Room-data requests and invites, for any user and server names, in any room."""
    room = ROOM_LOOKUP.get(room_id)
    item = check_request_origin(origin, room_id, room, "state", fail_open=fail_open, policy=policy)
    assert isinstance(apply_actions(item, policy), ItemVerdict)
    if isinstance(inviter, str) and isinstance(invitee, str):
        item = check_invite(inviter, invitee, room, room_id, fail_open=fail_open, policy=policy)
        assert isinstance(apply_actions(item, policy), ItemVerdict)
