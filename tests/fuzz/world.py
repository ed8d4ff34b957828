"""The world the addon fuzz tests run in: rooms of every known room version and an
unknown one, ACLs, participation, a space, policy-list bans, per-room check actions, a
room whose state cannot be had, signing keys of a few servers.

Room state comes from a static table (a test double), as in tests/proxy_addons.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from signedjson.key import generate_signing_key, get_verify_key

from proxy_addons.statesource import StateError
from rules.policy import BanList, CheckActions, CheckSetting, OperatorPolicy
from rules.roomstate import RoomPolicy, room_policy_from_state
from rules.signatures import ServerKey
from tests.proxy_addons.conftest import KEYS, LOCAL, OPEN_ROOM, ROOM

__all__ = [
    "DEPLOYMENTS",
    "DOWN_ROOM",
    "KNOWN_ROOMS",
    "LOCAL",
    "OUTBOUND",
    "ROOMS",
    "ROOM_VERSIONS",
    "SERVERS",
    "SIGNING_KEYS",
    "USERS",
    "FuzzStateSource",
    "install_keys",
    "operator_policy",
    "room_policies",
]

# The deployments every addon fuzz test runs in.
DEPLOYMENTS = {
    "enforce-open-verify": {"mode": "enforce", "on_error": "open", "verify_signatures": True},
    "enforce-closed": {"mode": "enforce", "on_error": "closed", "verify_signatures": False},
    "audit-verify": {"mode": "audit", "on_error": "closed", "verify_signatures": True},
    "sink": {"mode": "sink", "on_error": "open", "verify_signatures": False},
}
# The outbound listener, with the homeserver's key to re-sign mixed transactions.
OUTBOUND = "listen: {outbound: '127.0.0.1:8449'}\noutbound: {signing_key_file: hs.signing.key}\n"
ADMIN = f"@admin:{LOCAL}"
SIGNING_KEYS = {**KEYS, LOCAL: generate_signing_key("a_key")}

# Servers with a role in the world, and a few names of unusual shape.
SERVERS = (
    LOCAL,
    "good.test",
    "relay.test",
    "denied.test",
    "banned.test",
    "x.evil.test",
    "spacedenied.test",
    "unknown.test",
    "good.test:8448",
    "1.2.3.4",
    "[::1]:8448",
)
USERS = tuple(f"@{local}:{server}" for server in SERVERS for local in ("u", "spam")) + (
    ADMIN,
    "@mod:good.test",
    "@bad:good.test",
)

V1_ROOM = "!v1:hs.test"
V3_ROOM = "!v3:hs.test"
V6_ROOM = "!v6:hs.test"
V11_ROOM = "!v11:hs.test"
V12_ROOM = "!v12:hs.test"
UNKNOWN_VERSION_ROOM = "!custom:hs.test"
PARTICIPATION_ROOM = "!part:hs.test"
LOCKED_ROOM = "!locked:hs.test"
SPACE = "!space:hs.test"
POLICY_ROOM = "!bans:hs.test"
DOWN_ROOM = "!down:hs.test"  # its state cannot be had
UNKNOWN_ROOM = "!nowhere:hs.test"  # the homeserver is not in it

ROOM_VERSIONS = {
    ROOM: "10",
    OPEN_ROOM: "10",
    V1_ROOM: "1",
    V3_ROOM: "3",
    V6_ROOM: "6",
    V11_ROOM: "11",
    V12_ROOM: "12",
    UNKNOWN_VERSION_ROOM: "org.example.custom",
    PARTICIPATION_ROOM: "9",
    LOCKED_ROOM: "10",
    SPACE: "10",
}
KNOWN_ROOMS = tuple(ROOM_VERSIONS)
ROOMS = (*KNOWN_ROOMS, DOWN_ROOM, UNKNOWN_ROOM)

_DENY = ["denied.test", "*.evil.test"]


def _state(room_id: str, acl: dict[str, object] | None, *extra: dict[str, object]) -> list[object]:
    create: dict[str, object] = {"room_version": ROOM_VERSIONS[room_id]}
    if room_id == V12_ROOM:
        create["additional_creators"] = ["@u:good.test"]
    events: list[object] = [
        {"type": "m.room.create", "state_key": "", "sender": ADMIN, "content": create},
        {
            "type": "m.room.power_levels",
            "state_key": "",
            "content": {"users": {ADMIN: 100, "@mod:good.test": 50}, "invite": 50},
        },
    ]
    for user in (ADMIN, "@mod:good.test", "@u:relay.test", "@u:denied.test", "@u:good.test"):
        events.append(
            {"type": "m.room.member", "state_key": user, "content": {"membership": "join"}}
        )
    if acl is not None:
        events.append(
            {"type": "m.room.server_acl", "state_key": "", "event_id": "$acl", "content": acl}
        )
    return [*events, *extra]


def room_states() -> dict[str, list[object]]:
    acl = {"allow": ["*"], "deny": _DENY}
    return {
        ROOM: _state(ROOM, acl),
        OPEN_ROOM: _state(OPEN_ROOM, None),
        V1_ROOM: _state(V1_ROOM, acl),
        V3_ROOM: _state(V3_ROOM, acl),
        V6_ROOM: _state(V6_ROOM, acl),
        V11_ROOM: _state(V11_ROOM, acl),
        V12_ROOM: _state(V12_ROOM, acl),
        UNKNOWN_VERSION_ROOM: _state(UNKNOWN_VERSION_ROOM, acl),
        PARTICIPATION_ROOM: _state(
            PARTICIPATION_ROOM,
            {"allow": ["*"], "deny": [], "allow_ip_literals": False},
            {"type": "m.server.knock_rule", "state_key": "", "content": {"rule": "active"}},
            {
                "type": "m.server.participation",
                "state_key": "good.test",
                "content": {"participation": "permitted"},
            },
            {
                "type": "me.marewolf.msc4124.server.participation",
                "state_key": "relay.test",
                "content": {"participation": "denied"},
            },
        ),
        LOCKED_ROOM: _state(LOCKED_ROOM, {"allow": [], "deny": []}),
        SPACE: _state(
            SPACE,
            {"allow": ["*"], "deny": ["spacedenied.test"]},
            {"type": "m.space.child", "state_key": ROOM, "content": {"via": [LOCAL]}},
        ),
        POLICY_ROOM: [
            {
                "type": "m.policy.rule.server",
                "state_key": f"s{i}",
                "content": {"entity": entity, "recommendation": "m.ban"},
            }
            for i, entity in enumerate(("banned.test", "*.evil.test", "1.2.3.*"))
        ]
        + [
            {
                "type": "m.policy.rule.user",
                "state_key": "u",
                "content": {"entity": "@spam:*", "recommendation": "m.ban"},
            }
        ],
    }


def room_policies() -> dict[str, RoomPolicy | None]:
    return {
        room_id: room_policy_from_state(room_id, state)
        for room_id, state in room_states().items()
        if room_id != POLICY_ROOM
    }


def operator_policy(policies: dict[str, RoomPolicy | None]) -> OperatorPolicy:
    """Bans from the policy room, ROOM bound by SPACE's ACL, participation in V11_ROOM,
    and per-check actions that flag, turn off and re-grade."""
    space = policies[SPACE]
    assert space is not None
    return OperatorPolicy(
        LOCAL,
        frozenset({V11_ROOM}),
        BanList.from_state(room_states()[POLICY_ROOM]),
        {ROOM: (space,)},
        CheckActions(
            {"leaks": CheckSetting("flag")},
            {},
            {
                V6_ROOM: {"acl": CheckSetting("flag")},
                V3_ROOM: {"signature": CheckSetting("off"), "acl": CheckSetting("drop", "info")},
            },
        ),
    )


@dataclass
class FuzzStateSource:
    """Room policies from a table; DOWN_ROOM fails like a homeserver that is down."""

    rooms: dict[str, RoomPolicy | None] = field(default_factory=room_policies)
    raw: dict[str, list[object]] = field(default_factory=room_states)

    async def fetch(self, room_id: str) -> RoomPolicy | None:
        if room_id == DOWN_ROOM:
            raise StateError("homeserver down (fuzz)")
        return self.rooms.get(room_id)

    async def fetch_state(self, room_id: str) -> list[object] | None:
        if room_id == DOWN_ROOM:
            raise StateError("homeserver down (fuzz)")
        return self.raw.get(room_id)


async def _no_notary(*args: object, **kwargs: object) -> object:
    raise ValueError("no notary in the fuzz tests")


def install_keys(runtime: object) -> None:
    """The world's servers' keys, cached as fetched; any other key is unavailable at once
    (the notary refuses) instead of a connection attempt."""
    keys = runtime.keys  # type: ignore[attr-defined]
    for server, signing_key in SIGNING_KEYS.items():
        key_id = f"ed25519:{signing_key.version}"
        until = None if server == "relay.test" else 2**62
        keys._keys[server] = (
            1e18,
            {key_id: ServerKey(server, key_id, get_verify_key(signing_key), until)},
        )
    keys._query = _no_notary
