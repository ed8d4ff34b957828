"""Server-name globs (spec: m.room.server_acl; also policy-list rules) against the
pathological patterns behind Synapse's CVE-2023-45129 — ReDoS through glob_to_regex in
server ACL and push-rule matching: many `*` and `?` against long names that almost match.

The bound is shown by counting work, not by timing it: names are wrapped in a str that
counts every character the matcher reads and charges each substring search its naive
worst case, and the count must stay within len(name) x len(pattern) (rules/glob.py's
complexity claim). Correctness is pinned against fnmatch, exhaustively for short
patterns and names.
"""

from __future__ import annotations

import ast
import fnmatch
import itertools
import random
from pathlib import Path

import pytest

from rules.acl import GlobSet, ServerAcl
from rules.glob import Glob, compile_glob

RULES = Path(__file__).resolve().parents[2] / "rules"


class WorkExceeded(AssertionError):
    """The matcher did more work than its budget: stopped at once, not left to run for
    as long as a backtracking matcher would."""


class CountingName(str):
    """A name that counts the character reads a matcher makes (`name[i]`), charging a
    substring search of a needle of m characters over a window of w its naive worst
    case, w * m, a start or end comparison the length compared, and a slice or `in` the
    length it covers. Past `budget`, it raises."""

    __slots__ = ()
    work = [0]
    budget = [float("inf")]

    @staticmethod
    def charge(amount: int) -> None:
        CountingName.work[0] += amount
        if CountingName.work[0] > CountingName.budget[0]:
            raise WorkExceeded(f"over the budget of {CountingName.budget[0]}")

    def __getitem__(self, key):
        if isinstance(key, slice):
            start, stop, _ = key.indices(len(self))
            CountingName.charge(max(0, stop - start))
        else:
            CountingName.charge(1)
        return str.__getitem__(self, key)

    def find(self, sub, start=None, end=None):
        lo, hi, _ = slice(start, end).indices(len(self))
        CountingName.charge(max(1, hi - lo) * max(1, len(sub)))
        return str.find(self, sub, start, end)

    def startswith(self, prefix, *args):
        CountingName.charge(max(1, len(prefix)))
        return str.startswith(self, prefix, *args)

    def endswith(self, suffix, *args):
        CountingName.charge(max(1, len(suffix)))
        return str.endswith(self, suffix, *args)

    def __contains__(self, sub):
        CountingName.charge(len(self) * max(1, len(sub)))
        return str.__contains__(self, sub)


def bound(pattern: str, name: str) -> int:
    """The work rules/glob.py promises: O(len(name) x len(pattern))."""
    return (len(name) + 1) * (len(pattern) + 1)


def work_of(glob: Glob, name: str) -> tuple[bool, int]:
    """(whether `glob` matches `name`, the work counted doing it); raises WorkExceeded
    past the bound."""
    CountingName.work[0], CountingName.budget[0] = 0, bound(glob.pattern, name)
    try:
        return glob.matches(CountingName(name)), CountingName.work[0]
    finally:
        CountingName.budget[0] = float("inf")


def reference(pattern: str, name: str) -> bool:
    """fnmatch's answer (`[` is escaped: only `*` and `?` are special in server globs)."""
    return fnmatch.fnmatchcase(name, pattern.replace("[", "[[]"))


PATHOLOGICAL = [
    "*" + "a*" * 60 + "b",  # Synapse's CVE-2023-45129 family: 61 stars
    "*a*a*a*a*a*a*a*a*a*a*a*c?",
    "?*" * 60,  # 60 of each
    "*?" * 40 + "b",
    "a*" * 30 + "?" * 30 + "*b",
    "*" + "a?" * 40 + "*" + "?a" * 40 + "*c",
    "*aa*a?a*aa?*" * 10 + ".org",
    "*" * 100 + "a" * 100 + "*" * 100,
]
LONG_NAMES = [
    "a" * 255,
    "a" * 254 + "c",
    "a" * 254 + "b",  # matches the first pattern, after all its stars
    ("a" * 40 + ".") * 6 + "b",
    "ab" * 127,
    "a" * 120 + "b" * 135,
]


@pytest.mark.parametrize("pattern", PATHOLOGICAL)
def test_pathological_globs_do_bounded_work(pattern):
    """Each pathological glob against each 255-character name reads at most
    len(name) x len(pattern) characters (searches charged at their naive worst), the
    bound rules/glob.py claims — a backtracking matcher blows through it at once — and
    answers as the dynamic-programming reference does (fnmatch itself would backtrack on
    these)."""
    glob = compile_glob(pattern)
    for name in LONG_NAMES:
        matched, work = work_of(glob, name)  # raises past bound(pattern, name)
        assert work <= bound(pattern, name)
        assert matched is dynamic_reference(pattern, name)


