"""The scenario corpus: named federation stories with the outcome modgud must produce.

Each scenario plays traffic on a `Stage` (a fresh room on hs1, behind modgud, with the
scripted peer's servers) and states, for enforce and for audit mode, what hs1's users must
see, what they must not, which memberships result, which HTTP status the last request got,
and exactly which findings modgud records — (rule, blamed server) pairs. Benign scenarios
pin zero false positives.

Writing a new scenario takes a function and an entry:

    def _my_story(stage: Stage) -> None:
        user = stage.join("leaky", "lee")
        stage.send("leaky", [stage.message("leaky", user, "hello")])

    Scenario("my_story", "what it shows", _my_story,
             enforce=Expected(reach=("hello",), findings=()))  # audit=…: only if it differs

Server roles: "leaky" (reachable peer server, stays allowed), "denied" (denied.test, the
ACL's target), "unknown" (unknown.test, never mentioned by any policy), "hs1"/"hs2"/"hs3"
(the real Synapse servers). A finding's blamed server is a role, or None for findings that
blame nobody (a forged request, an event pulled by the homeserver itself).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from signedjson.key import generate_signing_key

from proxy_addons.store import query_knocks
from proxy_addons.testbed.peer import FederationResponse, PeerError, PeerServer
from proxy_addons.testbed.topology import Topology

__all__ = ["SCENARIOS", "Expected", "Outcome", "Scenario", "Stage", "run_scenario"]

Finding = tuple[str, str | None]  # (rule, role of the blamed server or None)


@dataclass(frozen=True)
class Expected:
    reach: tuple[str, ...] = ()  # message bodies hs1's users must see
    hidden: tuple[str, ...] = ()  # message bodies they must never see
    members: tuple[tuple[str, str, str | None], ...] = ()  # (role, localpart, membership)
    status: int | None = None  # HTTP status of the stage's last request, if it matters
    findings: tuple[Finding, ...] = ()  # exactly these (rule, blamed role) pairs


@dataclass(frozen=True)
class Scenario:
    name: str
    story: str
    play: Callable[[Stage], None]
    enforce: Expected
    audit: Expected | None = None  # None: audit mode must see exactly what enforce sees
    hostile: bool = True
    room_version: str = "10"

    def expected(self, mode: str) -> Expected:
        if mode == "enforce" or self.audit is None:
            return self.enforce
        return self.audit


@dataclass
class Outcome:
    scenario: Scenario
    mode: str
    room_id: str
    failures: list[str] = field(default_factory=list)
    findings: list[dict[str, Any]] = field(default_factory=list)
    responses: list[FederationResponse] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.failures


class Stage:
    """What a scenario plays on: a fresh room on hs1 and the peer's servers."""

    def __init__(self, topo: Topology, room_version: str) -> None:
        self.topo = topo
        self.peer = topo.peer
        self.room_version = room_version
        self.room_id = ""
        self.responses: list[FederationResponse] = []

    # servers and users

    def peer_server(self, role: str) -> PeerServer:
        return {"leaky": self.topo.leaky, "denied": self.topo.denied, "unknown": self.topo.unknown}[
            role
        ]

    def server_name(self, role: str) -> str:
        if role in ("leaky", "denied", "unknown"):
            return self.peer_server(role).name
        return {"hs1": self.topo.hs1, "hs2": self.topo.hs2, "hs3": self.topo.hs3}[role].server_name

    def user(self, role: str, localpart: str) -> str:
        return f"@{localpart}:{self.server_name(role)}"

    # the room

    def open_room(self, **create: Any) -> str:
        self.room_id = self.topo.alice.create_room(room_version=self.room_version, **create)
        return self.room_id

    def deny(self, *roles: str) -> None:
        """hs1's admin sets an ACL denying these servers (hosts: ACLs ignore ports)."""
        hosts = [self.server_name(r).rsplit(":", 1)[0] for r in roles]
        acl = {"allow": ["*"], "deny": hosts}
        self.topo.alice.send_state(self.room_id, "m.room.server_acl", "", acl)
        # The hook hears of alice's ACL before Synapse stores it; modgud refetches the
        # room's state again 1 s later, after which the ACL is certainly in force.
        time.sleep(1.5)

    def join(self, role: str, localpart: str, membership: str = "join") -> str:
        """A peer user joins (knocks, leaves) through modgud by make_/send_ membership."""
        user_id, _ = self.topo.peer_join(
            self.peer_server(role), localpart, self.room_id, membership
        )
        return user_id

    def message(self, author: str, user_id: str, body: str, **build: Any) -> dict[str, Any]:
        """A PDU by a peer server's user (built on the room's tips unless told otherwise)."""
        _, pdu = self.peer.build_event(
            self.room_id,
            self.peer_server(author),
            user_id,
            "m.room.message",
            {"msgtype": "m.text", "body": body},
            **build,
        )
        return pdu

    def event_id(self, pdu: dict[str, Any]) -> str:
        return self.peer.event_id_of(self.peer.rooms[self.room_id], pdu)

    def send(
        self,
        role: str,
        pdus: list[dict[str, Any]] = (),  # type: ignore[assignment]
        edus: list[dict[str, Any]] = (),  # type: ignore[assignment]
        *,
        raw_body: bytes | None = None,
    ) -> FederationResponse:
        answer = self.topo.peer_send(self.peer_server(role), pdus, edus, raw_body=raw_body)
        self.responses.append(answer)
        return answer

    def txn_ids(self) -> set[str]:
        return {r.txn_id for r in self.responses if r.txn_id}


