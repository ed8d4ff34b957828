"""The scenario corpus (proxy_addons/testbed/scenarios.py) against real Synapse behind
modgud, in enforce and in audit mode: what reaches hs1's users, what does not, which
memberships result, and exactly which findings modgud records."""

from __future__ import annotations

import pytest

from proxy_addons.testbed.scenarios import SCENARIOS, run_scenario

pytestmark = pytest.mark.e2e


def _report(outcome):
    lines = [f"{outcome.scenario.name} ({outcome.mode}): {outcome.scenario.story}"]
    lines += [f"  - {f}" for f in outcome.failures]
    lines += [
        f"  finding {f['rule']} {f['action']} blamed={f['attributed_to']} {f['detail'][:80]}"
        for f in outcome.findings
    ]
    lines += [f"  answer {r.status} {str(r.body)[:120]}" for r in outcome.responses]
    return "\n".join(lines)


@pytest.mark.parametrize("scenario", SCENARIOS, ids=lambda s: s.name)
def test_scenario_enforce(enforce_topology, scenario):
    """Enforce mode: the scenario's stated outcome, exactly."""
    outcome = run_scenario(enforce_topology, scenario)
    assert outcome.ok, _report(outcome)


@pytest.mark.parametrize("scenario", SCENARIOS, ids=lambda s: s.name)
def test_scenario_audit(audit_topology, scenario):
    """Audit mode: nothing altered by modgud; findings flagged."""
    outcome = run_scenario(audit_topology, scenario)
    assert outcome.ok, _report(outcome)
