"""Server names (spec: Appendices, "Server Name")."""

import pytest

from rules.servername import ServerName, parse_server_name, server_of_user, strip_port


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("matrix.org", ServerName("matrix.org", None, False)),
        ("matrix.org:8448", ServerName("matrix.org", 8448, False)),
        ("localhost:8481", ServerName("localhost", 8481, False)),
        ("1.2.3.4", ServerName("1.2.3.4", None, True)),
        ("1.2.3.4:1234", ServerName("1.2.3.4", 1234, True)),
        ("[1234:5678::abcd]", ServerName("[1234:5678::abcd]", None, True)),
        ("[1234:5678::abcd]:5678", ServerName("[1234:5678::abcd]", 5678, True)),
        ("a-b.c", ServerName("a-b.c", None, False)),
    ],
)
def test_valid_server_names(name, expected):
    """The spec's own examples and their variants parse into host, port and literal-ness."""
    assert parse_server_name(name) == expected
    assert str(expected) == name


@pytest.mark.parametrize(
    "name",
    [
        "",
        ":8448",
        "matrix.org:",
        "matrix.org:99999",
        "matrix.org:port",
        "matrix.org:-1",
        "under_score.org",
        "space here",
        "[1234:5678::abcd",
        "[not-ipv6]",
        "[1234:5678::abcd]x",
        "256.1.1.1",
        "a" * 300,
        None,
        42,
        "ünicode.org",
    ],
)
def test_invalid_server_names(name):
    """Anything outside the grammar is rejected (None), never an exception."""
    assert parse_server_name(name) is None


@pytest.mark.parametrize(
    ("name", "host"),
    [
        ("example.org:8448", "example.org"),
        ("example.org", "example.org"),
        ("[::1]:8448", "[::1]"),
        ("[::1]", "[::1]"),
        ("1.2.3.4:5", "1.2.3.4"),
    ],
)
def test_strip_port_keeps_ipv6_brackets(name, host):
    """ACL matching strips the port but keeps IPv6 brackets (spec: m.room.server_acl)."""
    assert strip_port(name) == host


@pytest.mark.parametrize(
    ("user_id", "server"),
    [
        ("@alice:example.org", "example.org"),
        ("@alice:example.org:8448", "example.org:8448"),
        ("@a:b:[::1]:80", None),
        ("alice:example.org", None),
        ("@alice", None),
        ("@alice:bad_host", None),
        (None, None),
        (["@a:b"], None),
    ],
)
def test_server_of_user(user_id, server):
    """The server part of a user ID is everything after the first colon, and must be valid."""
    assert server_of_user(user_id) == server
