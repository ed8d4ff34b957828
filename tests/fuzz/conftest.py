"""Fixtures of the fuzz tests: the addon fixtures of tests/proxy_addons, a runtime per
deployment mode in the fuzz world, and the count of cases run."""

from __future__ import annotations

import pytest
from signedjson.key import write_signing_keys

from tests.fuzz.harness import CASES, EXAMPLES
from tests.fuzz.world import (
    DEPLOYMENTS,
    LOCAL,
    SIGNING_KEYS,
    FuzzStateSource,
    install_keys,
    operator_policy,
)
from tests.proxy_addons.conftest import make_runtime  # noqa: F401 - a fixture


@pytest.fixture
def world(make_runtime, tmp_path):  # noqa: F811 - the fixture imported above
    """A RuntimeHolder per deployment, each with the fuzz world's rooms, operator policy
    and server keys; `extra` is added to each one's config (world.OUTBOUND, say)."""
    with open(tmp_path / "hs.signing.key", "w") as f:
        write_signing_keys(f, [SIGNING_KEYS[LOCAL]])

    def make(extra: str = "", **options: object):
        holders = {}
        for name, deployment in DEPLOYMENTS.items():
            source = FuzzStateSource()
            holder = make_runtime(source=source, extra=extra, **{**deployment, **options})
            install_keys(holder.runtime)
            holder.runtime.policy.current = operator_policy(source.rooms)
            holders[name] = holder
        return holders

    return make


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    ran = {name: n for name, n in CASES.items() if n}
    if ran:
        terminalreporter.write_line(
            f"modgud fuzz: {sum(ran.values())} cases in {len(ran)} tests "
            f"(up to {EXAMPLES} examples each)"
        )
