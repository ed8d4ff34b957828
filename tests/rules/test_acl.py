"""ACL conformance (spec: Client-Server API, m.room.server_acl; Server-Server API,
"Server Access Control Lists"), matching Synapse's `server_matches_acl_event`."""

import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rules.acl import GlobSet, ServerAcl, check_server_acl
from rules.glob import compile_glob

CASES = [
    # (content, server, allowed, why)
    ({}, "example.org", False, "missing allow = empty allow = deny everyone"),
    ({"allow": []}, "example.org", False, "empty allow denies everyone"),
    ({"allow": ["*"]}, "example.org", True, "* allows everyone"),
    ({"allow": ["*"], "deny": ["evil.org"]}, "evil.org", False, "deny before allow"),
    ({"allow": ["evil.org"], "deny": ["evil.org"]}, "evil.org", False, "deny wins over allow"),
    ({"allow": ["*"], "deny": ["*.evil.org"]}, "sub.evil.org", False, "*.suffix denies subdomains"),
    (
        {"allow": ["*"], "deny": ["*.evil.org"]},
        "evil.org",
        True,
        "*.evil.org does not match evil.org",
    ),
    ({"allow": ["*"], "deny": ["EVIL.ORG"]}, "evil.org", False, "case-insensitive (pattern)"),
    ({"allow": ["*"], "deny": ["evil.org"]}, "EviL.Org", False, "case-insensitive (name)"),
    (
        {"allow": ["*"], "deny": ["evil.org"]},
        "evil.org:8448",
        False,
        "port stripped before matching",
    ),
    (
        {"allow": ["*"], "deny": ["evil.org:8448"]},
        "evil.org:8448",
        True,
        "a glob with a port never matches",
    ),
    ({"allow": ["*"], "deny": ["ev?l.org"]}, "evil.org", False, "? matches one character"),
    ({"allow": ["*"], "deny": ["ev?l.org"]}, "evl.org", True, "? does not match zero characters"),
    ({"allow": ["*"], "deny": ["ev?l.org"]}, "eviil.org", True, "? does not match two characters"),
    ({"allow": ["*"], "deny": ["ev*l.org"]}, "evl.org", False, "* matches the empty run"),
    ({"allow": ["*"], "deny": ["ev*l.org"]}, "eviiiil.org", False, "* matches a long run"),
    ({"allow": ["*"], "deny": ["[a-z].org"]}, "e.org", True, "[ is not special"),
    ({"allow": ["*"], "deny": ["[a-z].org"]}, "[a-z].org", False, "[ matches itself"),
    ({"allow": ["*"], "deny": ["evil.org"]}, "notevil.org", True, "globs match the whole name"),
    ({"allow": ["*"], "deny": ["evil"]}, "evil.org", True, "no prefix matching"),
    (
        {"allow": ["*"], "deny": [42, None, {"x": 1}, "evil.org"]},
        "evil.org",
        False,
        "non-strings ignored",
    ),
    ({"allow": [42, None], "deny": []}, "ok.org", False, "allow of only non-strings is empty"),
    ({"allow": "*"}, "ok.org", False, "non-list allow counts as empty"),
    ({"allow": ["*"], "deny": "evil.org"}, "evil.org", True, "non-list deny counts as empty"),
    ({"allow": ["*"]}, "1.2.3.4", True, "IP literals allowed by default"),
    ({"allow": ["*"], "allow_ip_literals": False}, "1.2.3.4", False, "IPv4 literal denied"),
    (
        {"allow": ["*"], "allow_ip_literals": False},
        "1.2.3.4:8448",
        False,
        "IPv4 literal with port denied",
    ),
    ({"allow": ["*"], "allow_ip_literals": False}, "[::1]", False, "IPv6 literal denied"),
    (
        {"allow": ["*"], "allow_ip_literals": False},
        "[::1]:8448",
        False,
        "IPv6 literal with port denied",
    ),
    (
        {"allow": ["*"], "allow_ip_literals": False},
        "1.2.3.4.nip.io",
        True,
        "a DNS name is not a literal",
    ),
    ({"allow": ["*"], "allow_ip_literals": "false"}, "1.2.3.4", True, "non-boolean counts as true"),
    ({"allow": ["*"], "allow_ip_literals": 0}, "1.2.3.4", True, "0 is not a boolean"),
    ({"allow": ["1.2.3.*"]}, "1.2.3.4:99", True, "IP literals can be matched by globs"),
    ({"allow": ["[::1]"]}, "[::1]:8448", True, "IPv6 literals keep brackets"),
    ({"allow": ["::1"]}, "[::1]", False, "IPv6 without brackets does not match"),
    ({"allow": ["*.org", "*.com"]}, "a.net", False, "not in allow list"),
    ({"allow": ["matrix.*"]}, "matrix.org", True, "prefix glob"),
    ({"allow": ["matrix.*"]}, "notmatrix.org", False, "prefix glob is anchored"),
    ({"allow": ["m*x.o*g"]}, "matrix.org", True, "general glob"),
    ({"allow": ["m*x.o*g"]}, "matrix.orgs", False, "general glob is anchored at the end"),
    ({"allow": ["a*a"]}, "a", False, "first and last segment may not overlap"),
    ({"allow": ["a*a"]}, "aa", True, "first and last segment adjacent"),
    ({"allow": ["*a*a*"]}, "ba", False, "two a's needed"),
    ({"allow": ["**"]}, "x.org", True, "consecutive stars"),
    ({"allow": ["?*"]}, "x", True, "?* matches one character"),
    ({"allow": ["?*"]}, "", False, "?* does not match empty"),
    (
        {"allow": ["ÉVIL.org"]},
        "évil.org",
        True,
        "case folding of non-ASCII like Synapse's IGNORECASE",
    ),
]


