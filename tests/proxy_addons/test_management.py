"""The management room's memory and decisions: the outbox, acted-on commands, the leader
lease and the leak groups' rate limit. The memory's tests run on both engines (an SQLite
file and a real PostgreSQL, tests/pg.py); the bot against real Synapse is in
tests/e2e/test_management.py."""

import pytest

from proxy_addons.database import writing
from proxy_addons.management import (
    LEAK_REOPEN_SECONDS,
    LeakGroup,
    Memory,
    Post,
    group_key,
    plan_leak_posts,
    txn_for,
)
from proxy_addons.store import FindingRecord, FindingStore, KnockRecord


@pytest.fixture
def memory(target):
    with writing(target):
        pass  # migrated
    return Memory(target)


def record(rule, event_id, blamed):
    return FindingRecord(
        ts=1.0,
        rule=rule,
        action="dropped",
        severity="high",
        direction="inbound",
        room_id="!r",
        event_id=event_id,
        event_type="m.room.message",
        sender="@u:d.test",
        sender_server="d.test",
        origin=blamed,
        attributed_to=blamed,
        confidence="high",
        endpoint="send",
        txn_id=None,
        detail="",
    )


def finding(n, rule="acl.sender", room="!r", blamed="relay.test", event=None, ts=100.0):
    return {
        "id": n,
        "ts": ts,
        "rule": rule,
        "room_id": room,
        "event_id": event or f"$e{n}",
        "sender_server": "denied.test",
        "attributed_to": blamed,
        "confidence": "high",
        "detail": "relayed",
    }


def test_the_lease_has_one_holder_until_it_expires_or_is_released(memory):
    """Two bots (replicas): the first takes the lease, the second waits until it expires
    or is released; renewing keeps it."""
    assert memory.lead("a", now=1000.0, ttl=30)
    assert not memory.lead("b", now=1010.0, ttl=30)
    assert memory.lead("a", now=1020.0, ttl=30)  # renewed to 1050
    assert not memory.lead("b", now=1049.0, ttl=30)
    assert memory.lead("b", now=1051.0, ttl=30)  # expired: taken over
    assert not memory.lead("a", now=1052.0, ttl=30)
    memory.release("b")
    assert memory.lead("a", now=1053.0, ttl=30)


def test_the_outbox_keeps_a_message_until_it_is_marked_sent(memory):
    """A message is in the outbox before it is sent and stays there (to be sent again
    with the same transaction ID) until marked; then what it is about is known by its
    event ID."""
    post = Post(txn_for("knock", "!r s.test"), "knock", "!r s.test", {"body": "Knock"})
    memory.record([post], now=1.0)
    memory.record([post], now=2.0)  # recorded twice (a crash before the cursor moved): once
    assert memory.unsent() == [post]
    assert memory.message_of("knock", "!r s.test") is None
    memory.mark_sent(post.txn_id, "$sent", now=3.0)
    assert memory.unsent() == []
    assert memory.about("$sent") == ("knock", "!r s.test")
    assert memory.message_of("knock", "!r s.test") == "$sent"


def test_a_command_is_acted_on_once(memory):
    """begin() says whether to act; once record(acted=) marked it done, never again —
    but a command begun and not finished (a crash in between) is acted on again."""
    assert memory.begin("$cmd", "command", "@mod:x", now=1.0)
    assert memory.begin("$cmd", "command", "@mod:x", now=2.0)  # not done yet
    memory.record([], now=3.0, acted="$cmd")
    assert not memory.begin("$cmd", "command", "@mod:x", now=4.0)


def test_cursors_and_groups_move_with_their_posts(memory):
    memory.record(
        [Post("t1", "leak", "k", {})],
        now=5.0,
        cursors={"findings": "42"},
        groups=[LeakGroup("k", "!r", "relay.test", "acl.sender", "t1", 5.0, 0, 3)],
    )
    assert memory.cursor("findings") == "42"
    assert memory.groups() == {
        "k": LeakGroup("k", "!r", "relay.test", "acl.sender", "t1", 5.0, 0, 3)
    }
    assert memory.group_message("k") is None
    memory.mark_sent("t1", "$group", now=6.0)
    assert memory.group_message("k") == "$group"


def test_new_knocks_are_the_pending_ones_not_yet_posted(memory):
    """What the knock queue holds and the outbox does not; a decided knock is not new."""
    store = FindingStore(memory.database)
    store.record([KnockRecord(1.0, "!a", "one.test"), KnockRecord(2.0, "!b", "two.test", "banned")])
    store.record([record("acl.origin", "$x", "two.test")])
    store.close()
    knocks = memory.new_knocks()
    assert [(k["room_id"], k["server"]) for k in knocks] == [("!a", "one.test"), ("!b", "two.test")]
    assert knocks[1]["policy_match"] == "banned" and knocks[1]["findings"] == 1
    memory.record([Post(txn_for("knock", "!a one.test"), "knock", "!a one.test", {})], now=4.0)
    assert [k["server"] for k in memory.new_knocks()] == ["two.test"]


def test_leak_findings_are_read_after_the_cursor_and_only_leak_rules(memory):
    store = FindingStore(memory.database)
    rows = [
        record(rule, f"${rule}", "r.test")
        for rule in ("acl.sender", "acl.origin", "leak.reference")
    ]
    store.record(rows)
    store.close()
    found = memory.leak_findings(0)
    assert [f["rule"] for f in found] == ["acl.sender", "leak.reference"]  # acl.origin: no leak
    assert memory.leak_findings(found[0]["id"])[0]["rule"] == "leak.reference"
    assert memory.latest_finding() >= found[-1]["id"]


