"""The management room against real Synapse: modgud's bot posts knocks, grouped leaks and
answers; moderators — driven by mautrix, the client library the bot itself uses — approve
by reaction and command; a member without power is refused; a restart between a knock and
its approval neither repeats nor loses anything."""

from __future__ import annotations

import json
import sqlite3
import time
from typing import Any

import pytest

from proxy_addons.testbed.homeserver import ClientError
from proxy_addons.testbed.member import Member
from proxy_addons.testbed.peer import PeerError
from proxy_addons.testbed.topology import Topology

pytestmark = pytest.mark.e2e

DENY_HS2 = {"allow": ["*"], "deny": ["127.0.0.1"], "allow_ip_literals": True}


@pytest.fixture(scope="module")
def managed(tmp_path_factory):
    """A topology whose modgud runs the management room (the module judges inside hs1)."""
    topo = Topology(tmp_path_factory.mktemp("fed-management"), management=True)
    topo.start()
    yield topo
    topo.stop()


def member(topo: Topology, name: str) -> Member:
    return Member(topo.hs1.base_url, topo.tokens[name], topo.users[name], topo.management_room)


def bot_posts(member: Member, bot: str, starts: str) -> list[dict[str, Any]]:
    return member.posts(bot, starts)


def answers_to(member: Member, bot: str, event_id: str) -> list[dict[str, Any]]:
    return member.answers(bot, event_id)


def wait_for(predicate, timeout=30.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.5)
    return predicate()


def knocking_room(topo: Topology) -> str:
    """A room that asks unknown servers to knock (MSC4124 `active`)."""
    room_id = topo.alice.create_room(room_version="10")
    topo.alice.send_state(room_id, "m.server.knock_rule", "", {"rule": "active"})
    time.sleep(1.5)  # modgud refetches the room 1 s after the module heard of the rule
    return room_id


def knock(topo: Topology, room_id: str) -> None:
    edu = {"edu_type": "m.server.knock", "content": {"room_id": room_id}}
    assert topo.peer_send(topo.unknown, edus=[edu]).status == 200


def knock_message(topo: Topology, mod: Member, room_id: str) -> dict[str, Any]:
    posted = wait_for(
        lambda: [
            e
            for e in bot_posts(mod, topo.users["modgud"], f"Knock: {topo.unknown.name}")
            if room_id in e["content"]["body"]
        ]
    )
    assert posted, topo.modgud_log()[-3000:]
    return posted[0]


def joins(topo: Topology, room_id: str, user: str) -> bool:
    try:
        topo.peer_join(topo.unknown, user, room_id)
        return True
    except PeerError:
        return False


def test_a_knock_is_posted_and_a_moderators_reaction_approves_it(managed):
    """knock → a message in the management room (plain and HTML, with what modgud knows
    and the commands) → a moderator's ✅ → m.server.participation permitted in the room →
    the server joins and posts; the approval is answered in the knock's thread."""
    topo = managed
    mod = member(topo, "mod")
    room_id = knocking_room(topo)
    knock(topo, room_id)
    message = knock_message(topo, mod, room_id)
    content = message["content"]
    assert content["msgtype"] == "m.notice"
    assert content["format"] == "org.matrix.custom.html"
    assert f"<code>{topo.unknown.name}</code>" in content["formatted_body"]
    assert "modgud knows: nothing against it" in content["body"]
    assert f"!modgud approve {topo.unknown.name} {room_id}" in content["body"]

    mod.react(message["event_id"], "✅️")  # with the variation selector, as clients send it
    state = wait_for(
        lambda: _state(topo, room_id, "m.server.participation", topo.unknown.name), timeout=30
    )
    assert state is not None and state["participation"] == "permitted", topo.modgud_log()[-3000:]
    (answer,) = wait_for(lambda: answers_to(mod, topo.users["modgud"], message["event_id"]))
    assert answer["content"]["body"].startswith(f"Approved {topo.unknown.name} in {room_id}")
    assert topo.users["mod"] in answer["content"]["body"]

    assert wait_for(lambda: joins(topo, room_id, "newbie"), timeout=30), topo.modgud_log()[-3000:]
    user = topo.unknown.user("newbie")
    _, pdu = topo.peer.build_event(
        room_id, topo.unknown, user, "m.room.message", {"msgtype": "m.text", "body": "hi, approved"}
    )
    assert topo.peer_send(topo.unknown, [pdu]).status == 200
    assert topo.alice.wait_for_message(room_id, "hi, approved")
    knocks = [
        json.loads(x) for x in topo.cli("knocks", "--room", room_id, "--json").stdout.splitlines()
    ]
    assert [k["status"] for k in knocks] == ["approved"]


