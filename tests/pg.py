"""A real PostgreSQL server for the tests (proxy_addons.testbed.postgres): one per session,
a fresh database per test. Fixtures to import into a test module or a conftest:

    from tests.pg import pg_url, postgres  # noqa: F401

Skipped when PostgreSQL is not installed, except in CI (CI=true), where that fails:
`make deps` installs it."""

from __future__ import annotations

import itertools
import os
import re
from collections.abc import Iterator

import pytest

from proxy_addons.testbed.homeserver import free_port
from proxy_addons.testbed.postgres import Postgres, postgres_binaries

__all__ = ["pg_url", "postgres", "start_postgres"]

_databases = itertools.count()


def start_postgres(tmp_path_factory: pytest.TempPathFactory) -> Postgres:
    """A started server of its own (the caller stops it)."""
    if postgres_binaries() is None:
        reason = "PostgreSQL is not installed (make deps; Debian: apt-get install postgresql)"
        if os.environ.get("CI") == "true":
            pytest.fail(reason)
        pytest.skip(reason)
    return Postgres(tmp_path_factory.mktemp("postgres"), free_port()).start()


@pytest.fixture(scope="session")
def postgres(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Postgres]:
    server = start_postgres(tmp_path_factory)
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def pg_url(postgres: Postgres, request: pytest.FixtureRequest) -> str:
    """The URL of a new, empty database, named after the test for the server's log."""
    test = re.sub(r"[^a-z0-9]+", "_", request.node.name.lower())[:40]
    return postgres.create_database(f"t{next(_databases)}_{test}")
