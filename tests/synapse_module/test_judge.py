"""The module's judging apart from Synapse: the room cache and its staleness, the decision
(the hook's), its findings and its news for the edge."""

from __future__ import annotations

from dataclasses import replace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from modgud_synapse import judge as judge_module
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
from rules.checks import UNAVAILABLE, judge_event
from rules.policy import BanList
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
    assert [(room, kind, key) for _, room, kind, key, _ in changes] == [
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


def test_a_sender_let_through_is_remembered_while_the_room_and_the_policy_stay(
    make_judge, monkeypatch
):
    """The verdict memo: a non-state event of a sender let through under the cached room
    policy and the operator's policy is let through again without judging; a new read of
    the room, a new operator policy, a state event or an oversized one are judged."""
    judged = []
    real = judge_module.judge_event

    def counting(event, *args, **kwargs):
        judged.append(event["event_id"])
        return real(event, *args, **kwargs)

    monkeypatch.setattr(judge_module, "judge_event", counting)
    judge = make_judge()
    judge.rooms.put(ROOM, state(deny=()))
    room = judge.rooms.get(ROOM)
    assert not judge.decide(message("@x:bad.test", "$1"), room, pdu_bytes=100).refuse
    assert not judge.decide(message("@x:bad.test", "$2"), room, pdu_bytes=100).refuse
    assert judged == ["$1"]
    # Not the cache's entry (a policy read elsewhere): judged.
    assert not judge.decide(message("@x:bad.test", "$3"), state(deny=()), pdu_bytes=100).refuse
    # A state event, an oversized event: judged, whoever sent them before.
    topic = {**message("@x:bad.test", "$4"), "type": "m.room.topic", "state_key": ""}
    assert not judge.decide(topic, room, pdu_bytes=100).refuse
    member = {**message("@x:bad.test", "$4m"), "type": "m.room.member"}  # no state key
    judge.decide(member, room, pdu_bytes=100)
    assert judge.decide(message("@x:bad.test", "$5"), room, pdu_bytes=70_000).refuse
    assert judged == ["$1", "$3", "$4", "$4m", "$5"]
    # The operator's policy changes (a policy list bans the server): judged, refused.
    judge.policy.current = replace(judge.policy.current, bans=BanList(servers=["bad.test"]))
    assert judge.decide(message("@x:bad.test", "$6"), room, pdu_bytes=100).refuse
    assert judge.decide(message("@x:bad.test", "$7"), room, pdu_bytes=100).refuse
    # The room is read again with an ACL that denies the server.
    judge.policy.current = replace(judge.policy.current, bans=BanList())
    judge.rooms.put(ROOM, state(deny=("bad.test",)))
    assert judge.decide(message("@x:bad.test", "$8"), judge.rooms.get(ROOM), pdu_bytes=100).refuse
    assert judged == ["$1", "$3", "$4", "$4m", "$5", "$6", "$7", "$8"]
    # Refusals are not remembered: each is recorded.
    assert judge.store.flush(5)
    refused = [r["event_id"] for r in query_findings([judge.config.database])]
    assert sorted(refused) == ["$5", "$6", "$7", "$8"]


@settings(max_examples=200, deadline=None)
@given(
    steps=st.lists(
        st.one_of(
            st.tuples(
                st.just("event"),
                st.sampled_from(
                    ["@a:good.test", "@b:denied.test", "@c:other.test", "@spam:good.test"]
                ),
                st.booleans(),  # a state event
                st.sampled_from([100, 70_000]),
            ),
            st.tuples(st.just("acl"), st.sampled_from([(), ("denied.test",), ("*.test",)])),
            st.tuples(st.just("bans"), st.sampled_from([(), ("@spam:good.test",)])),
        ),
        max_size=30,
    )
)
def test_the_memo_answers_as_judging_every_event_would(tmp_path_factory, steps):
    """Whatever the order of events, ACL reads and policy-list changes, the module's
    answers with the memo are the answers of judge_event for each event."""
    tmp = tmp_path_factory.mktemp("memo")
    cfg = tmp / "modgud.yaml"
    cfg.write_text("server_name: hs.test\nupstream: http://127.0.0.1:1\ndatabase: m.db\n")
    config = load_config(cfg, secrets=False)
    store = FindingStore(config.database, start=False)

    async def no_state(room_id):
        return None

    judge = ModuleJudge(config, store, ModuleMetrics(CollectorRegistry()), no_state)
    judge.rooms.put(ROOM, state(deny=()))
    try:
        for n, step in enumerate(steps):
            if step[0] == "acl":
                judge.rooms.put(ROOM, state(acl_id=f"$acl{n}", deny=step[1]))
            elif step[0] == "bans":
                judge.policy.current = replace(judge.policy.current, bans=BanList(users=step[1]))
            else:
                _, sender, is_state, size = step
                event = message(sender, f"${n}")
                if is_state:
                    event = {**event, "type": "m.room.topic", "state_key": ""}
                room = judge.rooms.get(ROOM)
                expected = judge_event(
                    event,
                    room,
                    "hs.test",
                    fail_open=True,
                    policy=judge.policy.current,
                    pdu_bytes=size,
                )
                assert judge.decide(event, room, pdu_bytes=size).refuse is expected.refused
    finally:
        store.close()


def test_state_changes_of_other_synapse_processes_mark_the_room(make_judge):
    """With workers, a moderator's ACL goes through the main process's module and the
    federation traffic through a worker's: the worker hears of the change from the
    database and reads the room again until its reads show that event."""
    judge = make_judge(extra=f"policy: {{policy_lists: ['{ROOM}']}}\n")
    judge.rooms.put(ROOM, state())
    assert judge.heard([(7, ROOM, "m.room.server_acl", "", "$acl2")]) == 1
    assert judge.rooms.get(ROOM) is None  # read again
    assert not judge.policy_events
    # A policy-list room's rule: the operator's policy is read again.
    assert judge.heard([(8, ROOM, "m.policy.rule.server", "rule1", "$ban")]) == 0
    assert judge.policy_events
    judge.rooms.put(ROOM, state(acl_id="$acl2", deny=()))
    assert judge.rooms.get(ROOM) is not None  # the read shows it: settled
    # What the cached state shows already changes nothing; other types neither.
    assert judge.heard([(9, ROOM, "m.room.server_acl", "", "$acl2")]) == 0
    assert judge.heard([(10, ROOM, "m.room.topic", "", "$topic")]) == 0
    assert judge.rooms.get(ROOM) is not None
