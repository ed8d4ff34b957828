"""The module's judging apart from Synapse: the room cache and its staleness, the decision
(the hook's), its findings and its news for the edge."""

from __future__ import annotations

import pytest
from modgud_synapse.judge import (
    POLICY_STATE_FILTER,
    ROOM_STATE_FILTER,
    ModuleJudge,
    RoomCache,
    thaw,
)
from prometheus_client import CollectorRegistry

from proxy_addons.config import load_config
from proxy_addons.metrics import ModuleMetrics
from proxy_addons.store import FindingStore, news_after, query_findings
from rules.checks import UNAVAILABLE
from rules.roomstate import RELEVANT_STATE_TYPES, room_policy_from_state

ROOM = "!room:hs.test"


def state(acl_id="$acl1", deny=("denied.test",), **extra):
    events = [
        {
            "type": "m.room.create",
            "state_key": "",
            "event_id": "$create",
            "sender": "@a:hs.test",
            "content": {"room_version": "10"},
        },
        {
            "type": "m.room.server_acl",
            "state_key": "",
            "event_id": acl_id,
            "content": {"allow": ["*"], "deny": list(deny)},
        },
    ]
    return room_policy_from_state(ROOM, events)


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


def acl_event(event_id="$acl2", room=ROOM):
    return {
        "type": "m.room.server_acl",
        "state_key": "",
        "event_id": event_id,
        "room_id": room,
        "sender": "@mod:hs.test",
        "content": {"allow": ["*"], "deny": []},
    }


def test_a_cached_room_serves_until_its_ttl():
    clock = Clock()
    cache = RoomCache(ttl=30, clock=clock)
    assert cache.get(ROOM) is None
    policy = state()
    cache.put(ROOM, policy)
    assert cache.get(ROOM) is policy
    clock.now += 31
    assert cache.get(ROOM) is None


def test_a_relevant_state_event_makes_the_room_read_until_synapse_shows_it():
    """The module sees a state event before Synapse persists it: until a read of the
    state shows that very event, the room is read again for every decision."""
    clock = Clock()
    cache = RoomCache(ttl=300, clock=clock)
    cache.put(ROOM, state())
    assert cache.note(acl_event("$acl2"))
    assert cache.get(ROOM) is None  # read again
    cache.put(ROOM, state())  # Synapse has not persisted it yet
    assert cache.get(ROOM) is None
    shown = state(acl_id="$acl2", deny=())
    cache.put(ROOM, shown)
    assert cache.get(ROOM) is shown


def test_a_state_event_that_never_shows_stops_mattering_after_a_while():
    """Rejected or soft-failed by Synapse, it never shows in the state: after the pending
    window the room is cached again."""
    clock = Clock()
    cache = RoomCache(ttl=300, pending_seconds=30, clock=clock)
    cache.put(ROOM, state())
    cache.note(acl_event("$never"))
    clock.now += 31
    cache.put(ROOM, state())
    assert cache.get(ROOM) is not None


def test_a_state_event_for_a_room_not_cached_yet_is_remembered_for_its_first_read():
    cache = RoomCache(clock=Clock())
    assert cache.note(acl_event("$acl2"))
    cache.put(ROOM, state())
    assert cache.get(ROOM) is None


def test_events_that_change_nothing_do_not_invalidate():
    """Members (not cached), non-state events, events of other types, and an old state
    event Synapse checks again (it is the one in the state already)."""
    cache = RoomCache(clock=Clock())
    policy = state()
    cache.put(ROOM, policy)
    member = {
        "type": "m.room.member",
        "state_key": "@u:x.test",
        "event_id": "$m",
        "room_id": ROOM,
        "content": {"membership": "join"},
    }
    topic = {"type": "m.room.topic", "state_key": "", "event_id": "$t", "room_id": ROOM}
    message = {"type": "m.room.message", "event_id": "$x", "room_id": ROOM}
    again = acl_event("$acl1")
    for event in (member, topic, message, again):
        assert not cache.note(event)
    assert cache.get(ROOM) is policy


def test_the_state_filters_cover_what_the_policy_is_built_from():
    """Every relevant state type but members is read; policy rooms add the rule types."""
    types = {t for t, _ in ROOM_STATE_FILTER}
    assert types == RELEVANT_STATE_TYPES - {"m.room.member"}
    assert ("m.room.server_acl", "") in ROOM_STATE_FILTER
    assert ("m.server.participation", None) in ROOM_STATE_FILTER
    assert ("m.policy.rule.server", None) in POLICY_STATE_FILTER


def test_thaw_gives_plain_dicts_and_lists():
    from types import MappingProxyType

    frozen = MappingProxyType({"allow": ("a", MappingProxyType({"b": (1,)}))})
    assert thaw(frozen) == {"allow": ["a", {"b": [1]}]}


