"""The history audit's decisions (rules/history.py): each event judged by the room's state
at that point, events built on refused ones, blame as far as history can tell, ambiguous
order, bounded memory and resuming."""

import json

import pytest

from rules.findings import Confidence, Rule
from rules.history import HistoryAudit
from rules.policy import BanList, OperatorPolicy

ROOM = "!room:hs.test"
LOCAL = "hs.test"
DENY_EVIL = {"allow": ["*"], "deny": ["evil.test"], "allow_ip_literals": True}


class History:
    """A room's history as the admin API gives it (federation format), built in order."""

    def __init__(self):
        self.events = []

    def add(self, sender, event_type="m.room.message", state_key=None, content=None, **extra):
        n = len(self.events) + 1
        event = {
            "event_id": f"$e{n}",
            "room_id": ROOM,
            "type": event_type,
            "sender": sender,
            "content": content if content is not None else {"body": f"m{n}"},
            "depth": extra.pop("depth", n),
            "prev_events": extra.pop(
                "prev_events", [self.events[-1]["event_id"]] if self.events else []
            ),
            "auth_events": [],
            **extra,
        }
        if state_key is not None:
            event["state_key"] = state_key
        self.events.append(event)
        return event["event_id"]

    def join(self, user):
        return self.add(user, "m.room.member", user, {"membership": "join"})

    def audit(self, policy=None, **kw):
        audit = HistoryAudit(ROOM, LOCAL, policy or OperatorPolicy(local_server=LOCAL), **kw)
        return [audit.judge(e) for e in self.events], audit


def room(*members):
    h = History()
    h.add(
        "@alice:hs.test", "m.room.create", "", {"room_version": "10", "creator": "@alice:hs.test"}
    )
    h.join("@alice:hs.test")
    for m in members:
        h.join(m)
    return h


def found(results):
    return [
        (r.event_id, f.rule, f.attributed_to, f.confidence) for r in results for f in r.findings
    ]


def test_an_acl_added_halfway_counts_only_for_the_events_after_it():
    h = room("@eve:evil.test", "@bob:relay.test")
    before = h.add("@eve:evil.test")
    h.add("@alice:hs.test", "m.room.server_acl", "", DENY_EVIL)
    after = h.add("@eve:evil.test")
    results, _ = h.audit()
    assert [(e, r) for e, r, _, _ in found(results)] == [(after, Rule.HISTORY_ACL)]
    assert before not in {e for e, *_ in found(results)}
    (finding,) = [f for r in results for f in r.findings]
    assert finding.sender_server == "evil.test" and finding.room_id == ROOM
    assert finding.detail.startswith(f"position {len(h.events)}: event written by evil.test")


def test_an_event_built_on_a_leaked_one_is_found_and_blamed_on_its_author():
    h = room("@eve:evil.test", "@bob:relay.test")
    h.add("@alice:hs.test", "m.room.server_acl", "", DENY_EVIL)
    leaked = h.add("@eve:evil.test")
    builder = h.add("@bob:relay.test", prev_events=[leaked])
    results, _ = h.audit()
    assert found(results) == [
        (leaked, Rule.HISTORY_ACL, "relay.test", Confidence.LOW),  # the only other server
        (builder, Rule.HISTORY_REFERENCE, "relay.test", Confidence.MEDIUM),
    ]


@pytest.mark.parametrize(
    ("members", "delivered_by", "blamed", "confidence", "says"),
    [
        (["@bob:relay.test"], None, "relay.test", Confidence.LOW, "the only other server"),
        (["@bob:relay.test", "@carl:other.test"], None, None, Confidence.LOW, "any of 2 servers"),
        ([], None, None, Confidence.LOW, "no other server was in the room"),
        (
            ["@bob:relay.test", "@carl:other.test"],
            "other.test",
            "other.test",
            Confidence.MEDIUM,
            "modgud saw other.test",
        ),
        # A server refused itself cannot have brought it in (it could not deliver either).
        (
            ["@bob:relay.test", "@mal:evil.test"],
            None,
            "relay.test",
            Confidence.LOW,
            "the only other",
        ),
    ],
)
def test_blame_goes_as_far_as_history_can_tell(members, delivered_by, blamed, confidence, says):
    h = room("@eve:evil.test", *members)
    h.add("@alice:hs.test", "m.room.server_acl", "", DENY_EVIL)
    leaked = h.add("@eve:evil.test")
    audit = HistoryAudit(ROOM, LOCAL, OperatorPolicy(local_server=LOCAL))
    for event in h.events[:-1]:
        audit.judge(event)
    (finding,) = audit.judge(h.events[-1], delivered_by=delivered_by).findings
    assert (finding.event_id, finding.attributed_to, finding.confidence) == (
        leaked,
        blamed,
        confidence,
    )
    assert says in finding.detail


