"""Redaction per room version (spec: each room version's "Redactions" section; Synapse's
prune_event_dict). The real-Synapse comparison lives in tests/e2e/test_synapse_equality.py."""

from __future__ import annotations

import pytest

from rules.redaction import redact_event
from rules.roomversion import KNOWN_ROOM_VERSIONS, get_room_version

ALL = list(KNOWN_ROOM_VERSIONS)


def ev(event_type, content, **top):
    return {
        "event_id": "$e:x",
        "type": event_type,
        "room_id": "!r:x",
        "sender": "@u:x",
        "state_key": "",
        "content": content,
        "hashes": {"sha256": "h"},
        "signatures": {"x": {"ed25519:1": "s"}},
        "depth": 1,
        "prev_events": [],
        "auth_events": [],
        "origin_server_ts": 1,
        "origin": "x",
        "membership": "join",
        "prev_state": [],
        "unsigned": {"age_ts": 1, "other": 2, "replaces_state": "$p"},
        "extra_top": 1,
        **top,
    }


# (event type, content, {versions: expected content})
TABLE = [
    (
        "m.room.member",
        {
            "membership": "join",
            "displayname": "d",
            "join_authorised_via_users_server": "@a:x",
            "third_party_invite": {"signed": {"s": 1}, "display_name": "n"},
        },
        {
            ("1", "2", "3", "4", "5", "6", "7", "8"): {"membership": "join"},
            ("9", "10"): {"membership": "join", "join_authorised_via_users_server": "@a:x"},
            ("11", "12"): {
                "membership": "join",
                "join_authorised_via_users_server": "@a:x",
                "third_party_invite": {"signed": {"s": 1}},
            },
        },
    ),
    (
        "m.room.create",
        {"creator": "@u:x", "room_version": "5", "m.federate": True},
        {
            tuple(ALL[:10]): {"creator": "@u:x"},
            ("11", "12"): {"creator": "@u:x", "room_version": "5", "m.federate": True},
        },
    ),
    (
        "m.room.join_rules",
        {"join_rule": "restricted", "allow": [{"type": "m.room_membership"}], "x": 1},
        {
            tuple(ALL[:7]): {"join_rule": "restricted"},
            tuple(ALL[7:]): {"join_rule": "restricted", "allow": [{"type": "m.room_membership"}]},
        },
    ),
    (
        "m.room.power_levels",
        {
            "users": {},
            "users_default": 0,
            "events": {},
            "events_default": 0,
            "state_default": 50,
            "ban": 50,
            "kick": 50,
            "redact": 50,
            "invite": 0,
            "notifications": {"room": 50},
        },
        {
            tuple(ALL[:10]): {
                "users": {},
                "users_default": 0,
                "events": {},
                "events_default": 0,
                "state_default": 50,
                "ban": 50,
                "kick": 50,
                "redact": 50,
            },
            ("11", "12"): {
                "users": {},
                "users_default": 0,
                "events": {},
                "events_default": 0,
                "state_default": 50,
                "ban": 50,
                "kick": 50,
                "redact": 50,
                "invite": 0,
            },
        },
    ),
    (
        "m.room.aliases",
        {"aliases": ["#a:x"]},
        {tuple(ALL[:5]): {"aliases": ["#a:x"]}, tuple(ALL[5:]): {}},
    ),
    (
        "m.room.history_visibility",
        {"history_visibility": "shared", "x": 1},
        {tuple(ALL): {"history_visibility": "shared"}},
    ),
    (
        "m.room.redaction",
        {"redacts": "$x", "reason": "r"},
        {tuple(ALL[:10]): {}, ("11", "12"): {"redacts": "$x"}},
    ),
    ("m.room.message", {"body": "b", "msgtype": "m.text"}, {tuple(ALL): {}}),
]

CASES = [
    (event_type, content, version, expected)
    for event_type, content, by_version in TABLE
    for versions, expected in by_version.items()
    for version in versions
]


@pytest.mark.parametrize(
    ("event_type", "content", "version", "expected"), CASES, ids=[f"{c[0]}-v{c[2]}" for c in CASES]
)
def test_content_kept_per_room_version(event_type, content, version, expected):
    """Which content keys survive redaction, per event type and room version."""
    assert redact_event(ev(event_type, content), get_room_version(version))["content"] == expected


def test_every_version_is_covered():
    """The table above names every known room version for every event type."""
    for _, _, by_version in TABLE:
        assert sorted(v for vs in by_version for v in vs) == sorted(ALL)


@pytest.mark.parametrize("version", ALL)
def test_top_level_keys(version):
    """v11 (MSC2176) stopped keeping origin, membership and prev_state; unknown keys go;
    unsigned keeps only age_ts and replaces_state."""
    out = redact_event(ev("m.room.message", {}), get_room_version(version))
    legacy = {"origin", "membership", "prev_state"}
    assert legacy <= set(out) if int(version) < 11 else not (legacy & set(out))
    assert "extra_top" not in out
    assert out["unsigned"] == {"age_ts": 1, "replaces_state": "$p"}


def test_input_not_mutated_and_hostile_content_tolerated():
    """Redaction copies; a non-object content redacts to {}."""
    original = ev("m.room.member", {"membership": "join"})
    snapshot = repr(original)
    redact_event(original, get_room_version("11"))
    assert repr(original) == snapshot
    assert redact_event(ev("m.room.member", "x"), get_room_version("10"))["content"] == {}
    assert (
        redact_event(ev("m.room.member", {"third_party_invite": "x"}), get_room_version("11"))[
            "content"
        ]
        == {}
    )
