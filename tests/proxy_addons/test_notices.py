"""What the management room says and understands: messages with both bodies, commands
parsed or refused with a usage line, reactions read as decisions."""

import json

import pytest

from proxy_addons.notices import (
    Command,
    CommandError,
    in_thread,
    is_command,
    knock_message,
    leak_message,
    parse_command,
    reaction_decision,
)

ROOM = "!abc:hs.test"
V12_ROOM = "!31hneApxJ_1o-63DmFrpeqnkFfWppnzWso1JvH3ogLM"


@pytest.mark.parametrize(
    ("body", "command"),
    [
        ("!modgud", Command("help")),
        ("!modgud help", Command("help")),
        ("  !MODGUD   knocks ", Command("knocks")),
        (f"!modgud approve s.test {ROOM}", Command("approve", room=ROOM, server="s.test")),
        # Either order: the room is the argument that starts with "!".
        (f"!modgud approve {ROOM} s.test", Command("approve", room=ROOM, server="s.test")),
        (
            f"!modgud deny s.test:8448 {V12_ROOM} spam, sorry",
            Command("deny", room=V12_ROOM, server="s.test:8448", reason="spam, sorry"),
        ),
        ("!modgud leaks", Command("leaks")),
        (f"!modgud leaks {ROOM}", Command("leaks", room=ROOM)),
        (
            f"!modgud findings room={ROOM} rule=acl since=1h limit=5",
            Command(
                "findings",
                room=ROOM,
                options={"room": ROOM, "rule": "acl", "since": "1h", "limit": "5"},
            ),
        ),
        (
            "!modgud ban *.evil.test 'spam wave'",
            Command("ban", server="*.evil.test", reason="spam wave"),
        ),
        ("!modgud unban evil.test", Command("unban", server="evil.test")),
        (f"!modgud history {ROOM}", Command("history", room=ROOM)),
        (
            f"!modgud space powerlevels sync {ROOM} allow-fail=!x:y allow-fail=!z:y",
            Command(
                "space",
                room=ROOM,
                options={"allow_fail": "!x:y !z:y"},
                words=("powerlevels", "sync"),
            ),
        ),
        (
            f"!modgud space bans drift {ROOM}",
            Command("space", room=ROOM, options={"allow_fail": ""}, words=("bans", "drift")),
        ),
    ],
)
def test_commands(body, command):
    assert parse_command(body) == command


@pytest.mark.parametrize(
    ("body", "error"),
    [
        ("!modgud frobnicate", "unknown command 'frobnicate'"),
        ("!modgud knocks now", "takes no arguments; usage: !modgud knocks"),
        (
            "!modgud approve s.test",
            "a server and a room are needed; usage: !modgud approve SERVER ROOM|SPACE",
        ),
        ("!modgud approve s.test #alias:hs", "'#alias:hs' is not a room ID"),
        (f"!modgud approve 'not a server' {ROOM}", "'not a server' is not a server name"),
        ("!modgud leaks a b", "at most one room"),
        ("!modgud findings color=red", "'color=red' is not one of room=…"),
        ("!modgud findings limit=0", "limit must be a positive number"),
        ("!modgud ban", "a server (or server glob) is needed"),
        ("!modgud ban @user:hs", "'@user:hs' is not a server name or glob"),
        ("!modgud unban a.test b", "takes only the server"),
        ("!modgud history", "one room is needed"),
        (f"!modgud space acl sync {ROOM}", "the kind is one of powerlevels, bans, policy"),
        (f"!modgud space bans fix {ROOM}", "the action is sync or drift"),
        (f"!modgud space bans drift {ROOM} allow-fail=!x:y", "allow-fail is for sync"),
        (f"!modgud space bans sync {ROOM} force", "only allow-fail=ROOM may follow"),
        ('!modgud ban "unterminated', "cannot read the command"),
    ],
)
def test_bad_commands_say_what_is_wrong(body, error):
    with pytest.raises(CommandError, match=None) as caught:
        parse_command(body)
    assert error in str(caught.value)


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        ("!modgud help", True),
        ("!modgudx", False),
        ("hello !modgud", False),
        (None, False),
        ("", False),
    ],
)
def test_is_command(body, expected):
    assert is_command(body) is expected


@pytest.mark.parametrize(
    ("key", "decision"),
    [
        ("✅", True),
        ("✅\ufe0f", True),
        ("✔️", True),
        ("❌", False),
        ("✖️", False),
        ("👍", None),  # agreement, not a decision
        ("👍🏽", None),
        ("approve", None),
        (None, None),
        (["✅"], None),
    ],
)
def test_reactions(key, decision):
    assert reaction_decision(key) is decision


KNOCK = {
    "room_id": ROOM,
    "server": "s.test",
    "first_seen": 0.0,
    "count": 2,
    "findings": 3,
    "finding_rules": "acl.sender,leak.reference",
    "policy_match": None,
}


def test_a_knock_message_has_both_bodies_and_the_commands():
    content = knock_message(KNOCK, "Lobby", is_space=True).content()
    assert content["msgtype"] == "m.notice" and content["format"] == "org.matrix.custom.html"
    body = content["body"]
    assert body.startswith(f"Knock: s.test asks to take part in the space {ROOM} (Lobby)")
    assert "First seen 1970-01-01 00:00 UTC, 2 knock(s)" in body
    assert "3 earlier finding(s) blame it (acl.sender,leak.reference)" in body
    assert f"!modgud approve s.test {ROOM}" in body and f"!modgud deny s.test {ROOM}" in body
    assert f"<code>!modgud approve s.test {ROOM}</code>" in content["formatted_body"]


def test_names_from_traffic_are_escaped_in_html():
    """A room name or finding detail is whatever a remote server sent: never markup."""
    html = knock_message(KNOCK, "<img src=x onerror=alert(1)>", is_space=False).html
    assert "<img" not in html and "&lt;img src=x" in html
    leak = leak_message(
        ROOM, "r.test", "acl.sender", [{"detail": "<b>x</b>", "event_id": "$e"}], 600
    )
    assert "<b>x</b>" not in leak.html and "&lt;b&gt;x&lt;/b&gt;" in leak.html


def test_a_threaded_answer_relates_to_its_command():
    content = in_thread({"body": "ok"}, "$cmd")
    assert content["m.relates_to"] == {
        "rel_type": "m.thread",
        "event_id": "$cmd",
        "is_falling_back": True,
        "m.in_reply_to": {"event_id": "$cmd"},
    }


def test_a_long_answer_is_cut_to_fit_an_event():
    """Fifty findings with long details must still be one sendable event (64 KiB)."""
    from proxy_addons.notices import MAX_BODY_CHARS, findings_message

    rows = [
        {
            "ts": 0.0,
            "action": "dropped",
            "rule": "acl.sender",
            "attributed_to": "r.test",
            "room_id": ROOM,
            "event_id": f"$e{n}",
            "detail": "🚨" * 2000,  # 4 bytes each in the event's (UTF-8) JSON
        }
        for n in range(50)
    ]
    content = findings_message(rows).content("$cmd")
    assert len(content["body"]) <= MAX_BODY_CHARS and content["body"].endswith("shows everything)")
    assert len(json.dumps(content, ensure_ascii=False).encode()) < 65_536