def _state(topo: Topology, room_id: str, event_type: str, state_key: str) -> dict[str, Any] | None:
    try:
        return topo.alice.get_state(room_id, event_type, state_key)
    except ClientError:
        return None


def test_a_member_without_power_is_refused_and_nothing_happens(managed):
    """`visitor` (level 0) sends approve and reacts ✅ on a knock: both are answered with
    a refusal naming the level needed, and no participation is written."""
    topo = managed
    mod, visitor = member(topo, "mod"), member(topo, "visitor")
    room_id = knocking_room(topo)
    knock(topo, room_id)
    message = knock_message(topo, mod, room_id)
    command = visitor.say(f"!modgud approve {topo.unknown.name} {room_id}")
    (refusal,) = wait_for(lambda: answers_to(mod, topo.users["modgud"], command))
    assert "power level 50 or more" in refusal["content"]["body"]
    assert "Nothing was done" in refusal["content"]["body"]
    visitor.react(message["event_id"], "✅")
    (refused,) = wait_for(lambda: answers_to(mod, topo.users["modgud"], message["event_id"]))
    assert "power level 50 or more" in refused["content"]["body"]
    assert _state(topo, room_id, "m.server.participation", topo.unknown.name) is None
    knocks = [
        json.loads(x) for x in topo.cli("knocks", "--room", room_id, "--json").stdout.splitlines()
    ]
    assert [k["status"] for k in knocks] == ["pending"]


def test_commands_are_answered_in_their_thread(managed):
    """help, knocks, findings, leaks, history and a bad command, each answered once in
    the command's thread; ban and unban write and remove a rule in the policy list."""
    topo = managed
    mod = member(topo, "mod")
    bot = topo.users["modgud"]
    sent = {
        "help": mod.say("!modgud help"),
        "knocks": mod.say("!modgud knocks"),
        "findings": mod.say("!modgud findings limit=3"),
        "leaks": mod.say("!modgud leaks"),
        "bad": mod.say("!modgud approve not-a-room"),
        "unknown": mod.say("!modgud frobnicate"),
        "history": mod.say(f"!modgud history {topo.space}"),
    }

    def all_answered() -> dict[str, list[dict[str, Any]]] | None:
        found = {k: answers_to(mod, bot, v) for k, v in sent.items()}
        return found if all(found.values()) else None

    answers = wait_for(all_answered)
    assert answers, topo.modgud_log()[-3000:]
    assert {k: len(v) for k, v in answers.items()} == dict.fromkeys(sent, 1)
    body = {k: v[0]["content"]["body"] for k, v in answers.items()}
    assert "!modgud approve SERVER ROOM|SPACE" in body["help"]
    assert body["knocks"].startswith(("No knocks are waiting", "1 knock", "2 knock", "3 knock"))
    assert "usage: !modgud approve" in body["bad"]
    assert "unknown command 'frobnicate'" in body["unknown"]
    assert body["history"].startswith(f"History of {topo.space}: ")
    assert "0 history finding(s): it has not leaked." in body["history"]

    ban = mod.say("!modgud ban evil.test spam from there")
    (banned,) = wait_for(lambda: answers_to(mod, bot, ban))
    assert banned["content"]["body"].startswith("Banned evil.test"), banned
    rule = topo.alice.get_state(topo.policy_room, "m.policy.rule.server", "rule:evil.test")
    assert rule == {"entity": "evil.test", "recommendation": "m.ban", "reason": "spam from there"}
    unban = mod.say("!modgud unban evil.test")
    (unbanned,) = wait_for(lambda: answers_to(mod, bot, unban))
    assert unbanned["content"]["body"].startswith("Unbanned evil.test")
    assert topo.alice.get_state(topo.policy_room, "m.policy.rule.server", "rule:evil.test") == {}