def dynamic_reference(pattern: str, name: str) -> bool:
    """Glob matching by dynamic programming: O(len(name) x len(pattern)), obviously
    right, slow — a second reference for names too long for fnmatch's backtracking."""
    pattern, name = pattern.lower(), name.lower()
    reach = [True] + [False] * len(name)  # prefixes of `name` the pattern so far matches
    for p in pattern:
        if p == "*":
            for i in range(1, len(reach)):
                reach[i] = reach[i] or reach[i - 1]
        else:
            reach = [False] + [reach[i] and (p == "?" or p == name[i]) for i in range(len(name))]
    return reach[-1]


def test_work_grows_linearly_with_the_stars():
    """`*a*a…*b` against 254 a's and a b, which every such glob matches only after
    placing all its stars: doubling the stars at most doubles the work (a backtracking
    matcher's steps multiply), and the counter does see that work grow."""
    name = "a" * 254 + "b"
    works = []
    for k in (8, 16, 32, 64):
        matched, work = work_of(compile_glob("*" + "a*" * k + "b"), name)
        assert matched
        works.append(work)
    assert works[0] >= 8 * 200  # eight searches across most of the name, as charged
    for smaller, larger in itertools.pairwise(works):
        assert smaller < larger <= 2 * smaller + 2 * len(name)


def test_glob_agrees_with_fnmatch_exhaustively():
    """Every pattern over {a, b, ?, *} of up to 5 characters against every name over
    {a, b} of up to 6: the segment matcher answers exactly as fnmatch (and the dynamic
    reference), the empty pattern and name included."""
    names = ["".join(p) for n in range(7) for p in itertools.product("ab", repeat=n)]
    for length in range(6):
        for chars in itertools.product("ab?*", repeat=length):
            pattern = "".join(chars)
            glob = compile_glob(pattern)
            for name in names:
                expected = reference(pattern, name)
                assert glob.matches(name) is expected, (pattern, name)
                assert dynamic_reference(pattern, name) is expected, (pattern, name)


def test_glob_and_globset_agree_with_the_references_on_random_server_names():
    """Random globs with dots, digits, `[`, stars and question marks against random
    names (and names built to match): Glob, a one-glob GlobSet and the dynamic reference
    agree; fnmatch too where the pattern has at most four stars (beyond, its
    backtracking is the very problem)."""
    rng = random.Random(45129)
    alphabet = "ab.1-["
    for _ in range(3000):
        pattern = "".join(rng.choice(alphabet + "*?") for _ in range(rng.randint(0, 12)))
        filled = "".join(
            rng.choice(alphabet) * rng.randint(0, 3)
            if c == "*"
            else rng.choice(alphabet)
            if c == "?"
            else c
            for c in pattern
        )
        for name in (filled, "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 14)))):
            expected = dynamic_reference(pattern, name)
            assert compile_glob(pattern).matches(name) is expected, (pattern, name)
            assert GlobSet([pattern]).matches(name) is expected, (pattern, name)
            if pattern.count("*") <= 4:
                assert reference(pattern, name) is expected, (pattern, name)


def test_an_acl_of_pathological_globs_does_bounded_work_per_server(monkeypatch):
    """A room ACL (or policy list) of 200 pathological deny globs: deciding one
    255-character server name matches each glob at most once, each within its bound —
    the whole decision within the sum of the globs' bounds."""
    counted = []
    original = Glob.matches

    def counting(self, name):
        result, work = original_work_of(self, name)
        counted.append((self.pattern, work))
        return result

    def original_work_of(glob, name):
        CountingName.work[0], CountingName.budget[0] = 0, bound(glob.pattern, name)
        try:
            return original(glob, CountingName(name)), CountingName.work[0]
        finally:
            CountingName.budget[0] = float("inf")

    monkeypatch.setattr(Glob, "matches", counting)
    deny = [p.replace("b", str(i % 10)) for i, p in enumerate(PATHOLOGICAL * 25)]
    acl = ServerAcl.from_content({"allow": ["*"], "deny": deny})
    for name in LONG_NAMES:
        counted.clear()
        decision = acl.check(name + ".example")
        assert decision.allowed is not any(dynamic_reference(p, name + ".example") for p in deny)
        assert len(counted) <= len(deny)
        for pattern, work in counted:
            assert work <= bound(pattern, name + ".example")


def test_glob_matching_uses_no_regular_expressions():
    """The matcher is the segment matcher of rules/glob.py, not a translation to a
    backtracking regex (Synapse's glob_to_regex, the CVE's root): neither glob.py nor
    acl.py imports re or fnmatch."""
    for module in ("glob.py", "acl.py"):
        tree = ast.parse((RULES / module).read_text(encoding="utf-8"))
        imported = {
            alias.name.split(".")[0]
            for node in ast.walk(tree)
            if isinstance(node, ast.Import)
            for alias in node.names
        } | {
            (node.module or "").split(".")[0]
            for node in ast.walk(tree)
            if isinstance(node, ast.ImportFrom)
        }
        assert not imported & {"re", "regex", "fnmatch"}, module