# -- the scenarios ------------------------------------------------------------------------


def _benign_chat(stage: Stage) -> None:
    stage.open_room()
    lee = stage.join("leaky", "lee")
    stage.send(
        "leaky", [stage.message("leaky", lee, "benign 1"), stage.message("leaky", lee, "benign 2")]
    )
    typing = {
        "edu_type": "m.typing",
        "content": {"room_id": stage.room_id, "user_id": lee, "typing": True},
    }
    receipt = {
        "edu_type": "m.receipt",
        "content": {
            stage.room_id: {
                "m.read": {
                    lee: {
                        "event_ids": [stage.peer.rooms[stage.room_id].extremities[-1]],
                        "data": {"ts": 1},
                    }
                }
            }
        },
    }
    stage.send("leaky", [stage.message("leaky", lee, "benign 3")], [typing, receipt])


def _knock(stage: Stage) -> None:
    knock_rule = {"type": "m.room.join_rules", "state_key": "", "content": {"join_rule": "knock"}}
    stage.open_room(initial_state=[knock_rule])
    stage.join("unknown", "knocker", "knock")


def _join_and_leave(stage: Stage) -> None:
    stage.open_room()
    stage.join("leaky", "visitor")
    stage.join("leaky", "visitor", "leave")


def _knock_approved(stage: Stage) -> None:
    """A room that lets in only permitted servers (MSC4124 knock rule `active`): an unknown
    server knocks, the moderator approves it with `modgud approve`, it joins and posts."""
    stage.open_room()
    stage.topo.alice.send_state(stage.room_id, "m.server.knock_rule", "", {"rule": "active"})
    unknown = stage.peer_server("unknown")
    stage.send(
        "unknown", edus=[{"edu_type": "m.server.knock", "content": {"room_id": stage.room_id}}]
    )
    database = str(stage.topo.database)
    deadline = time.monotonic() + 15
    while not query_knocks(database, room=stage.room_id) and time.monotonic() < deadline:
        time.sleep(0.25)
    stage.topo.cli("approve", stage.room_id, unknown.name).check_returncode()
    deadline = time.monotonic() + 20
    while True:
        try:
            user = stage.join("unknown", "admitted")
            break
        except PeerError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)  # until modgud has refetched the room's state
    stage.send("unknown", [stage.message("unknown", user, "admitted after approval")])


def _denied_origin_posts(stage: Stage) -> None:
    stage.open_room()
    dee = stage.join("denied", "dee")
    stage.deny("denied")
    stage.send("denied", [stage.message("denied", dee, "from the denied server")])