@pytest.mark.parametrize(("content", "server", "allowed", "why"), CASES, ids=[c[3] for c in CASES])
def test_acl_conformance(content, server, allowed, why):
    """Each row is one rule of the spec's ACL algorithm or one of Synapse's edge cases."""
    assert ServerAcl.from_content(content).check(server).allowed is allowed, why


def test_no_acl_event_allows_everyone():
    """A room without m.room.server_acl allows every server."""
    assert check_server_acl(None, "anything.example").allowed


@pytest.mark.parametrize("content", [None, [], "x", 3, {"allow": None}])
def test_non_mapping_content_denies_everyone(content):
    """Hostile content degrades to 'no allow list', which denies everyone, without raising."""
    assert not ServerAcl.from_content(content).check("example.org").allowed


def test_pathological_glob_stays_fast():
    """a*a*a*a*a*b against a long name (the shape behind Synapse's CVE-2023-45129) is cheap."""
    acl = ServerAcl.from_content({"allow": ["*"], "deny": ["a*a*a*a*a*a*a*a*a*a*b"] * 50})
    name = "a" * 250
    started = time.perf_counter()
    for _ in range(20):
        assert acl.check(name).allowed
    elapsed = time.perf_counter() - started
    # Polynomial backtracking would take minutes; this bound is 1000x the expected time.
    assert elapsed < 5.0


@pytest.mark.parametrize(
    ("pattern", "name", "matches"),
    [
        ("*", "", True),
        ("", "", True),
        ("", "a", False),
        ("a?c", "abc", True),
        ("a?c", "ac", False),
        ("*b*", "abc", True),
        ("*b?d*", "abxd", True),
        ("*b?d*", "abd", False),
        ("a*b*c", "abbbc", True),
        ("a*b*c", "acb", False),
        ("*?", "", False),
    ],
)
def test_glob_matches(pattern, name, matches):
    """The segment matcher agrees with the glob semantics, edge cases included."""
    assert compile_glob(pattern).matches(name) is matches


def test_globset_buckets_agree_with_plain_matching():
    """Exact, suffix, prefix and general globs in a GlobSet match what each glob matches."""
    patterns = ["exact.org", "*.suffix.org", "prefix.*", "g?n*ral.org", "*", "x*y*z"]
    names = [
        "exact.org",
        "a.suffix.org",
        "suffix.org",
        "prefix.net",
        "general.org",
        "xyz",
        "xay",
        "zzz",
    ]
    for pattern in patterns:
        one = GlobSet([pattern])
        glob = compile_glob(pattern)
        for name in names:
            assert one.matches(name) is glob.matches(name), (pattern, name)


@given(
    st.lists(st.text(alphabet="ab.c?*", max_size=8), max_size=30),
    st.lists(st.text(alphabet="abc.", max_size=10), min_size=1, max_size=10),
    st.sampled_from(["", "a", "ba.", "cab"]),
    st.booleans(),
)
@settings(max_examples=500, deadline=None)
def test_globset_indexes_agree_with_scanning_every_glob(patterns, names, filler, many):
    """However globs are filed (exact, suffix, prefix, runs of four or three characters,
    short literal starts and ends, scanned), a GlobSet matches a name exactly when one of
    its globs does. Names include each pattern with its wildcards filled in, so that most
    globs have names they match, at either end and in the middle."""
    if many:  # enough of each kind of key that the name's runs are cut, not searched for
        patterns = patterns + [
            p
            for i in range(60)
            for p in (f"*z{i:02d}q*", f"*?y{i:02d}*", f"{i:02d}?*.b", f"*.b?{i:02d}")
        ]
    globs = [compile_glob(p) for p in patterns]
    index = GlobSet(patterns)
    filled = [p.replace("*", filler).replace("?", "c") for p in patterns]
    for name in names + filled + ["x" + f for f in filled] + [f + "x" for f in filled]:
        assert index.matches(name) is any(g.matches(name) for g in globs), (patterns, name)