def test_a_leak_is_one_grouped_message_not_one_per_event(managed):
    """hs3 relays five events written by hs2, which the room's ACL denies: five findings
    blaming hs3, one message for the group (room, hs3, acl.sender) naming the events."""
    topo = managed
    mod = member(topo, "mod")
    room_id = topo.alice.create_room(room_version="10")
    for api, user in ((topo.bob, "bob"), (topo.carol, "carol")):
        api.join(room_id, via=[topo.hs1.server_name])
        assert topo.alice.wait_for(
            lambda u=user: topo.users[u] in topo.alice.joined_members(room_id)
        )
    topo.alice.send_state(room_id, "m.room.server_acl", "", DENY_HS2)
    time.sleep(1.5)
    events = []
    for n in range(5):
        event_id, pdu = topo.craft_message(room_id, "10", topo.hs2, topo.users["bob"], f"leak {n}")
        events.append(event_id)
        assert topo.send_transaction(topo.hs3, [pdu])[0] == 200
    topo.wait_for_findings(
        lambda r: {f["event_id"] for f in r if f["rule"] == "acl.sender"} >= set(events),
        room=room_id,
    )
    posted = wait_for(lambda: bot_posts(mod, topo.users["modgud"], f"Leak in {room_id}"))
    time.sleep(5)  # the bot's next rounds must not add more
    posted = bot_posts(mod, topo.users["modgud"], f"Leak in {room_id}")
    groups = [p["content"]["body"].split("\n")[0] for p in posted]
    assert len(groups) == len(set(groups)), groups  # one message per group
    (acl,) = [p for p in posted if "rule acl.sender" in p["content"]["body"]]
    body = acl["content"]["body"]
    assert f"blamed {topo.hs3.server_name}" in body
    assert f"event(s) by {topo.hs2.server_name}; confidence high" in body
    assert "unattributed" not in " ".join(groups)  # the edge's finding, not the module's
    # The events the message did not name yet are counted for the thread's follow-up.
    with sqlite3.connect(topo.database) as db:
        ((total,),) = db.execute(
            "SELECT total FROM management_groups WHERE room_id = ? AND rule = 'acl.sender'",
            (room_id,),
        ).fetchall()
    assert total == 5


def test_a_restart_between_knock_and_approval_repeats_and_loses_nothing(managed):
    """The knock is posted, modgud stops, a moderator reacts ✅ and asks for the knocks
    while it is down; after the restart the approval is made, the command answered once,
    and the knock is not posted again."""
    topo = managed
    mod = member(topo, "mod")
    bot = topo.users["modgud"]
    room_id = knocking_room(topo)
    knock(topo, room_id)
    message = knock_message(topo, mod, room_id)
    topo.kill_modgud()
    mod.react(message["event_id"], "✅")
    command = mod.say("!modgud knocks")
    time.sleep(1)
    topo.restart_modgud()
    state = wait_for(
        lambda: _state(topo, room_id, "m.server.participation", topo.unknown.name), timeout=60
    )
    assert state is not None and state["participation"] == "permitted", topo.modgud_log()[-3000:]
    assert len(wait_for(lambda: answers_to(mod, bot, command))) == 1
    assert len(wait_for(lambda: answers_to(mod, bot, message["event_id"]))) == 1
    time.sleep(5)  # a few more rounds of the bot: nothing is repeated
    knocks = [
        e
        for e in bot_posts(mod, bot, f"Knock: {topo.unknown.name}")
        if room_id in e["content"]["body"]
    ]
    assert len(knocks) == 1
    assert len(answers_to(mod, bot, command)) == 1
    assert len(answers_to(mod, bot, message["event_id"])) == 1


