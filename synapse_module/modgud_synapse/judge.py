"""What the Synapse module does apart from Synapse: the room cache and when it goes stale,
the decision (rules.checks.judge_event, exactly as the event hook decides), and the
decision's effects (findings into the shared store off Synapse's thread, metrics).
module.py wires this to Synapse's ModuleApi; nothing here imports Synapse, so the tests
drive it directly.

Written against modgud's source tree (`rules`, `proxy_addons`); the build carries those
into this package and points the imports there (synapse_module/setup.py).
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from proxy_addons.config import Config
from proxy_addons.metrics import ModuleMetrics
from proxy_addons.operatorpolicy import OperatorPolicySource
from proxy_addons.recording import describe_refusal, record_verdict
from proxy_addons.sources import FetchState
from proxy_addons.store import FindingStore, StateChange
from rules.checks import (
    ItemVerdict,
    StateUnavailable,
    apply_actions,
    check_invite,
    judge_event,
)
from rules.federation import MAX_PDU_BYTES
from rules.policy import SERVER_RULE_TYPES, USER_RULE_TYPES
from rules.roomstate import PARTICIPATION_TYPES, RELEVANT_STATE_TYPES, RoomPolicy
from rules.servername import server_of_user

__all__ = [
    "POLICY_STATE_FILTER",
    "ROOM_STATE_FILTER",
    "Answer",
    "ModuleJudge",
    "RoomCache",
    "thaw",
]

logger = logging.getLogger(__name__)

# The state a room's policy is built from, members aside: a big room's members are most
# of its state, and only a restricted join needs one of them (read when one comes).
ROOM_TYPES = frozenset(RELEVANT_STATE_TYPES - {"m.room.member"})
_ANY_KEY = PARTICIPATION_TYPES | {"m.space.child"}  # state key: a server, a room
ROOM_STATE_FILTER: tuple[tuple[str, str | None], ...] = tuple(
    sorted((t, None if t in _ANY_KEY else "") for t in ROOM_TYPES)
)
# Policy-list rooms and spaces: their rules, children, ACL and participation.
POLICY_STATE_FILTER: tuple[tuple[str, str | None], ...] = tuple(
    sorted({*ROOM_STATE_FILTER, *((t, None) for t in SERVER_RULE_TYPES | USER_RULE_TYPES)})
)
# How long a state event the module let through may take to show in Synapse's current
# state; one that never does was rejected or soft-failed.
PENDING_SECONDS = 30.0
# Senders remembered as allowed per cached room (then the memory starts again).
MAX_ALLOWED_SENDERS = 4096


def thaw(value: object) -> object:
    """Plain dicts and lists for whatever mapping and sequence types an event's content
    comes in (rules/ checks for dict and list)."""
    if isinstance(value, Mapping):
        return {str(k): thaw(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [thaw(v) for v in value]
    return value


@dataclass(slots=True)
class _Room:
    policy: RoomPolicy
    read_at: float
    # (type, state_key) -> (event ID, until when it may still show up)
    pending: dict[tuple[str, str], tuple[str, float]] = field(default_factory=dict)
    # Senders whose non-state events this policy and the operator's `allowed_under` let
    # through (the verdict memo: see RoomCache.allowed_senders).
    allowed: set[str] = field(default_factory=set)
    allowed_under: object = None


class RoomCache:
    """Rooms' policies as Synapse's current state says, members aside, read through the
    ModuleApi and kept per room (least recently used evicted).

    A room's entry serves every decision until a relevant state event (an ACL, power
    levels, join rules, participation, knock rule, space child, create) goes through the
    module and is let through. The module sees it before Synapse persists it, so from
    then on each decision in that room reads Synapse's state again — always the truth as
    Synapse has it — until the state read shows that event (persisted) or PENDING_SECONDS
    passed (Synapse rejected or soft-failed it). After `ttl` an entry is read again in any
    case: state can change without a new event passing the module (state resolution)."""

    def __init__(
        self,
        *,
        ttl: float = 300.0,
        max_rooms: int = 10_000,
        pending_seconds: float = PENDING_SECONDS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.ttl = ttl
        self.max_rooms = max_rooms
        self.pending_seconds = pending_seconds
        self._clock = clock
        self._rooms: OrderedDict[str, _Room] = OrderedDict()
        self._early: dict[str, dict[tuple[str, str], tuple[str, float]]] = {}

    def __len__(self) -> int:
        return len(self._rooms)

    def policies(self) -> list[RoomPolicy]:
        return [r.policy for r in list(self._rooms.values())]

    def get(self, room_id: str) -> RoomPolicy | None:
        """The room's policy when it can be used as it is; None: read the state."""
        room = self._rooms.get(room_id)
        if room is None or room.pending or self._clock() - room.read_at > self.ttl:
            return None
        self._rooms.move_to_end(room_id)
        return room.policy

    def allowed_senders(self, room: RoomPolicy, operator_policy: object) -> set[str] | None:
        """The senders whose non-state events `room` (this cache's current entry for its
        room) and `operator_policy` were found to let through: for such an event (not an
        m.room.member, not over the size limit) the decision reads nothing else (the
        sender's server against the ACL, participation and policy lists, the sender
        against the lists' user bans), so while both are the same objects the answer is
        the same. A new read of the room makes a new entry; a
        new operator policy starts the memory again. None: `room` is not the entry."""
        entry = self._rooms.get(room.room_id)
        if entry is None or entry.policy is not room:
            return None
        if entry.allowed_under is not operator_policy or len(entry.allowed) >= MAX_ALLOWED_SENDERS:
            entry.allowed = set()
            entry.allowed_under = operator_policy
        return entry.allowed

    def put(self, room_id: str, policy: RoomPolicy) -> None:
        """A fresh read of the room's state; pending changes it shows are settled."""
        now = self._clock()
        old = self._rooms.get(room_id)
        pending = dict(old.pending) if old is not None else self._early.pop(room_id, {})
        for key, (event_id, until) in list(pending.items()):
            shown = policy.state_ids is not None and policy.state_ids.get(key) == event_id
            if shown or now > until:
                del pending[key]
        self._rooms[room_id] = _Room(policy, now, pending)
        self._rooms.move_to_end(room_id)
        while len(self._rooms) > self.max_rooms:
            self._rooms.popitem(last=False)

    def note(self, event: Mapping[str, object]) -> bool:
        """A state event the module let through: True if it changes what the room's policy
        says (then the room is read again until Synapse's state shows it)."""
        event_type, state_key = event.get("type"), event.get("state_key")
        room_id, event_id = event.get("room_id"), event.get("event_id")
        if not (
            isinstance(event_type, str)
            and event_type in ROOM_TYPES
            and isinstance(state_key, str)
            and isinstance(room_id, str)
            and isinstance(event_id, str)
        ):
            return False
        room = self._rooms.get(room_id)
        if room is not None and room.policy.reflects(event):
            return False  # an old state event Synapse checks again (it pulled it)
        until = self._clock() + self.pending_seconds
        pending = room.pending if room is not None else self._early.setdefault(room_id, {})
        pending[(event_type, state_key)] = (event_id, until)
        if len(self._early) > self.max_rooms:
            self._early.pop(next(iter(self._early)))
        return True


