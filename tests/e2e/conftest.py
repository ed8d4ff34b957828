"""End-to-end fixtures: real Synapse homeservers federating through a real modgud.

Each mode gets one topology for the module (starting three Synapse servers costs tens of
seconds); each test makes its own rooms.
"""

from __future__ import annotations

import pytest

from proxy_addons.testbed.topology import Topology


def _topology(tmp_path_factory, mode):
    topo = Topology(tmp_path_factory.mktemp(f"fed-{mode}"), mode=mode)
    topo.start()
    return topo


@pytest.fixture(scope="session")
def enforce_topology(tmp_path_factory):
    topo = _topology(tmp_path_factory, "enforce")
    yield topo
    topo.stop()


@pytest.fixture(scope="session")
def audit_topology(tmp_path_factory):
    topo = _topology(tmp_path_factory, "audit")
    yield topo
    topo.stop()