def _relayed_leak(stage: Stage) -> None:
    stage.open_room()
    dee = stage.join("denied", "dee")
    lee = stage.join("leaky", "lee")
    stage.deny("denied")
    stage.send("leaky", [stage.message("denied", dee, "relayed alone")])
    stage.send(
        "leaky",
        [stage.message("leaky", lee, "relay's own"), stage.message("denied", dee, "relayed mixed")],
    )


def _built_on_leak(stage: Stage) -> None:
    """The leaky server relays the denied server's message, then builds its own next
    event on it (prev_events): the spec's own way to find servers that break ACLs."""
    stage.open_room()
    dee = stage.join("denied", "dee")
    lee = stage.join("leaky", "lee")
    stage.deny("denied")
    leak = stage.message("denied", dee, "leaked first")
    stage.send("leaky", [leak])
    built = stage.message("leaky", lee, "built on the leak", prev_events=[stage.event_id(leak)])
    stage.send("leaky", [built])


def _relayed_allowed(stage: Stage) -> None:
    """The leaky server pushes an event written by a server nobody denies: not a refusal,
    but not how federation works (a server sends the events it wrote)."""
    stage.open_room()
    stage.join("leaky", "lee")
    newbie = stage.join("unknown", "newbie")
    stage.send("leaky", [stage.message("unknown", newbie, "pushed by someone else")])


def _relayed_denied_join(stage: Stage) -> None:
    stage.open_room()
    stage.join("leaky", "lee")
    stage.deny("denied")
    dee = stage.user("denied", "late")
    _, join = stage.peer.build_event(
        stage.room_id,
        stage.peer_server("denied"),
        dee,
        "m.room.member",
        {"membership": "join"},
        state_key=dee,
    )
    stage.send("leaky", [join])


def _built_on_denied(stage: Stage) -> None:
    """The leaky server's event names the denied server's event as a prev_event; hs1 pulls
    it through /get_missing_events from the leaky server, which serves it."""
    stage.open_room()
    dee = stage.join("denied", "dee")
    lee = stage.join("leaky", "lee")
    stage.deny("denied")
    hidden = stage.message("denied", dee, "pulled from the leaky server")
    stage.send(
        "leaky", [stage.message("leaky", lee, "built on it", prev_events=[stage.event_id(hidden)])]
    )


def _served_in_backfill(stage: Stage) -> None:
    """A room the leaky server hosts denies denied.test from the start, yet the leaky
    server let the denied server in and keeps its messages in the history. alice joins
    through the leaky server; paginating back makes hs1 backfill that history from it."""
    leaky, denied = stage.peer_server("leaky"), stage.peer_server("denied")
    host, dee = leaky.user("host"), denied.user("dee")
    stage.room_id = stage.peer.create_room(leaky, host, stage.room_version)
    acl = {"allow": ["*"], "deny": [denied.name]}
    stage.peer.build_event(stage.room_id, leaky, host, "m.room.server_acl", acl, state_key="")
    stage.peer.build_event(
        stage.room_id, denied, dee, "m.room.member", {"membership": "join"}, state_key=dee
    )
    stage.message("leaky", host, "history 1")
    stage.message("denied", dee, "history from the denied server")
    stage.message("leaky", host, "history 2")
    stage.topo.alice.join(stage.room_id, via=[leaky.name])
    stage.topo.alice.messages(stage.room_id)  # paginating back: hs1 backfills from the peer


def _bad_signatures(stage: Stage) -> None:
    stage.open_room()
    lee = stage.join("leaky", "lee")
    stage.send("leaky", [stage.message("leaky", lee, "forged signature", signature="forge")])
    stage.send("leaky", [stage.message("leaky", lee, "no signature", signature="drop")])


def _malformed_transactions(stage: Stage) -> None:
    stage.open_room()
    lee = stage.join("leaky", "lee")
    good = stage.message("leaky", lee, "fine", record=False)
    body = json.dumps({"origin": stage.server_name("leaky"), "origin_server_ts": 1, "pdus": [good]})
    stage.send("leaky", raw_body=body.encode()[:-7])  # truncated
    stage.send("leaky", raw_body=b"\x00not json at all")
    stage.send(
        "leaky", raw_body=json.dumps({"origin": stage.server_name("leaky"), "pdus": {}}).encode()
    )
    stage.send(
        "leaky", [stage.message("leaky", lee, f"one of 51 #{i}", record=False) for i in range(51)]
    )