# -- the rate limit, a pure function --------------------------------------------------------


def test_a_new_group_gets_one_message_for_all_its_events():
    posts, groups = plan_leak_posts(
        [finding(1), finding(2), finding(3)], {}, now=1000.0, interval=600
    )
    (post,) = posts
    assert post.kind == "leak" and "3 event(s) by denied.test" in post.content["body"]
    (group,) = groups
    assert (group.key, group.first_txn, group.last_posted, group.unposted, group.total) == (
        group_key(finding(1)),
        post.txn_id,
        1000.0,
        0,
        3,
    )


def test_groups_are_per_room_blamed_server_and_rule():
    rows = [
        finding(1),
        finding(2, rule="leak.reference"),
        finding(3, blamed="other.test"),
        finding(4, room="!s"),
    ]
    posts, groups = plan_leak_posts(rows, {}, now=1.0, interval=600)
    assert len(posts) == len(groups) == 4


def test_events_within_the_interval_are_counted_then_posted_once_in_the_thread():
    _, (group,) = plan_leak_posts([finding(1)], {}, now=1000.0, interval=600)
    known = {group.key: group}
    posts, (counted,) = plan_leak_posts([finding(2), finding(3)], known, now=1100.0, interval=600)
    assert posts == [] and (counted.unposted, counted.total, counted.last_posted) == (2, 3, 1000.0)
    posts, changed = plan_leak_posts([], {group.key: counted}, now=1500.0, interval=600)
    assert posts == [] and changed == []  # still within the interval: nothing to say
    posts, (after,) = plan_leak_posts([], {group.key: counted}, now=1601.0, interval=600)
    (followup,) = posts
    assert followup.kind == "count" and followup.item == group.key
    assert followup.content["body"].startswith("2 more event(s) of this leak since")
    assert "(3 in all)" in followup.content["body"]
    assert (after.unposted, after.last_posted, after.first_txn) == (0, 1601.0, group.first_txn)


def test_a_group_quiet_for_a_day_gets_a_new_message():
    _, (group,) = plan_leak_posts([finding(1)], {}, now=0.0, interval=600)
    posts, (again,) = plan_leak_posts(
        [finding(2)], {group.key: group}, now=LEAK_REOPEN_SECONDS + 1, interval=600
    )
    (post,) = posts
    assert post.kind == "leak" and again.first_txn == post.txn_id != group.first_txn
    assert again.total == 2


def test_a_finding_without_an_event_id_still_counts():
    posts, (group,) = plan_leak_posts([finding(1, event="")], {}, now=1.0, interval=600)
    assert group.total == 1 and len(posts) == 1


def make_bot(tmp_path, **options):
    from proxy_addons.config import load_config
    from proxy_addons.management import ManagementBot

    (tmp_path / "bot.token").write_text("t")
    (tmp_path / "modgud.yaml").write_text(
        "server_name: hs.test\nupstream: http://127.0.0.1:1\n"
        "management: {room: '!m:hs.test', access_token_file: bot.token}\n"
    )
    return ManagementBot(load_config(tmp_path / "modgud.yaml"), **options)


async def test_a_command_that_fails_unforeseen_is_answered_not_retried_for_ever(tmp_path):
    """An exception nobody foresaw in a command becomes its answer (and is logged), so the
    command is marked done instead of blocking every later one behind it."""
    bot = make_bot(tmp_path)

    async def boom():
        raise RuntimeError("the homeserver said something odd")

    answer = await bot.guarded(boom(), "ban")
    assert answer.plain.startswith("ban failed: RuntimeError: the homeserver said something odd")
    await bot.close()


async def test_alarms_count_from_start_and_one_not_posted_is_posted_later(tmp_path):
    """A fail-open before the bot's first look is in its first window (the counters start
    at zero with the process); an alarm whose message could not be sent (the homeserver
    down) is sent in the next round, and then not again. (The room is not reached here:
    `send` is replaced; tests/e2e/test_management.py posts alarms into real Synapse.)"""
    from prometheus_client import CollectorRegistry

    from proxy_addons.metrics import Metrics

    registry = CollectorRegistry()
    metrics = Metrics(registry)
    now = [1000.0]
    bot = make_bot(tmp_path, registry=registry, clock=lambda: now[0])
    metrics.fail_open.labels("state").inc()  # before the bot ever looked
    sent: list[str] = []
    down = [True]

    async def send(content, txn_id):
        if down[0]:
            raise OSError("homeserver unreachable")
        sent.append(content["body"])
        return "$x"

    bot.send = send
    await bot.watch_alarms()
    assert sent == []  # within the first window
    now[0] += 61
    with pytest.raises(OSError):
        await bot.watch_alarms()
    down[0] = False
    await bot.watch_alarms()  # the same window, evaluated again: posted now
    assert len(sent) == 1 and "events let through unchecked" in sent[0]
    now[0] += 61
    await bot.watch_alarms()  # a quiet window: cleared, once
    now[0] += 61
    await bot.watch_alarms()
    assert [body.split(" on ")[0] for body in sent] == ["⚠ Alarm", "✔ Cleared"]
    await bot.close()
