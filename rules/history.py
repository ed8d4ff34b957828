"""The history audit's decisions: a room's stored events, in the order the homeserver
keeps them (topological), judged against the room's state *at each event* — not today's.

modgud only sees what happens after it is installed; a room's history can answer whether
it had leaked before: events the homeserver accepted although their author's server was
refused in the room at that point (the room's ACL, server participation, the operator's
policy lists), and events built on them (spec: Server-Server API, "Server Access Control
Lists": a server that lets a denied server's events in is found by their prev_events).

`HistoryAudit.judge(event)` takes the events one by one, oldest first: it judges each
against the state in force before it, then applies the event to that state if it is one
of the state events the checks read. The same author check as the edge, the hook and the
Synapse module (`author_refusals`) and the same reference check (`check_references`)
decide; restricted joins are not judged from history (their authorisation depends on the
membership at the join's own auth state, which history reads only approximately).

What history cannot know is who *delivered* an event: blame is weaker than live. An
event refused at its point is blamed on
- the server the event index saw deliver it, when modgud was in the path (`delivered_by`:
  medium confidence);
- else the one remote server other than the author's that had members joined then and
  was not itself refused (low confidence: it is the only one that could have);
- else no one: the finding says how many servers could have.
An event built on a refused one is blamed on its own author's server (medium: it had the
leaked event, though it may have got it from another).

State events in history are applied in the order they are stored. An event refused by
the room's ACL or participation that the DAG does not place after the last change of
that kind (none of its prev_events descends from it: a fork from before the change, so
its server may not have seen it) is said to be of ambiguous order, with low confidence;
for events whose prev_events are older than the last `DAG_WINDOW` events, no deeper than
the change stands in for that. The operator's policy lists and spaces (MSC3216) change
along their own rooms' histories, interleaved by timestamp (`PolicyTimeline`).

Memory is bounded: the relevant state, the joined members per server, at most
`refused_limit` refused events and `DAG_WINDOW` recent events' place after the changes.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace
from typing import Any

from rules.checks import author_refusals, check_references
from rules.findings import Confidence, Finding, Rule, Severity
from rules.policy import (
    NO_POLICY,
    SERVER_RULE_TYPES,
    USER_RULE_TYPES,
    BanList,
    OperatorPolicy,
    authorise_server,
)
from rules.roomstate import (
    KNOCK_RULE_TYPES,
    PARTICIPATION_TYPES,
    RELEVANT_STATE_TYPES,
    SPACE_STATE_TYPES,
    RoomPolicy,
    room_policy_from_state,
)
from rules.servername import server_of_user

__all__ = ["HISTORY_RULES", "AuditedEvent", "HistoryAudit", "PolicyTimeline"]

# The live rule each history rule stands for.
HISTORY_RULES: Mapping[Rule, Rule] = {
    Rule.ACL_SENDER: Rule.HISTORY_ACL,
    Rule.PARTICIPATION_SENDER: Rule.HISTORY_PARTICIPATION,
    Rule.POLICY_SENDER: Rule.HISTORY_POLICY,
    Rule.POLICY_USER: Rule.HISTORY_POLICY_USER,
    Rule.LEAK_REFERENCE: Rule.HISTORY_REFERENCE,
}
# State the checks read, beside membership (kept apart, as joined members per server).
_TRACKED = RELEVANT_STATE_TYPES - {"m.room.member"}
# The room's own state changes a refusal comes from, by the rule refused: an event the
# DAG does not place after the last such change may have been sent before it existed.
_BARRIERS = ("acl", "participation")
_BARRIER_OF_TYPE: Mapping[str, int] = {
    "m.room.server_acl": 0,
    **{t: 1 for t in PARTICIPATION_TYPES | KNOCK_RULE_TYPES},
}
_BARRIER_OF_RULE: Mapping[Rule, int] = {Rule.ACL_SENDER: 0, Rule.PARTICIPATION_SENDER: 1}
# How many recent events' place after the changes is kept (prev_events name recent events),
# and how many of them a snapshot carries for resuming.
DAG_WINDOW = 20_000
SNAPSHOT_WINDOW = 1_000


@dataclass(frozen=True, slots=True)
class AuditedEvent:
    """One event's place in the history and what was found against it."""

    position: int  # 1 for the room's first event
    event_id: str | None
    findings: tuple[Finding, ...]


_RULE_TYPES = SERVER_RULE_TYPES | USER_RULE_TYPES