def test_space_power_levels_from_the_room_with_one_room_allowed_to_fail(managed):
    """`space powerlevels drift|sync` from the management room: a room where the room
    admin lacks power blocks the sync (nothing changes, the answer names it); allowed to
    fail, the other rooms get the space's levels merged in."""
    topo = managed
    mod = member(topo, "mod")
    bot = topo.users["modgud"]
    carol = topo.users["carol"]
    space, rooms, locked = topo.space_with_a_locked_room({"users": {carol: 50}, "ban": 60})
    own, older = rooms[0], rooms[1]
    before = topo.alice.get_state(own, "m.room.power_levels")

    drift = mod.say(f"!modgud space powerlevels drift {space}")
    (answer,) = wait_for(lambda: answers_to(mod, bot, drift))
    assert "3 differ" in answer["content"]["body"], answer["content"]["body"]
    assert answer["content"]["formatted_body"].startswith("<pre><code>")

    refused = mod.say(f"!modgud space powerlevels sync {space}")
    (answer,) = wait_for(lambda: answers_to(mod, bot, refused), timeout=60)
    assert "nothing changed" in answer["content"]["body"] and locked in answer["content"]["body"]
    assert topo.alice.get_state(own, "m.room.power_levels") == before

    synced = mod.say(f"!modgud space powerlevels sync {space} allow-fail={locked}")
    (answer,) = wait_for(lambda: answers_to(mod, bot, synced), timeout=60)
    assert f"skipped {locked}" in answer["content"]["body"], answer["content"]["body"]
    for room in (own, older):
        levels = topo.alice.get_state(room, "m.room.power_levels")
        assert levels is not None and levels["users"][carol] == 50 and levels["ban"] == 60
    locked_levels = topo.alice.get_state(locked, "m.room.power_levels")
    assert locked_levels is not None and carol not in locked_levels.get("users", {})


def test_an_alarm_is_posted_when_it_starts_and_when_it_ends(managed):
    """modgud restarted with a revoked admin token cannot read a room's state, and with
    on_error: open lets the leaky server's message through unchecked: the management
    room gets one alarm, and one "cleared" once a window passes without more."""
    topo = managed
    mod = member(topo, "mod")
    bot = topo.users["modgud"]
    room_id = topo.alice.create_room(room_version="10")
    topo.peer_join(topo.leaky, "lee", room_id)
    token = (topo.workdir / "admin.token").read_text()
    topo.kill_modgud()
    (topo.workdir / "admin.token").write_text("syt_revoked_token")
    try:
        topo.restart_modgud()
        user = topo.leaky.user("lee")
        _, pdu = topo.peer.build_event(
            room_id, topo.leaky, user, "m.room.message", {"msgtype": "m.text", "body": "unchecked"}
        )
        assert topo.peer_send(topo.leaky, [pdu]).status == 200
        unchecked = "events let through unchecked (on_error: open)"

        def posted(start: str) -> list[dict[str, Any]]:
            return [p for p in bot_posts(mod, bot, start) if unchecked in p["content"]["body"]]

        raised = wait_for(lambda: posted("⚠ Alarm on"), timeout=60)
        assert raised, topo.modgud_log()[-3000:]
        assert "<b>Alarm</b>" in raised[0]["content"]["formatted_body"]
        assert "item(s) let through unchecked" in raised[0]["content"]["body"]
        assert wait_for(lambda: posted("✔ Cleared on"), timeout=60)
        assert len(posted("⚠ Alarm on")) == 1  # raised once, not once a window
    finally:
        (topo.workdir / "admin.token").write_text(token)
        topo.restart_modgud()