def _oversized_pdu(stage: Stage) -> None:
    stage.open_room()
    lee = stage.join("leaky", "lee")
    big = stage.message("leaky", lee, "x" * 70_000, record=False)
    stage.send("leaky", [big, stage.message("leaky", lee, "next to a huge one")])


def _edu_impersonation(stage: Stage) -> None:
    stage.open_room()
    stage.join("leaky", "lee")
    alice, bob = stage.topo.users["alice"], stage.user("hs2", "bob")
    edus = [
        {
            "edu_type": "m.typing",
            "content": {"room_id": stage.room_id, "user_id": alice, "typing": True},
        },
        {
            "edu_type": "m.receipt",
            "content": {stage.room_id: {"m.read": {bob: {"event_ids": ["$x"], "data": {"ts": 1}}}}},
        },
        {
            "edu_type": "m.presence",
            "content": {
                "push": [
                    {
                        "user_id": stage.user("denied", "dee"),
                        "presence": "online",
                        "last_active_ago": 1,
                    }
                ]
            },
        },
    ]
    stage.send("leaky", edus=edus)


def _server_knock_edu(stage: Stage) -> None:
    stage.open_room()
    stage.send(
        "unknown", edus=[{"edu_type": "m.server.knock", "content": {"room_id": stage.room_id}}]
    )


def _restricted_join_abuse(stage: Stage) -> None:
    """Joins to a restricted room (MSC3083) that the leaky server relays: one authorised by
    its own user, who lacks invite power; one naming hs1's admin but signed by the leaky
    server instead of hs1. Synapse's auth rules refuse both; modgud's own check is [policy]."""
    parent = stage.open_room()
    stage.join("leaky", "lee")
    stage.open_room(
        initial_state=[
            {
                "type": "m.room.join_rules",
                "state_key": "",
                "content": {
                    "join_rule": "restricted",
                    "allow": [{"type": "m.room_membership", "room_id": parent}],
                },
            }
        ],
        power_levels={"invite": 50},
    )
    lee = stage.join("leaky", "lee")
    for localpart, via in (("mallory", lee), ("trudy", stage.topo.users["alice"])):
        user = stage.user("unknown", localpart)
        _, join = stage.peer.build_event(
            stage.room_id,
            stage.peer_server("unknown"),
            user,
            "m.room.member",
            {"membership": "join", "join_authorised_via_users_server": via},
            state_key=user,
            signers=[stage.peer_server("leaky")],
            record=False,
        )
        stage.send("leaky", [join])


def _forged_origin(stage: Stage) -> None:
    """A request claiming to come from the denied server, signed with the leaky server's
    key: refused, and nobody is blamed on the claim."""
    stage.open_room()
    stage.join("leaky", "lee")
    denied = stage.peer_server("denied")
    # the denied server's name and key ID, someone else's key
    impostor = PeerServer(denied.name, generate_signing_key(denied.signing_key.version), False)
    answer = stage.topo.peer.send(
        impostor,
        stage.topo.hs1.server_name,
        stage.topo.hs1_address,
        [],
        [
            {
                "edu_type": "m.typing",
                "content": {
                    "room_id": stage.room_id,
                    "user_id": stage.user("denied", "d"),
                    "typing": True,
                },
            }
        ],
    )
    stage.responses.append(answer)


