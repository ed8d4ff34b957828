"""Walking a space (MSC3216 scope): nested, `via` required, each room once (cycles end);
the space's ACL then binds those rooms. The state source is a table of state events."""

from __future__ import annotations

from proxy_addons.config import load_config
from proxy_addons.operatorpolicy import OperatorPolicySource, walk_space
from rules.policy import Barrier, OperatorPolicy, authorise_server
from rules.roomstate import room_policy_from_state


def child(room_id, via=("hs.test",)):
    return {
        "type": "m.space.child",
        "state_key": room_id,
        "content": {"via": list(via)} if via else {},
    }


STATE = {
    "!space": [
        child("!a"),
        child("!sub"),
        child("!novia", via=()),
        {
            "type": "m.room.server_acl",
            "state_key": "",
            "content": {"allow": ["*"], "deny": ["evil.test"]},
        },
    ],
    "!sub": [child("!b"), child("!c")],
    "!c": [child("!space")],  # a cycle back to the top
    "!a": [],
    "!b": [],
}


async def fetch(room_id):
    return STATE.get(room_id)


async def test_walk_is_nested_cycle_safe_and_needs_via():
    space, rooms = await walk_space("!space", fetch)
    assert rooms == ["!a", "!sub", "!b", "!c"]
    assert await walk_space("!unknown", fetch) is None
    assert space is not None and space.acl is not None


async def test_space_acl_binds_its_rooms_only():
    space, rooms = await walk_space("!space", fetch)
    policy = OperatorPolicy("hs.test", spaces={r: (space,) for r in rooms})
    inside = room_policy_from_state("!c", STATE["!c"])
    outside = room_policy_from_state("!elsewhere", [])
    refusal = authorise_server("evil.test", inside, policy)
    assert (
        refusal is not None and refusal.barrier is Barrier.ACL and "space !space" in refusal.reason
    )
    assert authorise_server("evil.test", outside, policy) is None


def test_watches_answers_for_event_types_of_any_shape(tmp_path):
    """The hook passes the event's `type` as it came: a list or an object (found by
    fuzzing: unhashable, it raised TypeError) is simply not a watched type."""
    cfg = tmp_path / "modgud.yaml"
    cfg.write_text(
        "server_name: hs.test\nupstream: http://127.0.0.1:1\n"
        "policy: {policy_lists: ['!bans'], spaces: ['!space']}\n"
    )
    source = OperatorPolicySource(load_config(cfg), fetch)
    assert source.watches("!bans", "m.policy.rule.server")
    for event_type in (["m.policy.rule.server"], {"a": 1}, None, 5):
        assert not source.watches("!bans", event_type)
        assert not source.watches("!space", event_type)
