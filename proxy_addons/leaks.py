"""Leaks: what modgud remembers of refused events, and the `modgud leaks` report.

The reference detector needs, per room, the events written by servers refused there: an
event that names one in its prev_events or auth_events was built on a leak (the spec's own
advice for finding servers that break ACLs). They are kept in memory, bounded, fed by the
edge and the hook, and reloaded from the findings at start so a restart forgets nothing
recent.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Iterable
from typing import Any

from proxy_addons.database import DatabaseError, reading
from rules.findings import Finding, Rule, refuses_deliverer_only

__all__ = ["LEAK_RULES", "RefusedEvents", "query_leaks"]

logger = logging.getLogger(__name__)

# Findings that say "this event was written by a server refused in its room".
AUTHOR_REFUSED = frozenset(
    {
        Rule.ACL_ORIGIN,
        Rule.ACL_SENDER,
        Rule.POLICY_ORIGIN,
        Rule.POLICY_SENDER,
        Rule.PARTICIPATION_ORIGIN,
        Rule.PARTICIPATION_SENDER,
    }
)
# What `modgud leaks` reports: events that got (or tried to get) past a refusal through
# another server, events built on them, EDUs speaking for another server's users, our own
# server sending a room's events to a server refused in it, and events of refused servers
# served to our own server's pulls.
LEAK_RULES = (
    Rule.ACL_SENDER,
    Rule.POLICY_SENDER,
    Rule.PARTICIPATION_SENDER,
    Rule.POLICY_USER,
    Rule.LEAK_REFERENCE,
    Rule.EDU_IMPERSONATION,
    Rule.LEAK_OUTBOUND,
    Rule.LEAK_PULLED,
)

# What `modgud leaks` reports besides: leaks the history audit found in rooms' stored
# history (the management room does not post these as news: `history` answers them).
HISTORY_LEAK_RULES = (
    Rule.HISTORY_ACL,
    Rule.HISTORY_PARTICIPATION,
    Rule.HISTORY_POLICY,
    Rule.HISTORY_POLICY_USER,
    Rule.HISTORY_REFERENCE,
)


class RefusedEvents:
    def __init__(self, per_room: int = 2_000, max_rooms: int = 10_000) -> None:
        self.per_room = per_room
        self.max_rooms = max_rooms
        self.rooms: OrderedDict[str, OrderedDict[str, str]] = OrderedDict()

    def __len__(self) -> int:
        return sum(len(events) for events in self.rooms.values())

    def add(self, room_id: str, event_id: str, author: str) -> None:
        events = self.rooms.get(room_id)
        if events is None:
            events = self.rooms[room_id] = OrderedDict()
            while len(self.rooms) > self.max_rooms:
                self.rooms.popitem(last=False)
        self.rooms.move_to_end(room_id)
        events[event_id] = author
        while len(events) > self.per_room:
            events.popitem(last=False)

    def add_findings(self, findings: Iterable[Finding]) -> None:
        for f in findings:
            if f.rule not in AUTHOR_REFUSED or not (f.room_id and f.event_id and f.sender_server):
                continue
            if refuses_deliverer_only((f,)):
                continue  # a refused server delivered it, but another one wrote it
            self.add(f.room_id, f.event_id, f.sender_server)

    def load(self, path: str, limit: int = 100_000) -> int:
        """The newest refused events from a findings database (any action: in audit mode
        a flagged event is still one the room's policy refuses)."""
        rules = [str(r) for r in AUTHOR_REFUSED]
        marks = ", ".join("?" for _ in rules)
        sql = (
            "SELECT room_id, event_id, sender_server FROM findings "  # noqa: S608 - fixed
            f"WHERE rule IN ({marks}) AND event_id IS NOT NULL AND room_id IS NOT NULL "
            "AND sender_server IS NOT NULL ORDER BY ts DESC LIMIT ?"
        )
        try:
            with reading(path) as conn:
                rows = conn.tuples(sql, [*rules, limit])
        except DatabaseError as e:
            logger.warning("could not reload refused events: %s", e)
            return 0
        for room_id, event_id, author in reversed(rows):
            self.add(room_id, event_id, author)
        return len(rows)


def query_leaks(
    paths: Iterable[str], *, room: str | None = None, since: float | None = None
) -> list[dict[str, Any]]:
    """Per room and blamed server: the leaked events, how much evidence, how sure, when."""
    rules = [str(r) for r in (*LEAK_RULES, *HISTORY_LEAK_RULES)]
    where = [f"rule IN ({', '.join('?' for _ in rules)})"]
    params: list[Any] = list(rules)
    if room:
        where.append("room_id = ?")
        params.append(room)
    if since is not None:
        where.append("ts >= ?")
        params.append(since)
    sql = (
        "SELECT room_id, attributed_to, rule, event_id, sender_server, confidence, ts, action "  # noqa: S608
        "FROM findings WHERE " + " AND ".join(where)
    )
    groups: dict[tuple[str, str], dict[str, Any]] = {}
    rank = {"low": 0, "medium": 1, "high": 2}
    for path in paths:
        with reading(path) as conn:
            rows = conn.dicts(sql, params)
        for r in rows:
            key = (r["room_id"] or "-", r["attributed_to"] or "(not attributable)")
            g = groups.setdefault(
                key,
                {
                    "room_id": key[0],
                    "blamed": key[1],
                    "events": set(),
                    "authors": set(),
                    "rules": set(),
                    "evidence": 0,
                    "confidence": "low",
                    "first_seen": r["ts"],
                    "last_seen": r["ts"],
                    "refused": 0,
                },
            )
            if r["event_id"]:
                g["events"].add(r["event_id"])
            if r["sender_server"]:
                g["authors"].add(r["sender_server"])
            g["rules"].add(r["rule"])
            g["evidence"] += 1
            g["refused"] += r["action"] in ("dropped", "rejected")
            if rank.get(r["confidence"], 0) > rank[g["confidence"]]:
                g["confidence"] = r["confidence"]
            g["first_seen"] = min(g["first_seen"], r["ts"])
            g["last_seen"] = max(g["last_seen"], r["ts"])
    out = []
    for g in groups.values():
        out.append(
            {
                **g,
                "events": sorted(g["events"]),
                "authors": sorted(g["authors"]),
                "rules": sorted(g["rules"]),
            }
        )
    out.sort(key=lambda g: (g["room_id"], -g["evidence"]))
    return out