def test_an_event_the_dag_does_not_place_after_the_acl_is_of_ambiguous_order():
    """Stored after the ACL, deeper than it, but built on the event before it (a fork):
    its server may have sent it before the ACL existed. Found, with low confidence, and
    the finding says so; an event built on the ACL is not ambiguous."""
    h = room("@eve:evil.test", "@bob:relay.test")
    before = h.add("@bob:relay.test")
    acl = h.add("@alice:hs.test", "m.room.server_acl", "", DENY_EVIL)
    acl_position = len(h.events)
    forked = h.add("@eve:evil.test", prev_events=[before], depth=h.events[-1]["depth"] + 5)
    after = h.add("@eve:evil.test", prev_events=[forked, acl])
    results, _ = h.audit()
    by_event = {r.event_id: r.findings for r in results if r.findings}
    (ambiguous,) = by_event[forked]
    assert ambiguous.confidence is Confidence.LOW
    assert (
        f"order ambiguous: not built on the acl change at position {acl_position}"
        in ambiguous.detail
    )
    acl_finding = next(f for f in by_event[after] if f.rule is Rule.HISTORY_ACL)
    assert "order ambiguous" not in acl_finding.detail


def test_past_the_window_the_order_is_judged_by_depth(monkeypatch):
    """A prev_event the audit no longer remembers: no deeper than the ACL is ambiguous."""
    import rules.history

    monkeypatch.setattr(rules.history, "DAG_WINDOW", 2)
    h = room("@eve:evil.test", "@bob:relay.test")
    h.add("@alice:hs.test", "m.room.server_acl", "", DENY_EVIL)
    acl = len(h.events)
    for _ in range(3):
        h.add("@bob:relay.test")
    shallow = h.add("@eve:evil.test", prev_events=["$e1"], depth=acl)
    deep = h.add("@eve:evil.test", prev_events=["$e1"], depth=acl + 1)
    results, _ = h.audit()
    details = {r.event_id: r.findings[0].detail for r in results if r.findings}
    assert f"concurrent with the acl change at position {acl}, depth {acl}" in details[shallow]
    assert "order ambiguous" not in details[deep]


def test_only_the_change_behind_the_refusal_makes_it_ambiguous():
    """Built on the ACL, concurrent with a later participation change that refuses
    nothing of it: the ACL finding is not ambiguous."""
    h = room("@eve:evil.test", "@bob:relay.test")
    h.add("@alice:hs.test", "m.room.server_acl", "", DENY_EVIL)
    acl = h.events[-1]["event_id"]
    h.add("@alice:hs.test", "m.server.participation", "relay.test", {"participation": "permitted"})
    leaked = h.add("@eve:evil.test", prev_events=[acl], depth=h.events[-1]["depth"] + 1)
    results, _ = h.audit()
    (finding,) = [f for r in results if r.event_id == leaked for f in r.findings]
    assert "order ambiguous" not in finding.detail


def test_participation_and_policy_lists_and_banned_users():
    h = room("@p:permitted.test", "@n:newbie.test", "@spam:ok.test")
    h.add("@alice:hs.test", "m.server.knock_rule", "", {"rule": "active"})
    h.add(
        "@alice:hs.test", "m.server.participation", "permitted.test", {"participation": "permitted"}
    )
    fine = h.add("@p:permitted.test")
    unpermitted = h.add("@n:newbie.test")
    banned_user = h.add("@spam:ok.test")
    policy = OperatorPolicy(
        local_server=LOCAL, bans=BanList(servers=["ok.test"], users=["@spam:ok.test"])
    )
    results, _ = h.audit(policy)
    rules = {(e, r) for e, r, _, _ in found(results)}
    assert (unpermitted, Rule.HISTORY_PARTICIPATION) in rules
    assert (banned_user, Rule.HISTORY_POLICY) in rules and (
        banned_user,
        Rule.HISTORY_POLICY_USER,
    ) in rules
    assert fine not in {e for e, _ in rules}
    # Homeservers enforce neither: the author's server may have sent its event itself.
    blamed = {(e, r): b for e, r, b, _ in found(results)}
    assert blamed[(unpermitted, Rule.HISTORY_PARTICIPATION)] == "newbie.test"


def test_the_local_servers_own_events_are_never_judged():
    h = room()
    h.add("@alice:hs.test", "m.room.server_acl", "", {"allow": ["other.test"], "deny": []})
    h.add("@alice:hs.test")  # hs.test is not in the allow list, but it is ours
    results, _ = h.audit()
    assert found(results) == []


def test_a_benign_history_has_no_finding():
    h = room("@bob:relay.test", "@carl:other.test")
    for n in range(20):
        h.add(["@bob:relay.test", "@carl:other.test", "@alice:hs.test"][n % 3])
    results, _ = h.audit()
    assert found(results) == [] and [r.position for r in results] == list(
        range(1, len(h.events) + 1)
    )


