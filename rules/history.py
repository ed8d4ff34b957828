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

State events in history are applied in the order they are stored; an event refused only
because of a state change it is concurrent with (its depth not above the change's) is
said to be of ambiguous order, with low confidence. Memory is bounded: the relevant
state, the joined members per server, and at most `refused_limit` refused events.
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
from rules.roomstate import RELEVANT_STATE_TYPES, RoomPolicy, room_policy_from_state
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


@dataclass(frozen=True, slots=True)
class AuditedEvent:
    """One event's place in the history and what was found against it."""

    position: int  # 1 for the room's first event
    event_id: str | None
    findings: tuple[Finding, ...]


_RULE_TYPES = SERVER_RULE_TYPES | USER_RULE_TYPES


class PolicyTimeline:
    """The operator's policy lists as they were at each point: their rule events (from
    the policy rooms' own histories) applied in the order of their timestamps, up to the
    time of the event being judged. A timestamp is its sender's claim and the two rooms'
    histories interleave only by it, so a rule is in force from the time it says it was
    made; an audited event older than one already passed is judged by the later rules
    (the lists only move forward)."""

    def __init__(self, events: Iterable[Mapping[str, Any]]) -> None:
        changes = []
        for event in events:
            ts, event_type = event.get("origin_server_ts"), event.get("type")
            if (
                isinstance(ts, int)
                and event_type in _RULE_TYPES
                and isinstance(event.get("state_key"), str)
            ):
                changes.append(event)
        self.changes = sorted(changes, key=lambda e: int(e["origin_server_ts"]))
        self.applied = 0
        self._state: dict[tuple[object, object, object], Mapping[str, Any]] = {}

    def advance(self, ts: int) -> BanList | None:
        """The bans in force at `ts` when they changed since the last call, else None."""
        start = self.applied
        while (
            self.applied < len(self.changes)
            and int(self.changes[self.applied]["origin_server_ts"]) <= ts
        ):
            e = self.changes[self.applied]
            self._state[(e.get("room_id"), e.get("type"), e.get("state_key"))] = e
            self.applied += 1
        if self.applied == start:
            return None
        return BanList.from_state(self._state.values())


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
        self.policy = policy if timeline is None else replace(policy, bans=BanList())
        self.refused_limit = refused_limit
        self.position = 0
        self.state: dict[tuple[str, str], dict[str, Any]] = {}
        self.joined: dict[str, str] = {}  # user → server, joined users only
        self.refused: OrderedDict[str, str] = OrderedDict()  # event ID → author server
        self.change_depth = -1  # depth of the last state change the checks read
        self.change_position = 0
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
        depth = event.get("depth")
        self.change_depth = depth if isinstance(depth, int) else self.change_depth
        self.change_position = self.position

    # -- judging

    def judge(self, event: Mapping[str, Any], delivered_by: str | None = None) -> AuditedEvent:
        """The findings against `event` (the next in the history), judged by the state
        before it; then the state moves on. `delivered_by`: the server the event index
        saw deliver it, if any."""
        self.position += 1
        ts = event.get("origin_server_ts")
        if self.timeline is not None and isinstance(ts, int):
            bans = self.timeline.advance(ts)
            if bans is not None:
                self.policy = replace(self.policy, bans=bans)
                self._room = None
        findings = self._findings(event, delivered_by)
        self._apply(event)
        event_id = event.get("event_id")
        return AuditedEvent(
            self.position, event_id if isinstance(event_id, str) else None, findings
        )

    def _findings(self, event: Mapping[str, Any], delivered_by: str | None) -> tuple[Finding, ...]:
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
            ambiguous = self._ambiguous(event)
            out = []
            for rule, detail in reasons:
                blamed, confidence, why = self._blame(server, delivered_by, rule)
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

    def _ambiguous(self, event: Mapping[str, Any]) -> str:
        depth = event.get("depth")
        if isinstance(depth, int) and self.change_depth >= 0 and depth <= self.change_depth:
            return (
                f" (order ambiguous: concurrent with the state change at position "
                f"{self.change_position}, depth {self.change_depth})"
            )
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
            "change": [self.change_depth, self.change_position],
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
            bans = timeline.advance(int(timeline.changes[applied - 1]["origin_server_ts"]))
            if bans is not None:
                audit.policy = replace(audit.policy, bans=bans)
        audit.position = int(snapshot["position"])
        for event in snapshot["state"]:
            audit.state[(event["type"], event["state_key"])] = dict(event)
        audit.joined = dict(snapshot["joined"])
        audit.refused = OrderedDict((e, s) for e, s in snapshot["refused"])
        audit.change_depth, audit.change_position = (int(x) for x in snapshot["change"])
        return audit