SCENARIOS: list[Scenario] = [
    Scenario(
        "benign_chat",
        "an allowed peer joins, chats, types and sends receipts",
        _benign_chat,
        enforce=Expected(reach=("benign 1", "benign 2", "benign 3"), status=200),
        hostile=False,
    ),
    Scenario(
        "knock",
        "a server nobody knows knocks on a knock room (make_knock/send_knock)",
        _knock,
        enforce=Expected(members=(("unknown", "knocker", "knock"),)),
        hostile=False,
    ),
    Scenario(
        "join_and_leave",
        "a visitor joins and leaves (make_leave/send_leave)",
        _join_and_leave,
        enforce=Expected(members=(("leaky", "visitor", "leave"),)),
        hostile=False,
    ),
    Scenario(
        "knock_approved",
        "an unknown server knocks on a room open to permitted servers only; the moderator approves it",
        _knock_approved,
        enforce=Expected(
            reach=("admitted after approval",), members=(("unknown", "admitted", "join"),)
        ),
        hostile=False,
    ),
    Scenario(
        "denied_origin_posts",
        "the ACL-denied server posts in the room",
        _denied_origin_posts,
        enforce=Expected(
            hidden=("from the denied server",), status=200, findings=(("acl.origin", "denied"),)
        ),
        audit=Expected(hidden=("from the denied server",), findings=(("acl.origin", "denied"),)),
    ),
    Scenario(
        "relayed_leak",
        "the leaky server relays the denied server's messages, alone and mixed",
        _relayed_leak,
        # "relay's own" is built on the message relayed alone before it: a reference too.
        enforce=Expected(
            reach=("relay's own",),
            hidden=("relayed alone", "relayed mixed"),
            findings=(("acl.sender", "leaky"), ("leak.reference", "leaky")),
        ),
        audit=Expected(
            reach=("relay's own", "relayed alone", "relayed mixed"),
            findings=(("acl.sender", "leaky"), ("leak.reference", "leaky")),
        ),
    ),
    Scenario(
        "built_on_leak",
        "the leaky server relays the denied server's message, then builds on it",
        _built_on_leak,
        enforce=Expected(
            hidden=("leaked first",),
            findings=(("acl.sender", "leaky"), ("leak.reference", "leaky")),
        ),
        audit=Expected(
            reach=("leaked first",),
            findings=(("acl.sender", "leaky"), ("leak.reference", "leaky")),
        ),
    ),
    Scenario(
        "relayed_allowed",
        "the leaky server pushes an event written by another, allowed server",
        _relayed_allowed,
        enforce=Expected(reach=("pushed by someone else",), findings=(("leak.relayed", "leaky"),)),
    ),
    Scenario(
        "relayed_denied_join",
        "the leaky server passes on a join of a denied server's user",
        _relayed_denied_join,
        enforce=Expected(members=(("denied", "late", None),), findings=(("acl.sender", "leaky"),)),
        audit=Expected(members=(("denied", "late", "join"),), findings=(("acl.sender", "leaky"),)),
    ),
    Scenario(
        "built_on_denied",
        "the leaky server builds on the denied server's event and serves it when hs1 pulls",
        _built_on_denied,
        enforce=Expected(
            reach=("built on it",),
            hidden=("pulled from the leaky server",),
            findings=(("acl.sender", None),),
        ),
        audit=Expected(
            reach=("built on it", "pulled from the leaky server"), findings=(("acl.sender", None),)
        ),
    ),
    Scenario(
        "served_in_backfill",
        "hs1 joins a room the leaky server hosts and backfills history holding the denied server's events",
        _served_in_backfill,
        enforce=Expected(
            reach=("history 1", "history 2"),
            hidden=("history from the denied server",),
            findings=(("acl.sender", None),),
        ),
        audit=Expected(
            reach=("history 1", "history 2", "history from the denied server"),
            findings=(("acl.sender", None),),
        ),
    ),
    Scenario(
        "bad_signatures",
        "PDUs with a forged and with no signature",
        _bad_signatures,
        enforce=Expected(
            hidden=("forged signature", "no signature"), findings=(("signature.event", "leaky"),)
        ),
    ),
    Scenario(
        "malformed_transactions",
        "truncated, non-JSON, wrong-typed and 51-PDU transactions",
        _malformed_transactions,
        enforce=Expected(
            hidden=("one of 51 #0", "fine"), status=400, findings=(("malformed.request", "leaky"),)
        ),
    ),
    Scenario(
        "oversized_pdu",
        "a 70 KB PDU next to a normal one",
        _oversized_pdu,
        # Refused by its event ID: the edge's verdict (the hook) or the module's own check.
        enforce=Expected(
            reach=("next to a huge one",),
            hidden=("x" * 70_000,),
            findings=(("malformed.pdu", "leaky"),),
        ),
    ),
    Scenario(
        "edu_impersonation",
        "typing, receipt and presence EDUs for other servers' users",
        _edu_impersonation,
        enforce=Expected(status=200, findings=(("edu.impersonation", "leaky"),)),
    ),
    Scenario(
        "server_knock_edu",
        "an unknown server asks to be admitted (m.server.knock EDU): queued, not an offence",
        _server_knock_edu,
        enforce=Expected(status=200),
    ),
    Scenario(
        "restricted_join_abuse",
        "restricted joins authorised without invite power or by the wrong server",
        _restricted_join_abuse,
        # Both joins are refused by modgud's restricted-join check; the one signed by the
        # wrong server also fails the signature check.
        enforce=Expected(
            members=(("unknown", "mallory", None), ("unknown", "trudy", None)),
            findings=(("join.restricted", "leaky"), ("signature.event", "leaky")),
        ),
    ),
    Scenario(
        "forged_origin",
        "a request claiming the denied server's name, signed with another key",
        _forged_origin,
        enforce=Expected(status=401, findings=(("signature.request", None),)),
    ),
]


