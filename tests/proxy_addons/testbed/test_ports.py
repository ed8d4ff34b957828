"""free_port: ports below the kernel's ephemeral range, never handed out twice."""

from __future__ import annotations

import socket

import pytest

from proxy_addons.testbed import homeserver
from proxy_addons.testbed.homeserver import free_port


def test_ports_are_below_the_ephemeral_range_and_distinct() -> None:
    low, top = homeserver._port_range()
    ports = [free_port() for _ in range(200)]
    assert len(set(ports)) == 200
    assert all(low <= p < top for p in ports)
    ephemeral = open("/proc/sys/net/ipv4/ip_local_port_range").read().split()
    assert top <= int(ephemeral[0])


def test_a_port_someone_listens_on_or_handed_out_is_skipped(monkeypatch) -> None:
    monkeypatch.setattr(homeserver, "_handed_out", set())
    with socket.create_server(("127.0.0.1", 0)) as taken:
        busy = taken.getsockname()[1]
        monkeypatch.setattr(homeserver, "_port_range", lambda: (busy, busy + 2))
        assert free_port() == busy + 1  # the busy port is never the answer
        with pytest.raises(RuntimeError, match="no free loopback port"):
            free_port()  # busy + 1 was handed out already, busy is taken