def test_memory_is_bounded_by_the_refused_limit():
    h = room("@eve:evil.test")
    h.add("@alice:hs.test", "m.room.server_acl", "", DENY_EVIL)
    for _ in range(50):
        h.add("@eve:evil.test")
    _, audit = h.audit(refused_limit=10)
    assert len(audit.refused) == 10 and f"$e{len(h.events)}" in audit.refused


def test_a_resumed_audit_finds_what_one_run_finds():
    """Snapshot after any event, restore (as after a restart), go on: the same findings."""
    h = room("@eve:evil.test", "@bob:relay.test")
    h.add("@eve:evil.test")
    h.add("@alice:hs.test", "m.room.server_acl", "", DENY_EVIL)
    leaked = h.add("@eve:evil.test")
    h.add("@bob:relay.test", prev_events=[leaked])
    h.add("@alice:hs.test", "m.room.member", "@bob:relay.test", {"membership": "leave"})
    h.add("@eve:evil.test")
    whole, _ = h.audit()
    for cut in range(len(h.events)):
        first = HistoryAudit(ROOM, LOCAL, OperatorPolicy(local_server=LOCAL))
        head = [first.judge(e) for e in h.events[:cut]]
        again = HistoryAudit.restore(
            json.loads(json.dumps(first.snapshot())),
            ROOM,
            LOCAL,
            OperatorPolicy(local_server=LOCAL),
        )
        tail = [again.judge(e) for e in h.events[cut:]]
        assert head + tail == whole, cut


def test_hostile_events_are_judged_without_raising():
    """History is whatever servers wrote: wrong types become no finding, never an error."""
    audit = HistoryAudit(ROOM, LOCAL)
    for event in (
        {},
        {"sender": 5},
        {"sender": "@x:evil.test", "type": ["m.room.message"]},
        {
            "sender": "@x:evil.test",
            "type": "m.room.member",
            "state_key": "@x:evil.test",
            "content": "join",
        },
        {"sender": "@x:evil.test", "prev_events": "nope", "depth": "deep"},
        {
            "sender": "@x:evil.test",
            "type": "m.room.server_acl",
            "state_key": "",
            "content": {"deny": 3},
        },
    ):
        audit.judge(event)
    assert audit.position == 6


def rule_event(ts, entity, state_key, recommendation="m.ban", kind="m.policy.rule.server"):
    content = {"entity": entity, "recommendation": recommendation, "reason": "r"} if entity else {}
    return {
        "room_id": "!bans:hs.test",
        "type": kind,
        "state_key": state_key,
        "content": content,
        "origin_server_ts": ts,
    }


def test_policy_list_rules_count_from_when_they_were_made_until_removed():
    """A ban made at t=2000 and lifted at t=4000: only the server's events between count."""
    from rules.history import PolicyTimeline

    h = room("@s:spam.test", "@bob:relay.test")
    times = {}
    for ts in (1000, 3000, 5000):  # each on the room's first event, not on each other
        times[ts] = h.add("@s:spam.test", origin_server_ts=ts, prev_events=["$e1"])
    timeline = PolicyTimeline(
        [rule_event(4000, None, "rule:spam"), rule_event(2000, "spam.test", "rule:spam")]
    )
    audit = HistoryAudit(ROOM, LOCAL, OperatorPolicy(local_server=LOCAL), timeline=timeline)
    results = [audit.judge(e) for e in h.events]
    assert [(e, r) for e, r, _, _ in found(results)] == [(times[3000], Rule.HISTORY_POLICY)]


def assert_resumes_anywhere(events, policy, timeline, expected):
    """Cut the run before every event, snapshot (through JSON, as the cursor is stored),
    restore and go on: the results are those of one run through."""
    for cut in range(len(events)):
        first = HistoryAudit(ROOM, LOCAL, policy, timeline=timeline())
        head = [first.judge(e) for e in events[:cut]]
        snapshot = json.loads(json.dumps(first.snapshot()))
        again = HistoryAudit.restore(snapshot, ROOM, LOCAL, policy, timeline=timeline())
        assert head + [again.judge(e) for e in events[cut:]] == expected, cut


def test_a_resumed_audit_follows_the_policy_lists_from_where_it_was():
    from rules.history import PolicyTimeline

    def timeline():
        return PolicyTimeline(
            [rule_event(2000, "spam.test", "rule:spam"), rule_event(6000, None, "rule:spam")]
        )

    h = room("@s:spam.test")
    for ts in (1000, 3000, 5000, 7000):
        h.add("@s:spam.test", origin_server_ts=ts, prev_events=["$e1"])
    policy = OperatorPolicy(local_server=LOCAL)
    whole = HistoryAudit(ROOM, LOCAL, policy, timeline=timeline())
    expected = [whole.judge(e) for e in h.events]
    assert_resumes_anywhere(h.events, policy, timeline, expected)
    assert len([f for r in expected for f in r.findings]) == 2  # at 3000 and 5000


