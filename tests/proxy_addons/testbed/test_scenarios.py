"""The scenario corpus itself (no network): names are unique, benign scenarios expect no
finding at all in either mode, and every misbehaviour the peer offers has a scenario."""

from __future__ import annotations

import inspect

from proxy_addons.testbed.scenarios import SCENARIOS


def test_names_unique_and_stories_told():
    names = [s.name for s in SCENARIOS]
    assert len(names) == len(set(names))
    assert all(s.story for s in SCENARIOS)


def test_benign_scenarios_pin_zero_findings():
    benign = [s for s in SCENARIOS if not s.hostile]
    assert benign
    for scenario in benign:
        assert (
            scenario.expected("enforce").findings == ()
            and scenario.expected("audit").findings == ()
        )


def test_every_misbehaviour_is_played():
    """Each of the peer's misbehaviours appears in at least one scenario's play."""
    sources = "\n".join(inspect.getsource(s.play) for s in SCENARIOS)
    for needle in (
        'signature="forge"',
        'signature="drop"',
        "prev_events=",
        "raw_body=",
        "m.typing",
        "m.receipt",
        "m.presence",
        "m.server.knock",
        "join_authorised_via_users_server",
        '"knock"',
        '"leave"',
        "create_room",
    ):
        assert needle in sources, needle
