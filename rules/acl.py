"""Server ACL evaluation (spec: Client-Server API, "Server Access Control Lists",
m.room.server_acl; Server-Server API, "Server Access Control Lists").

Order, exactly as the spec and Synapse's `server_matches_acl_event`:
1. no ACL event in the room → allowed;
2. an IP literal while `allow_ip_literals` is false → denied;
3. any `deny` glob matches → denied;
4. any `allow` glob matches → allowed;
5. otherwise denied (a missing `allow` denies everyone).

Ports are stripped before matching, IPv6 brackets kept; globs are case-insensitive.
A non-list `allow`/`deny` counts as empty, non-string entries are ignored and a non-boolean
`allow_ip_literals` counts as true (Synapse does the same; the spec is silent).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from rules.glob import Glob, compile_glob
from rules.servername import strip_port

__all__ = ["AclDecision", "GlobSet", "ServerAcl", "check_server_acl", "is_ip_literal_host"]


def is_ip_literal_host(host: str) -> bool:
    """True for `[IPv6]` or dotted-quad hosts (ports already stripped).

    Synapse checks for a leading `[` and uses Twisted's isIPAddress; the same is done here.
    """
    if host.startswith("["):
        return True
    parts = host.split(".")
    if len(parts) != 4:
        return False
    for part in parts:
        if not part.isascii() or not part.isdigit() or int(part) > 255:
            return False
    return True


# Runs of four (or three) characters of a name, as zip() yields them: no string is made
# per run.
Gram = tuple[str, ...]
# Marks the start and the end of a name, so that a glob's literal start and end are runs too
# (`\0abc` for `abc*`). Not a server-name character; in a name it only costs a glob match.
_EDGE = "\0"
# How likely a key of each kind is to be in a name that matches none of the globs, relative
# to a run of four (about 1 in 37^4 at each of a name's ~20 positions; a two-character start,
# 1 in 37^2): a glob is filed under the key for which (globs sharing it) x (this) is least,
# so that few globs are matched in vain. Runs of three are the last resort: any one of them
# makes every name pay a second pass over its runs.
_WEIGHT = {"4": 1, "s3": 2, "e3": 2, "s2": 70, "e2": 70, "s1": 2500, "e1": 2500}
_LAST_RESORT = 1000  # a key dearer than this gives way to a run of three, if there is one
# Up to this many runs (of four and three together, or of three alone), a name is searched
# for each (C substring search) rather than cut into runs.
_FEW_RUNS = 12


class GlobSet:
    """A set of globs matched at a cost that does not grow with the number of globs.

    - exact names: one hash lookup; `*` alone: everything;
    - `*.suffix` globs: a hash set probed at each dot of the name; other `*suffix` and
      `prefix*` globs: hash sets probed with the name's suffixes / prefixes of the lengths
      present in the set;
    - every other glob is filed under one key that any name it matches must contain — a
      run of four characters of its literal pieces, its literal start and end marked with
      a NUL (`abc*.org` has the runs NUL`abc` and `org`NUL); a literal start or end of one
      to three characters; or a run of three — the one least likely to be in a name none
      of them matches (long keys, few globs sharing it). A name's own runs of four (and of
      three, if any glob needed one) are intersected with the index in C, its first and
      last one to three characters looked up, and only the globs filed under what it
      contains are matched one by one. Globs with no key at all (`*a*`, `?*`) are
      scanned; there are few, and each costs O(len(name) * len(pattern)) at worst (see
      rules.glob).
    """

    __slots__ = (
        "_any",
        "_dot_suffixes",
        "_ends",
        "_ends_and_starts",
        "_exact",
        "_few",
        "_grams",
        "_prefix_slices",
        "_prefixes",
        "_quad_keys",
        "_scanned",
        "_starts",
        "_suffix_slices",
        "_suffixes",
        "_tri_keys",
        "size",
    )

    def __init__(self, patterns: Iterable[object]) -> None:
        self._any = False
        self._exact: set[str] = set()
        self._dot_suffixes: set[str] = set()
        self._suffixes: set[str] = set()
        self._prefixes: set[str] = set()
        self._scanned: list[Glob] = []
        self.size = 0
        general: list[tuple[Glob, list[tuple[str, Gram | str]]]] = []
        for pattern in patterns:
            if not isinstance(pattern, str):
                continue
            self.size += 1
            glob = compile_glob(pattern)
            segs = glob.segments
            simple = len(segs) == 2 and not glob.wild
            if glob.is_literal:
                self._exact.add(glob.pattern)
            elif simple and segs == ("", ""):
                self._any = True
            elif simple and segs[0] == "":
                suffix = segs[1]
                (self._dot_suffixes if suffix.startswith(".") else self._suffixes).add(suffix)
            elif simple and segs[1] == "":
                self._prefixes.add(segs[0])
            else:
                general.append((glob, _keys(glob)))
        shared: dict[tuple[str, Gram | str], int] = {}
        for _, keys in general:
            for key in set(keys):
                shared[key] = shared.get(key, 0) + 1
        grams: dict[Gram, list[Glob]] = {}
        self._starts: dict[str, list[Glob]] = {}
        self._ends: dict[str, list[Glob]] = {}
        for glob, keys in general:
            if not keys:
                self._scanned.append(glob)
                continue
            kind, literal = _cheapest(keys, shared)
            if isinstance(literal, tuple):
                grams.setdefault(literal, []).append(glob)
            else:
                table = self._starts if kind[0] == "s" else self._ends
                table.setdefault(literal, []).append(glob)
        self._grams = grams
        # Few runs: the name is searched for each. Many: the name's own runs are intersected
        # with them (frozen: intersecting a dict's keys view copies the keys every time).
        quads = [k for k in grams if len(k) == 4]
        tris = [k for k in grams if len(k) == 3]
        few = quads + tris if len(grams) <= _FEW_RUNS else tris if len(tris) <= _FEW_RUNS else []
        self._few = tuple(("".join(gram), grams[gram]) for gram in few)
        self._quad_keys = frozenset(quads) - frozenset(few)
        self._tri_keys = frozenset(tris) - frozenset(few)
        # A slice longer than the name cuts all of it, and a key of that length can never
        # equal it: no length checks.
        self._prefix_slices = tuple(slice(0, n) for n in _lengths(self._prefixes))
        self._suffix_slices = tuple(slice(-n, None) for n in _lengths(self._suffixes))
        self._ends_and_starts = tuple(
            (table, slices)
            for table, slices in (
                (self._starts, tuple(slice(0, n) for n in _lengths(self._starts))),
                (self._ends, tuple(slice(-n, None) for n in _lengths(self._ends))),
            )
            if table
        )

    def matches(self, name: str) -> bool:
        """Whether any glob matches `name` (which the caller has lower-cased)."""
        if self._any or name in self._exact:
            return True
        if self._dot_suffixes:
            dot = name.find(".")
            while dot != -1:
                if name[dot:] in self._dot_suffixes:
                    return True
                dot = name.find(".", dot + 1)
        cut = name.__getitem__
        if self._suffixes and not self._suffixes.isdisjoint(map(cut, self._suffix_slices)):
            return True
        if self._prefixes and not self._prefixes.isdisjoint(map(cut, self._prefix_slices)):
            return True
        grams = self._grams
        if grams:
            marked = _EDGE + name + _EDGE
            if self._quad_keys:
                quads = zip(marked, marked[1:], marked[2:], marked[3:], strict=False)
                for gram in self._quad_keys.intersection(quads):
                    if _any_matches(grams[gram], name):
                        return True
            if self._tri_keys:
                tris = zip(marked, marked[1:], marked[2:], strict=False)
                for tri in self._tri_keys.intersection(tris):
                    if _any_matches(grams[tri], name):
                        return True
            for run, globs in self._few:
                if run in marked and _any_matches(globs, name):
                    return True
        for table, slices in self._ends_and_starts:
            for key in map(cut, slices):
                bucket = table.get(key)
                if bucket is not None and _any_matches(bucket, name):
                    return True
        return _any_matches(self._scanned, name)


def _any_matches(globs: list[Glob], name: str) -> bool:
    for glob in globs:
        if glob.matches(name):
            return True
    return False


def _cheapest(
    keys: list[tuple[str, Gram | str]], shared: Mapping[tuple[str, Gram | str], int]
) -> tuple[str, Gram | str]:
    """The key a glob is filed under (see _WEIGHT)."""
    costs = {k: shared[k] * _WEIGHT[k[0]] for k in keys if k[0] != "3"}
    best = min(costs, key=costs.__getitem__, default=None)
    if best is not None and costs[best] <= _LAST_RESORT:
        return best
    runs_of_three = [k for k in keys if k[0] == "3"]
    if runs_of_three:
        return min(runs_of_three, key=shared.__getitem__)
    if best is None:  # unreachable: _keys gives runs of three wherever it gives runs of four
        raise ValueError("a glob with keys has none to be filed under")
    return best


def _keys(glob: Glob) -> list[tuple[str, Gram | str]]:
    """Keys every name the glob matches contains: runs of four and of three of its literal
    pieces (marked at the name's edges), and its literal start and end when short."""
    segs = glob.segments
    pieces = [piece for seg in segs for piece in seg.split("?")]
    first, last = pieces[0], pieces[-1]
    keys: list[tuple[str, Gram | str]] = []
    if first and not segs[0].startswith("?"):
        pieces[0] = _EDGE + first
        if len(first) < 4:
            keys.append((f"s{len(first)}", first))
    if last and not segs[-1].endswith("?"):
        pieces[-1] = pieces[-1] + _EDGE
        if len(last) < 4:
            keys.append((f"e{len(last)}", last))
    for q in (4, 3):
        keys += [
            (str(q), tuple(piece[i : i + q])) for piece in pieces for i in range(len(piece) - q + 1)
        ]
    return keys


def _lengths(keys: Iterable[str]) -> list[int]:
    return sorted({len(k) for k in keys})


@dataclass(frozen=True, slots=True)
class AclDecision:
    allowed: bool
    reason: str


_NO_ACL = AclDecision(True, "no server ACL in the room")
_IP_LITERAL = AclDecision(False, "IP literals are not allowed by the room's server ACL")
_DENIED = AclDecision(False, "server is denied by the room's server ACL")
_ALLOWED = AclDecision(True, "server is allowed by the room's server ACL")
_NOT_ALLOWED = AclDecision(False, "server is not in the room's server ACL allow list")


class ServerAcl:
    """A compiled m.room.server_acl content."""

    __slots__ = ("_allow", "_cache", "_deny", "allow_ip_literals")

    # Decisions are remembered per server name: a room sees few distinct servers, and a
    # transaction asks about the same origin for every PDU.
    CACHE_SIZE = 4096

    def __init__(self, allow: GlobSet, deny: GlobSet, allow_ip_literals: bool) -> None:
        self._allow = allow
        self._deny = deny
        self.allow_ip_literals = allow_ip_literals
        self._cache: dict[str, AclDecision] = {}

    @classmethod
    def from_content(cls, content: object) -> ServerAcl:
        """Compile an ACL event's content; hostile shapes degrade the way Synapse's do."""
        if not isinstance(content, Mapping):
            content = {}
        allow = content.get("allow", [])
        deny = content.get("deny", [])
        ip_literals = content.get("allow_ip_literals", True)
        return cls(
            GlobSet(allow if isinstance(allow, list | tuple) else []),
            GlobSet(deny if isinstance(deny, list | tuple) else []),
            ip_literals if isinstance(ip_literals, bool) else True,
        )

    @property
    def allows_nobody(self) -> bool:
        """True when the allow list is empty: every server is locked out."""
        return self._allow.size == 0

    def check(self, server_name: str) -> AclDecision:
        """Decide whether `server_name` (port allowed) may take part in the room."""
        decision = self._cache.get(server_name)
        if decision is None:
            if len(self._cache) >= self.CACHE_SIZE:
                self._cache.clear()
            decision = self._cache[server_name] = self._decide(server_name)
        return decision

    def _decide(self, server_name: str) -> AclDecision:
        host = strip_port(server_name).lower()
        if not self.allow_ip_literals and is_ip_literal_host(host):
            return _IP_LITERAL
        if self._deny.matches(host):
            return _DENIED
        if self._allow.matches(host):
            return _ALLOWED
        return _NOT_ALLOWED


def check_server_acl(acl: ServerAcl | None, server_name: str) -> AclDecision:
    """Apply an optional ACL: a room without one allows everyone."""
    return _NO_ACL if acl is None else acl.check(server_name)