@dataclass(frozen=True, slots=True)
class Answer:
    """What the module tells Synapse: refuse (with the reason) or not, and who decided."""

    refuse: bool
    reason: str
    decided_by: str  # local | module | malformed | error
    verdict: ItemVerdict | None = None


ALLOW_LOCAL = Answer(False, "", "local")
ALLOW_REMEMBERED = Answer(False, "", "module")


class ModuleJudge:
    """One Synapse process's judge: the room cache, the operator's policy (policy lists,
    spaces), the store the findings go to, and the metrics."""

    def __init__(
        self,
        config: Config,
        store: FindingStore,
        metrics: ModuleMetrics,
        fetch_state: FetchState,
        *,
        on_policy_event: Callable[[], None] = lambda: None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """`on_policy_event`: called when an event of a policy-list room or a space goes
        by, to refresh the operator's policy soon (once Synapse has persisted it)."""
        self.config = config
        self._on_policy_event = on_policy_event
        self.store = store
        self.metrics = metrics
        self.rooms = RoomCache(ttl=config.state_ttl_seconds, clock=clock)
        self.policy = OperatorPolicySource(config, fetch_state)
        metrics.watch_caches({"rooms": lambda: len(self.rooms)})
        metrics.policy_rules.set_function(lambda: len(self.policy.current.bans))
        metrics.store_queue.set_function(lambda: store.pending)

    def is_local(self, sender: object) -> bool:
        return server_of_user(sender) == self.config.server_name

    def decide(
        self,
        event: Mapping[str, object],
        room: RoomPolicy | None | StateUnavailable,
        *,
        pdu_bytes: int | None,
    ) -> Answer:
        """Judge an event (PDU format, with its event_id) as the hook would, record what
        was found, and say whether Synapse is to refuse it.

        A non-state event of a sender already let through under the same cached room
        policy and operator policy is let through again without judging (the verdict
        memo, RoomCache.allowed_senders): inside Synapse the decision's code runs with
        caches Synapse has made cold, four times slower than on its own."""
        config = self.config
        policy = self.policy.current
        sender = event.get("sender")
        allowed: set[str] | None = None
        if (
            isinstance(room, RoomPolicy)
            and "state_key" not in event
            and event.get("type") != "m.room.member"  # its content is read, state or not
            and pdu_bytes is not None
            and pdu_bytes <= MAX_PDU_BYTES
            and isinstance(sender, str)
        ):
            allowed = self.rooms.allowed_senders(room, policy)
            if allowed is not None and sender in allowed:
                return ALLOW_REMEMBERED
        verdict = judge_event(
            event,
            room,
            config.server_name,
            fail_open=config.fail_open,
            policy=policy,
            pdu_bytes=pdu_bytes,
        )
        decided_by = "module"
        if isinstance(room, StateUnavailable) and not verdict.refused:
            self.metrics.fail_open.labels("state").inc()
            logger.warning("no room state for %s, event passed unchecked", event.get("room_id"))
        refuse = record_verdict(self, verdict, enforcing=config.enforcing, endpoint="module")
        if (
            verdict.findings
            and not refuse
            and all(f.rule.startswith("malformed") for f in verdict.findings)
        ):
            decided_by = "malformed"
        if verdict.refused:
            logger.info(
                "%s %s",
                "refused" if refuse else "would refuse (audit)",
                describe_refusal(event, verdict.findings),
            )
        else:
            self.note(event)
            if allowed is not None and isinstance(sender, str) and not verdict.findings:
                allowed.add(sender)
        return Answer(refuse, verdict.reason or "refused", decided_by, verdict)

    def allow_local(self, event: Mapping[str, object]) -> Answer:
        """A local user's event: allowed at once, and noted (a moderator's ACL, say)."""
        self.note(event)
        return ALLOW_LOCAL

    def note(self, event: Mapping[str, object]) -> None:
        """An event let through: a state event that changes a room's policy has the room
        read again until Synapse's state shows it; one of a policy-list room or a space
        refreshes the operator's policy."""
        state_key, room_id, event_type = (
            event.get("state_key"),
            event.get("room_id"),
            event.get("type"),
        )
        if not (
            isinstance(state_key, str) and isinstance(room_id, str) and isinstance(event_type, str)
        ):
            return
        changed = self.rooms.note(event)
        watched = self.policy.watches(room_id, event_type)
        if watched:
            self._on_policy_event()
        # News for the edge (proxy_addons/changes.py), which never sees local users' state
        # events nor what Synapse pulls: a policy change, or a local user's membership
        # (restricted joins they may authorise).
        local_member = event_type == "m.room.member" and self.is_local(state_key)
        if changed or watched or local_member:
            event_id = event.get("event_id")
            self.store.record(
                [
                    StateChange(
                        time.time(),
                        room_id,
                        event_type,
                        state_key,
                        event_id if isinstance(event_id, str) else None,
                    )
                ]
            )

    def heard(self, changes: Iterable[tuple[Any, ...]]) -> int:
        """State changes another Synapse process's module recorded (store.state_changes_
        after rows: id, room, type, state key, event ID): with workers, a moderator's ACL
        goes through the main process's module, the federation traffic through a
        worker's. Each marks the room to be read again until this process's reads show
        the event, as for one this module let through itself; one of a policy-list room
        or a space refreshes the operator's policy. How many rooms changed."""
        changed = 0
        watched = False
        for _row, room_id, event_type, state_key, event_id in changes:
            event = {
                "room_id": room_id,
                "type": event_type,
                "state_key": state_key,
                "event_id": event_id,
            }
            changed += self.rooms.note(event)
            watched = watched or self.policy.watches(room_id, event_type)
        if watched:
            self._on_policy_event()
        return changed

    def decide_invite(
        self,
        inviter: str,
        invitee: str,
        room_id: str,
        room: RoomPolicy | None | StateUnavailable,
    ) -> Answer:
        """A local user invites `invitee`: refused when the invitee's server may not take
        part in the room (ACL, policy lists, participation)."""
        policy = self.policy.current
        verdict = apply_actions(
            check_invite(
                inviter, invitee, room, room_id, fail_open=self.config.fail_open, policy=policy
            ),
            policy,
        )
        refuse = record_verdict(self, verdict, enforcing=self.config.enforcing, endpoint="module")
        return Answer(refuse, verdict.reason or "refused", "module", verdict)