def run_scenario(topo: Topology, scenario: Scenario, settle: float = 2.0) -> Outcome:
    """Play a scenario and check every expectation; failures are collected, not raised."""
    stage = Stage(topo, scenario.room_version)
    expected = scenario.expected(topo.mode)
    outcome = Outcome(scenario, topo.mode, "")
    try:
        scenario.play(stage)
    except Exception as e:  # noqa: BLE001 - reported as the scenario's failure
        outcome.failures.append(f"playing failed: {e!r}")
        return outcome
    outcome.room_id = stage.room_id
    outcome.responses = stage.responses
    alice = topo.alice
    for body in expected.reach:
        if not alice.wait_for_message(stage.room_id, body, timeout=20):
            outcome.failures.append(f"hs1's users never saw {body!r}")
    for role, localpart, membership in expected.members:
        user_id = stage.user(role, localpart)

        def membership_is(uid: str = user_id, want: str | None = membership) -> bool:
            state = alice.get_state(stage.room_id, "m.room.member", uid)
            return (state or {}).get("membership") == want

        if not alice.wait_for(membership_is, timeout=15):
            state = alice.get_state(stage.room_id, "m.room.member", user_id)
            outcome.failures.append(
                f"{user_id}: membership {(state or {}).get('membership')!r}, expected {membership!r}"
            )
    if expected.status is not None and stage.responses:
        last = stage.responses[-1]
        if last.status != expected.status:
            outcome.failures.append(
                f"last request answered {last.status}, expected {expected.status}: {last.body}"
            )
    want = {(rule, stage.server_name(role) if role else None) for rule, role in expected.findings}
    txns = stage.txn_ids()

    def mine() -> list[dict[str, Any]]:
        return [f for f in topo.findings() if f["room_id"] == stage.room_id or f["txn_id"] in txns]

    deadline = time.monotonic() + 15
    while want - {(f["rule"], f["attributed_to"]) for f in mine()} and time.monotonic() < deadline:
        time.sleep(0.25)
    time.sleep(settle)  # late findings, late events
    outcome.findings = mine()
    # A scenario states what the edge and the hook find. With the outbound listener on
    # (the demo), findings about hs1's own requests come on top: shown, not compared.
    got = {
        (f["rule"], f["attributed_to"]) for f in outcome.findings if f["direction"] != "outbound"
    }
    if got != want:
        outcome.failures.append(
            f"findings {sorted(got, key=str)}, expected {sorted(want, key=str)}"
        )
    if topo.mode == "audit":
        acted = [f for f in outcome.findings if f["action"] != "flagged"]
        if acted:
            outcome.failures.append(
                f"audit mode acted: {[(f['rule'], f['action']) for f in acted]}"
            )
    seen = {
        e.get("content", {}).get("body")
        for e in alice.messages(stage.room_id)
        if e.get("type") == "m.room.message"
    }
    for body in expected.hidden:
        if body in seen:
            outcome.failures.append(f"hs1's users saw {body[:40]!r}")
    return outcome
