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
    """A set of globs matched at a cost independent of its size for the common shapes.

    Exact names go in a hash set, `*suffix` and `prefix*` globs in sets probed with every
    suffix/prefix of the name; only general globs are scanned one by one.
    """

    __slots__ = ("_exact", "_general", "_prefixes", "_suffixes", "size")

    def __init__(self, patterns: Iterable[object]) -> None:
        self._exact: set[str] = set()
        self._suffixes: set[str] = set()
        self._prefixes: set[str] = set()
        self._general: list[Glob] = []
        self.size = 0
        for pattern in patterns:
            if not isinstance(pattern, str):
                continue
            self.size += 1
            glob = compile_glob(pattern)
            segs = glob.segments
            if glob.is_literal:
                self._exact.add(glob.pattern)
            elif "?" in glob.pattern or len(segs) > 2:
                self._general.append(glob)
            elif segs[0] == "":  # "*suffix" (also "*", suffix "")
                self._suffixes.add(segs[1])
            elif segs[1] == "":  # "prefix*"
                self._prefixes.add(segs[0])
            else:
                self._general.append(glob)

    def matches(self, name: str) -> bool:
        """Whether any glob matches `name` (which the caller has lower-cased)."""
        if name in self._exact:
            return True
        if self._suffixes:
            for i in range(len(name) + 1):
                if name[i:] in self._suffixes:
                    return True
        if self._prefixes:
            for i in range(len(name) + 1):
                if name[:i] in self._prefixes:
                    return True
        return any(glob.matches(name) for glob in self._general)


@dataclass(frozen=True, slots=True)
class AclDecision:
    allowed: bool
    reason: str


_NO_ACL = AclDecision(True, "no server ACL in the room")


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
            return AclDecision(False, "IP literals are not allowed by the room's server ACL")
        if self._deny.matches(host):
            return AclDecision(False, "server is denied by the room's server ACL")
        if self._allow.matches(host):
            return AclDecision(True, "server is allowed by the room's server ACL")
        return AclDecision(False, "server is not in the room's server ACL allow list")


def check_server_acl(acl: ServerAcl | None, server_name: str) -> AclDecision:
    """Apply an optional ACL: a room without one allows everyone."""
    return _NO_ACL if acl is None else acl.check(server_name)