class PolicyTimeline:
    """The operator's policy as it was at each point of a room's history: the policy
    lists' rule events and the configured spaces' state events (both read from those
    rooms' own histories) applied in the order of their timestamps, up to the time of the
    event being judged.

    - Bans: the policy lists' rules in force then.
    - Spaces (MSC3216): a configured space's ACL and participation as they stood then,
      for a room that was reachable from the space then (m.space.child with a `via`,
      nested through the spaces whose histories were given, cycle-safe).

    A timestamp is its sender's claim and the rooms' histories interleave only by it, so
    a change is in force from the time it says it was made; an audited event older than
    one already passed is judged by the later state (the timeline only moves forward)."""

    def __init__(
        self,
        rule_events: Iterable[Mapping[str, Any]],
        space_events: Iterable[Mapping[str, Any]] = (),
        spaces: Iterable[str] = (),
    ) -> None:
        changes: list[tuple[bool, Mapping[str, Any]]] = []
        for is_space, events, types in (
            (False, rule_events, _RULE_TYPES),
            (True, space_events, SPACE_STATE_TYPES),
        ):
            for event in events:
                if (
                    isinstance(event.get("origin_server_ts"), int)
                    and event.get("type") in types
                    and isinstance(event.get("state_key"), str)
                    and isinstance(event.get("room_id"), str)
                ):
                    changes.append((is_space, event))
        changes.sort(key=lambda c: int(c[1]["origin_server_ts"]))
        self.changes = [event for _, event in changes]
        self._is_space = [is_space for is_space, _ in changes]
        self.spaces = tuple(spaces)
        self.applied = 0
        self._rules: dict[tuple[object, object, object], Mapping[str, Any]] = {}
        self._space_state: dict[str, dict[tuple[str, str], Mapping[str, Any]]] = {}

    def advance(self, ts: int, room_id: str, policy: OperatorPolicy) -> OperatorPolicy | None:
        """`policy` with the bans and the spaces binding `room_id` in force at `ts`, when
        they changed since the last call; else None."""
        rules_moved = spaces_moved = False
        while (
            self.applied < len(self.changes)
            and int(self.changes[self.applied]["origin_server_ts"]) <= ts
        ):
            e = self.changes[self.applied]
            if self._is_space[self.applied]:
                room = self._space_state.setdefault(str(e["room_id"]), {})
                room[(str(e["type"]), str(e["state_key"]))] = e
                spaces_moved = True
            else:
                self._rules[(e.get("room_id"), e.get("type"), e.get("state_key"))] = e
                rules_moved = True
            self.applied += 1
        if not (rules_moved or spaces_moved):
            return None
        if rules_moved:
            policy = replace(policy, bans=BanList.from_state(self._rules.values()))
        if spaces_moved:
            policy = replace(policy, spaces={room_id: self._binding(room_id)})
        return policy

    def _binding(self, room_id: str) -> tuple[RoomPolicy, ...]:
        """The configured spaces `room_id` is reachable from, as they stand now."""
        policies = {
            r: room_policy_from_state(r, list(s.values())) for r, s in self._space_state.items()
        }
        out = []
        for space_id in self.spaces:
            space = policies.get(space_id)
            if space is None:
                continue
            seen, frontier = {space_id}, list(space.space_children)
            while frontier:
                child = frontier.pop()
                if child == room_id:
                    out.append(space)
                    break
                if child in seen:
                    continue
                seen.add(child)
                sub = policies.get(child)
                frontier.extend(sub.space_children if sub is not None else ())
        return tuple(out)


