"""End-to-end fixtures: real Synapse homeservers federating through a real modgud.

Each mode gets one topology for the session (starting three Synapse servers costs tens
of seconds); each test makes its own rooms. Inside hs1, modgud's Synapse module judges
events (the default for Synapse); `hook_topology` and `faults_topology` use the HTTP
hook (synapse-http-antispam) instead, `hook_topology` with the module beside it in audit
mode, so that the two can be compared event by event.
"""

from __future__ import annotations

import pytest

from proxy_addons.testbed.topology import Topology
from tests.pg import pg_url, postgres  # noqa: F401 - fixtures: a real PostgreSQL


def _topology(tmp_path_factory, name, **options):
    mode = name if name in ("enforce", "audit") else options.pop("mode", "enforce")
    topo = Topology(tmp_path_factory.mktemp(f"fed-{name}"), mode=mode, **options)
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


@pytest.fixture(scope="session")
def outbound_topology(tmp_path_factory):
    """Enforce mode with hs1's own federation through modgud's outbound listener (its
    https_proxy, modgud's CA trusted): a topology of its own, because it changes what
    hs1 sends and pulls in every test."""
    topo = _topology(tmp_path_factory, "enforce", outbound=True)
    yield topo
    topo.stop()


@pytest.fixture(params=["enforce", "outbound"])
def any_enforce_topology(request):
    """For tests that must hold with and without the outbound listener."""
    return request.getfixturevalue(f"{request.param}_topology")


@pytest.fixture(scope="session")
def hook_topology(tmp_path_factory):
    """Enforce mode with the HTTP hook deciding inside hs1 (as for continuwuity, or an
    operator who prefers it), and the module beside it in audit mode."""
    topo = _topology(tmp_path_factory, "hook", inside="both")
    yield topo
    topo.stop()


@pytest.fixture(scope="session")
def faults_topology(tmp_path_factory):
    """A topology the fault tests may break: they kill modgud, freeze or stop hs1, and
    restart modgud with other on_error settings; each test leaves it running again.
    The HTTP hook decides inside hs1: these are its failure modes."""
    topo = _topology(tmp_path_factory, "faults", inside="hook")
    yield topo
    topo.stop()
