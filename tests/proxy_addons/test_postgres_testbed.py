"""The throwaway PostgreSQL server of the tests (tests/pg.py): real databases, one per test,
reachable with psql, and nothing left running once stopped."""

from __future__ import annotations

import socket
import subprocess

import pytest

from proxy_addons.testbed.postgres import Postgres, processes_in
from tests.pg import start_postgres

seen: set[str] = set()


def psql(server: Postgres, url: str, sql: str) -> str:
    done = subprocess.run(
        [server.binary("psql"), "-X", url, "-v", "ON_ERROR_STOP=1", "-tA", "-c", sql],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


@pytest.mark.parametrize("n", [1, 2])
def test_each_test_gets_its_own_database(postgres, pg_url, n):  # noqa: F811
    assert pg_url.startswith(f"postgresql://postgres@127.0.0.1:{postgres.port}/")
    assert pg_url not in seen
    seen.add(pg_url)
    assert psql(postgres, pg_url, "select 1") == "1"
    # Fails in the second test if the database were shared: the table would exist.
    psql(postgres, pg_url, "create table marker (n int)")
    psql(postgres, pg_url, f"insert into marker values ({n})")
    assert psql(postgres, pg_url, "select n from marker") == str(n)


def test_stop_leaves_no_server(tmp_path_factory):
    server = start_postgres(tmp_path_factory)
    try:
        url = server.create_database("scratch")
        assert psql(server, url, "select current_database()") == "scratch"
        assert processes_in(server.data)
    finally:
        server.stop()
    assert processes_in(server.data) == []
    with socket.socket() as s:
        assert s.connect_ex(("127.0.0.1", server.port)) != 0
    server.stop()  # already stopped: nothing to do