class HistoryAudit:
    def __init__(
        self,
        room_id: str,
        local_server: str,
        policy: OperatorPolicy = NO_POLICY,
        *,
        refused_limit: int = 100_000,
        timeline: PolicyTimeline | None = None,
    ) -> None:
        """`policy`: the operator's settings; its bans are replaced, event by event, by
        those `timeline` says were in force (none before the first rule)."""
        self.room_id = room_id
        self.local_server = local_server
        self.timeline = timeline
        self.policy = policy if timeline is None else replace(policy, bans=BanList(), spaces={})
        self.refused_limit = refused_limit
        self.position = 0
        self.state: dict[tuple[str, str], dict[str, Any]] = {}
        self.joined: dict[str, str] = {}  # user → server, joined users only
        self.refused: OrderedDict[str, str] = OrderedDict()  # event ID → author server
        # per barrier: the last change (how many there were, its depth, its position)
        self.changes: list[tuple[int, int, int] | None] = [None] * len(_BARRIERS)
        # recent event ID → per barrier, how many of its changes the event descends from
        self.seen: OrderedDict[str, tuple[int, ...]] = OrderedDict()
        self._room: RoomPolicy | None = None

    # -- the state in force

    def room(self) -> RoomPolicy:
        if self._room is None:
            self._room = room_policy_from_state(self.room_id, list(self.state.values()))
        return self._room

    def joined_servers(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for server in self.joined.values():
            out[server] = out.get(server, 0) + 1
        return out

    def _seen_changes(self, event: Mapping[str, Any]) -> tuple[int, ...] | None:
        """Per barrier, how many of its changes the event descends from (through its
        prev_events); None when a prev_event is outside the window."""
        prevs = event.get("prev_events")
        if not isinstance(prevs, list):
            return None
        out = [0] * len(_BARRIERS)
        for prev in prevs:
            seen = self.seen.get(prev) if isinstance(prev, str) else None
            if seen is None:
                return None
            out = [max(a, b) for a, b in zip(out, seen, strict=True)]
        return tuple(out)

    def _place(self, event: Mapping[str, Any], seen: tuple[int, ...] | None) -> None:
        """Remember which changes the event descends from (itself one, if it is)."""
        event_id = event.get("event_id")
        if seen is None or not isinstance(event_id, str):
            return
        barrier = _BARRIER_OF_TYPE.get(str(event.get("type")))
        last = self.changes[barrier] if barrier is not None else None
        if barrier is not None and last is not None and last[2] == self.position:
            seen = tuple(last[0] if i == barrier else n for i, n in enumerate(seen))
        self.seen[event_id] = seen
        while len(self.seen) > DAG_WINDOW:
            self.seen.popitem(last=False)

    def _apply(self, event: Mapping[str, Any]) -> None:
        event_type, state_key = event.get("type"), event.get("state_key")
        if not isinstance(event_type, str) or not isinstance(state_key, str):
            return
        if event_type == "m.room.member":
            content = event.get("content")
            membership = content.get("membership") if isinstance(content, Mapping) else None
            server = server_of_user(state_key)
            if membership == "join" and server is not None:
                self.joined[state_key] = server
            else:
                self.joined.pop(state_key, None)
            return
        if event_type not in _TRACKED:
            return
        self.state[(event_type, state_key)] = {
            "type": event_type,
            "state_key": state_key,
            "sender": event.get("sender"),
            "event_id": event.get("event_id"),
            "content": event.get("content"),
        }
        self._room = None
        barrier = _BARRIER_OF_TYPE.get(event_type)
        if barrier is not None:
            depth = event.get("depth")
            count = (self.changes[barrier] or (0, 0, 0))[0] + 1
            self.changes[barrier] = (count, depth if isinstance(depth, int) else -1, self.position)

    # -- judging

    def judge(self, event: Mapping[str, Any], delivered_by: str | None = None) -> AuditedEvent:
        """The findings against `event` (the next in the history), judged by the state
        before it; then the state moves on. `delivered_by`: the server the event index
        saw deliver it, if any."""
        self.position += 1
        ts = event.get("origin_server_ts")
        if self.timeline is not None and isinstance(ts, int):
            moved = self.timeline.advance(ts, self.room_id, self.policy)
            if moved is not None:
                self.policy = moved
        seen = self._seen_changes(event)
        findings = self._findings(event, delivered_by, seen)
        self._apply(event)
        self._place(event, seen)
        event_id = event.get("event_id")
        return AuditedEvent(
            self.position, event_id if isinstance(event_id, str) else None, findings
        )

    def _findings(
        self, event: Mapping[str, Any], delivered_by: str | None, seen: tuple[int, ...] | None
    ) -> tuple[Finding, ...]:
        sender = event.get("sender")
        server = server_of_user(sender)
        if not isinstance(sender, str) or server is None or server == self.local_server:
            return ()
        event_id = event.get("event_id")
        eid = event_id if isinstance(event_id, str) else None
        event_type = event.get("type")
        kind = event_type if isinstance(event_type, str) else None
        room = self.room()
        reasons = author_refusals(
            sender, server, event_type, event.get("state_key"), None, room, self.policy
        )
        base = {
            "room_id": self.room_id,
            "event_id": eid,
            "event_type": kind,
            "sender": sender,
            "sender_server": server,
        }
        if reasons:
            if eid is not None:
                self.refused[eid] = server
                while len(self.refused) > self.refused_limit:
                    self.refused.popitem(last=False)
            out = []
            for rule, detail in reasons:
                blamed, confidence, why = self._blame(server, delivered_by, rule)
                ambiguous = self._ambiguous(event, rule, seen)
                out.append(
                    Finding(
                        HISTORY_RULES[rule],
                        Severity.HIGH,
                        f"position {self.position}: event written by {server}, refused then: "
                        f"{detail}; {why}{ambiguous}",
                        attributed_to=blamed,
                        confidence=Confidence.LOW if ambiguous else confidence,
                        **base,
                    )
                )
            return tuple(out)
        built_on = check_references(event, self.refused)
        if built_on is None:
            return ()
        return (
            Finding(
                Rule.HISTORY_REFERENCE,
                Severity.HIGH,
                f"position {self.position}: {built_on}; {server} had that event",
                attributed_to=server,
                confidence=Confidence.MEDIUM,
                **base,
            ),
        )

    def _blame(
        self, author: str, delivered_by: str | None, rule: Rule
    ) -> tuple[str | None, Confidence, str]:
        if delivered_by:
            return delivered_by, Confidence.MEDIUM, f"modgud saw {delivered_by} deliver it"
        if rule is not Rule.ACL_SENDER:
            # Homeservers enforce only the ACL against whoever delivers: past a policy list
            # or participation, the author's server may well have sent its event itself.
            return (
                author,
                Confidence.LOW,
                f"the homeserver does not enforce this itself: {author} may have sent it",
            )
        room = self.room()
        candidates = sorted(
            s
            for s in self.joined_servers()
            if s not in (author, self.local_server)
            and authorise_server(s, room, self.policy) is None
        )
        if len(candidates) == 1:
            return (
                candidates[0],
                Confidence.LOW,
                f"most likely brought in by {candidates[0]}, the only other server in the "
                "room then",
            )
        if not candidates:
            return None, Confidence.LOW, "no other server was in the room then: not attributable"
        return (
            None,
            Confidence.LOW,
            f"any of {len(candidates)} servers in the room then could have brought it in: "
            "not attributable",
        )

    def _ambiguous(self, event: Mapping[str, Any], rule: Rule, seen: tuple[int, ...] | None) -> str:
        """Why the event may have been sent before the change that refuses it, if it may:
        the DAG does not place it after the room's last change of that kind (or, past the
        window, it is no deeper than the change). Policy lists are ordered by time."""
        barrier = _BARRIER_OF_RULE.get(rule)
        last = self.changes[barrier] if barrier is not None else None
        if barrier is None or last is None:
            return ""
        count, change_depth, position = last
        what = f"the {_BARRIERS[barrier]} change at position {position}"
        if seen is not None:
            if seen[barrier] >= count:
                return ""
            return f" (order ambiguous: not built on {what}, which its server may not have seen)"
        depth = event.get("depth")
        if isinstance(depth, int) and depth <= change_depth:
            return f" (order ambiguous: concurrent with {what}, depth {change_depth})"
        return ""

    # -- resuming

    def snapshot(self) -> dict[str, Any]:
        """What resuming needs (JSON-able): the position, the tracked state, the joined
        members and the refused events."""
        return {
            "position": self.position,
            "state": list(self.state.values()),
            "joined": self.joined,
            "refused": list(self.refused.items()),
            "changes": self.changes,
            "seen": [[e, *n] for e, n in list(self.seen.items())[-SNAPSHOT_WINDOW:]],
            "policy_applied": self.timeline.applied if self.timeline is not None else 0,
        }

    @classmethod
    def restore(
        cls,
        snapshot: Mapping[str, Any],
        room_id: str,
        local_server: str,
        policy: OperatorPolicy = NO_POLICY,
        *,
        refused_limit: int = 100_000,
        timeline: PolicyTimeline | None = None,
    ) -> HistoryAudit:
        """The audit `snapshot` was taken of; `timeline` built again from the same policy
        rooms (it is moved on to where the snapshot's was)."""
        audit = cls(room_id, local_server, policy, refused_limit=refused_limit, timeline=timeline)
        applied = int(snapshot.get("policy_applied", 0))
        if timeline is not None and applied:
            ts = int(timeline.changes[applied - 1]["origin_server_ts"])
            audit.policy = timeline.advance(ts, room_id, audit.policy) or audit.policy
        audit.position = int(snapshot["position"])
        for event in snapshot["state"]:
            audit.state[(event["type"], event["state_key"])] = dict(event)
        audit.joined = dict(snapshot["joined"])
        audit.refused = OrderedDict((e, s) for e, s in snapshot["refused"])
        changes = snapshot.get("changes") or [None] * len(_BARRIERS)
        audit.changes = [tuple(int(x) for x in c) if c else None for c in changes]  # type: ignore[misc]
        audit.seen = OrderedDict(
            (e, tuple(int(x) for x in n)) for e, *n in snapshot.get("seen", [])
        )
        return audit
