"""Server-name globs as used by m.room.server_acl and policy lists.

`*` matches any run of characters (also empty), `?` exactly one, nothing else is special;
matching is case-insensitive and covers the whole name (spec: m.room.server_acl).

Matching never backtracks exponentially: a pattern is split at `*` into segments, the first
anchored at the start, the last at the end, and each middle one matched at its leftmost
position, which is always optimal for `*`-globs. Cost is O(len(name) * len(pattern)) at worst,
so patterns like `a*a*a*a*a*b` (Synapse's CVE-2023-45129 family) stay cheap.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["Glob", "compile_glob"]


def _segment_at(name: str, pos: int, seg: str) -> bool:
    if pos + len(seg) > len(name):
        return False
    for i, ch in enumerate(seg):
        if ch != "?" and name[pos + i] != ch:
            return False
    return True


def _find_segment(name: str, start: int, end: int, seg: str) -> int:
    """Leftmost position >= start where seg matches and ends at or before end; -1 if none."""
    if "?" not in seg:
        return name.find(seg, start, end)
    for pos in range(start, end - len(seg) + 1):
        if _segment_at(name, pos, seg):
            return pos
    return -1


@dataclass(frozen=True, slots=True)
class Glob:
    """A compiled glob. `pattern` is lower-cased; `segments` is the pattern split at `*`;
    `wild` tells whether it has a `?` (without one, segments compare with C's string
    methods, not character by character)."""

    pattern: str
    segments: tuple[str, ...]
    wild: bool

    @property
    def is_literal(self) -> bool:
        return len(self.segments) == 1 and not self.wild

    def matches(self, name: str) -> bool:
        """Whether the glob matches all of `name` (which the caller has lower-cased)."""
        segs = self.segments
        if len(segs) == 1:
            return len(name) == len(segs[0]) and _segment_at(name, 0, segs[0])
        first, last = segs[0], segs[-1]
        if len(first) + len(last) > len(name):
            return False
        tail = len(name) - len(last)
        if self.wild:
            if not (_segment_at(name, 0, first) and _segment_at(name, tail, last)):
                return False
        elif not (name.startswith(first) and name.endswith(last)):
            return False
        pos = len(first)
        for seg in segs[1:-1]:
            if not seg:
                continue
            found = _find_segment(name, pos, tail, seg)
            if found == -1:
                return False
            pos = found + len(seg)
        return True


def compile_glob(pattern: str) -> Glob:
    """Compile a glob; consecutive `*` collapse, case is folded."""
    lowered = pattern.lower()
    return Glob(lowered, tuple(lowered.split("*")), "?" in lowered)