SPACE, SUBSPACE = "!space:hs.test", "!sub:hs.test"


def space_event(ts, room_id, event_type, state_key, content):
    return {
        "room_id": room_id,
        "type": event_type,
        "state_key": state_key,
        "content": content,
        "origin_server_ts": ts,
        "sender": "@alice:hs.test",
        "event_id": f"$s{ts}",
    }


def evil_at(h, *times):
    return {ts: h.add("@eve:evil.test", origin_server_ts=ts, prev_events=["$e1"]) for ts in times}


def test_a_space_acl_binds_the_room_only_while_the_room_is_in_the_space():
    """MSC3216 along the history: linked at 2000, the space's ACL set at 3000, the link
    removed at 6000. Only evil.test's event at 4000 was refused then."""
    from rules.history import PolicyTimeline

    h = room("@eve:evil.test", "@bob:relay.test")
    times = evil_at(h, 1000, 2500, 4000, 7000)
    timeline = PolicyTimeline(
        [],
        [
            space_event(6000, SPACE, "m.space.child", ROOM, {}),  # unlinked: no via
            space_event(3000, SPACE, "m.room.server_acl", "", DENY_EVIL),
            space_event(2000, SPACE, "m.space.child", ROOM, {"via": ["hs.test"]}),
        ],
        [SPACE],
    )
    audit = HistoryAudit(ROOM, LOCAL, OperatorPolicy(local_server=LOCAL), timeline=timeline)
    results = [audit.judge(e) for e in h.events]
    assert [(e, r) for e, r, _, _ in found(results)] == [(times[4000], Rule.HISTORY_ACL)]
    (finding,) = [f for r in results for f in r.findings]
    assert f"space {SPACE}" in finding.detail


def test_a_space_binds_through_a_subspace_and_its_participation_counts():
    """space → subspace → room, the space's participation denying evil.test from 2000; the
    subspace drops the room at 5000. A space not configured binds nothing."""
    from rules.history import PolicyTimeline

    h = room("@eve:evil.test")
    times = evil_at(h, 1500, 3000, 6000)
    events = [
        space_event(1000, SPACE, "m.space.child", SUBSPACE, {"via": ["hs.test"]}),
        space_event(1100, SUBSPACE, "m.space.child", ROOM, {"via": ["hs.test"]}),
        space_event(1200, SUBSPACE, "m.space.child", SPACE, {"via": ["hs.test"]}),  # a cycle
        space_event(2000, SPACE, "m.server.participation", "evil.test", {"participation": "deny"}),
        space_event(5000, SUBSPACE, "m.space.child", ROOM, {"via": []}),
    ]
    audit = HistoryAudit(
        ROOM,
        LOCAL,
        OperatorPolicy(local_server=LOCAL),
        timeline=PolicyTimeline([], events, [SPACE]),
    )
    results = [audit.judge(e) for e in h.events]
    assert [(e, r) for e, r, _, _ in found(results)] == [(times[3000], Rule.HISTORY_PARTICIPATION)]
    unconfigured = HistoryAudit(
        ROOM, LOCAL, OperatorPolicy(local_server=LOCAL), timeline=PolicyTimeline([], events, [])
    )
    assert not found([unconfigured.judge(e) for e in h.events])


def test_a_resumed_audit_follows_the_spaces_from_where_it_was():
    from rules.history import PolicyTimeline

    def timeline():
        return PolicyTimeline(
            [rule_event(2500, "spam.test", "rule:spam")],
            [
                space_event(2000, SPACE, "m.space.child", ROOM, {"via": ["hs.test"]}),
                space_event(3000, SPACE, "m.room.server_acl", "", DENY_EVIL),
                space_event(6000, SPACE, "m.room.server_acl", "", {"allow": ["*"]}),
                {"room_id": SPACE, "type": "m.room.server_acl", "state_key": ""},  # no ts: ignored
                {"type": "m.space.child", "state_key": ROOM, "origin_server_ts": 1},  # no room
            ],
            [SPACE],
        )

    h = room("@eve:evil.test", "@s:spam.test")
    evil_at(h, 1000, 4000, 7000)
    h.add("@s:spam.test", origin_server_ts=7500, prev_events=["$e1"])
    policy = OperatorPolicy(local_server=LOCAL)
    whole = HistoryAudit(ROOM, LOCAL, policy, timeline=timeline())
    expected = [whole.judge(e) for e in h.events]
    assert [r for _, r, _, _ in found(expected)] == [Rule.HISTORY_ACL, Rule.HISTORY_POLICY]
    assert_resumes_anywhere(h.events, policy, timeline, expected)