@pytest.fixture
def make_judge(tmp_path):
    made = []

    def make(mode="enforce", on_error="open", extra=""):
        cfg = tmp_path / f"modgud-{len(made)}.yaml"
        cfg.write_text(
            f"server_name: hs.test\nupstream: http://127.0.0.1:1\nmode: {mode}\n"
            f"on_error: {on_error}\ndatabase: m{len(made)}.db\n" + extra
        )
        config = load_config(cfg, secrets=False)
        store = FindingStore(config.database, flush_interval=0.02, start=False)

        async def no_state(room_id):
            return None

        events = []
        judge = ModuleJudge(
            config,
            store,
            ModuleMetrics(CollectorRegistry()),
            no_state,
            on_policy_event=lambda: events.append(1),
        )
        judge.policy_events = events
        made.append(store)
        return judge

    yield make
    for store in made:
        store.close()


def message(sender, event_id="$e"):
    return {
        "type": "m.room.message",
        "room_id": ROOM,
        "sender": sender,
        "event_id": event_id,
        "content": {"body": "hi"},
    }


def test_decide_refuses_and_records_as_the_hook_does(make_judge):
    judge = make_judge()
    refused = judge.decide(message("@x:denied.test", "$bad"), state(), pdu_bytes=100)
    assert refused.refuse and "denied by the room's server ACL" in refused.reason
    allowed = judge.decide(message("@x:good.test", "$ok"), state(), pdu_bytes=100)
    assert not allowed.refuse and allowed.decided_by == "module"
    assert judge.store.flush(5)
    rows = list(query_findings([judge.config.database]))
    assert [
        (r["rule"], r["action"], r["event_id"], r["endpoint"], r["attributed_to"]) for r in rows
    ] == [("acl.sender", "dropped", "$bad", "module", None)]
    sample = judge.metrics.registry.get_sample_value(
        "modgud_findings_total", {"rule": "acl.sender", "action": "dropped", "severity": "high"}
    )
    assert sample == 1


def test_audit_records_flagged_and_never_refuses(make_judge):
    judge = make_judge(mode="audit")
    answer = judge.decide(message("@x:denied.test"), state(), pdu_bytes=100)
    assert not answer.refuse and answer.verdict.refused
    assert judge.store.flush(5)
    assert [r["action"] for r in query_findings([judge.config.database])] == ["flagged"]


@pytest.mark.parametrize(("on_error", "refuse"), [("open", False), ("closed", True)])
def test_unavailable_state_follows_on_error(make_judge, on_error, refuse):
    judge = make_judge(on_error=on_error)
    assert judge.decide(message("@x:good.test"), UNAVAILABLE, pdu_bytes=100).refuse is refuse
    opened = judge.metrics.registry.get_sample_value("modgud_fail_open_total", {"where": "state"})
    assert (opened or 0) == (0 if refuse else 1)


def test_an_oversized_event_is_refused_whatever_the_state(make_judge):
    judge = make_judge()
    answer = judge.decide(message("@x:good.test"), UNAVAILABLE, pdu_bytes=70_000)
    assert answer.refuse and "over the 65536-byte PDU limit" in answer.reason


def test_local_events_are_allowed_and_their_state_changes_are_news_for_the_edge(make_judge):
    """A moderator's ACL (local, allowed at once) marks the room for reading again and is
    recorded for the edge; a local user's membership too; a remote message is not."""
    judge = make_judge()
    judge.rooms.put(ROOM, state())
    assert not judge.allow_local(acl_event("$acl2")).refuse
    assert judge.rooms.get(ROOM) is None
    judge.allow_local(
        {
            "type": "m.room.member",
            "state_key": "@mod:hs.test",
            "event_id": "$j",
            "room_id": ROOM,
            "sender": "@mod:hs.test",
            "content": {"membership": "join"},
        }
    )
    judge.decide(message("@x:good.test"), state(), pdu_bytes=100)
    assert judge.store.flush(5)
    changes, _ = news_after(judge.config.database, 0, 0, ["acl.sender"])
    assert [(room, kind, key) for _, room, kind, key in changes] == [
        (ROOM, "m.room.server_acl", ""),
        (ROOM, "m.room.member", "@mod:hs.test"),
    ]


def test_a_refused_state_event_changes_nothing(make_judge):
    """Synapse soft-fails what the module refuses: it never becomes state."""
    judge = make_judge()
    judge.rooms.put(ROOM, state())
    judge.decide({**acl_event("$evil"), "sender": "@x:denied.test"}, state(), pdu_bytes=100)
    assert judge.rooms.get(ROOM) is not None


def test_an_event_of_a_policy_list_room_refreshes_the_policy(make_judge):
    judge = make_judge(extra="policy: {policy_lists: ['!bans:hs.test']}\n")
    rule = {
        "type": "m.policy.rule.server",
        "state_key": "rule1",
        "event_id": "$r",
        "room_id": "!bans:hs.test",
        "sender": "@mod:hs.test",
        "content": {"entity": "evil.test", "recommendation": "m.ban"},
    }
    judge.allow_local(rule)
    assert judge.policy_events == [1]


def test_invites_to_refused_servers_are_refused(make_judge):
    judge = make_judge()
    assert judge.decide_invite("@a:hs.test", "@b:denied.test", ROOM, state()).refuse
    assert not judge.decide_invite("@a:hs.test", "@b:good.test", ROOM, state()).refuse
