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


class GlobSet:
    """A set of globs matched at a cost that does not grow with the number of globs.

    - exact names: one hash lookup; `*` alone: everything;
    - `*.suffix` globs: a hash set probed at each dot of the name; other `*suffix` and
      `prefix*` globs: hash sets probed with the name's suffixes / prefixes of the lengths
      present in the set;
    - every other glob is filed under one key that any name it matches must contain: a
      three-character run of one of its literal pieces, its literal start, or its literal
      end — whichever the fewest globs of the set share, so that common runs like `.ne`
      do not collect them all. A name probes its own runs, prefixes and suffixes, and only the globs filed under what it contains are matched one by
      one. Globs with none of these (`*a*`, `?*`) are scanned; there are few, and each
      costs O(len(name) * len(pattern)) at worst (see rules.glob).
    """

    __slots__ = (
        "_any",
        "_dot_suffixes",
        "_ends",
        "_end_lengths",
        "_exact",
        "_prefix_lengths",
        "_prefixes",
        "_scanned",
        "_starts",
        "_start_lengths",
        "_suffix_lengths",
        "_suffixes",
        "_trigram_keys",
        "_trigrams",
        "size",
    )

    def __init__(self, patterns: Iterable[object]) -> None:
        self._any = False
        self._exact: set[str] = set()
        self._dot_suffixes: set[str] = set()
        self._suffixes: set[str] = set()
        self._prefixes: set[str] = set()
        self._trigrams: dict[str, list[Glob]] = {}
        self._starts: dict[str, list[Glob]] = {}
        self._ends: dict[str, list[Glob]] = {}
        self._scanned: list[Glob] = []
        self.size = 0
        general: list[tuple[Glob, list[tuple[str, str]]]] = []
        for pattern in patterns:
            if not isinstance(pattern, str):
                continue
            self.size += 1
            glob = compile_glob(pattern)
            segs = glob.segments
            simple = len(segs) == 2 and "?" not in glob.pattern
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
        # File each general glob under its least shared key.
        shared: dict[tuple[str, str], int] = {}
        for _, keys in general:
            for k in keys:
                shared[k] = shared.get(k, 0) + 1
        for glob, keys in general:
            if not keys:
                self._scanned.append(glob)
                continue
            kind, literal = min(keys, key=lambda k: (shared[k], -len(k[1])))
            table = {"t": self._trigrams, "s": self._starts, "e": self._ends}[kind]
            table.setdefault(literal, []).append(glob)
        self._trigram_keys = frozenset(self._trigrams)
        self._suffix_lengths = _lengths(self._suffixes)
        self._prefix_lengths = _lengths(self._prefixes)
        self._start_lengths = _lengths(self._starts)
        self._end_lengths = _lengths(self._ends)

    def matches(self, name: str) -> bool:
        """Whether any glob matches `name` (which the caller has lower-cased)."""
        if self._any or name in self._exact:
            return True
        n = len(name)
        if self._dot_suffixes:
            dot = name.find(".")
            while dot != -1:
                if name[dot:] in self._dot_suffixes:
                    return True
                dot = name.find(".", dot + 1)
        for length in self._suffix_lengths:
            if length > n:
                break
            if name[n - length :] in self._suffixes:
                return True
        for length in self._prefix_lengths:
            if length > n:
                break
            if name[:length] in self._prefixes:
                return True
        keys = self._trigram_keys
        if keys:
            if len(keys) < 40:  # few: look for each in the name (C substring search)
                for run in keys:
                    if run in name and any(g.matches(name) for g in self._trigrams[run]):
                        return True
            else:  # many: look up each of the name's own runs
                get = self._trigrams.get
                for i in range(n - 2):
                    bucket = get(name[i : i + 3])
                    if bucket is not None and any(g.matches(name) for g in bucket):
                        return True
        for length in self._start_lengths:
            if length > n:
                break
            bucket = self._starts.get(name[:length])
            if bucket is not None and any(g.matches(name) for g in bucket):
                return True
        for length in self._end_lengths:
            if length > n:
                break
            bucket = self._ends.get(name[n - length :])
            if bucket is not None and any(g.matches(name) for g in bucket):
                return True
        return any(g.matches(name) for g in self._scanned)


def _keys(glob: Glob) -> list[tuple[str, str]]:
    """What any name the glob matches contains: its literal runs of three, its literal
    start, its literal end."""
    keys = [
        ("t", piece[i : i + 3])
        for seg in glob.segments
        for piece in seg.split("?")
        for i in range(len(piece) - 2)
    ]
    first, last = glob.segments[0].split("?")[0], glob.segments[-1].split("?")[-1]
    if first:
        keys.append(("s", first))
    if last:
        keys.append(("e", last))
    return keys


def _lengths(keys: Iterable[str]) -> tuple[int, ...]:
    return tuple(sorted({len(k) for k in keys}))


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
