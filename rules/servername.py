"""Server names (spec: Appendices, "Server Name").

server_name = hostname [ ":" port ]
hostname    = IPv4address / "[" IPv6address "]" / dns-name
port        = 1*5DIGIT
dns-name    = 1*255dns-char ; dns-char = DIGIT / ALPHA / "-" / "."
IPv6address = 2*45IPv6char  ; IPv6char = DIGIT / %x41-46 / %x61-66 / ":" / "."
"""

from __future__ import annotations

import functools
import ipaddress
import re
from dataclasses import dataclass

__all__ = ["ServerName", "parse_server_name", "server_of_user", "strip_port"]

_DNS_NAME = re.compile(r"[A-Za-z0-9.\-]{1,255}")
_IPV6_CHARS = re.compile(r"[0-9A-Fa-f:.]{2,45}")
_PORT = re.compile(r"[0-9]{1,5}")
_IPV4 = re.compile(r"[0-9]{1,3}(?:\.[0-9]{1,3}){3}")


@dataclass(frozen=True, slots=True)
class ServerName:
    """A parsed server name. `host` keeps IPv6 brackets, as ACL matching expects."""

    host: str
    port: int | None
    is_ip_literal: bool

    def __str__(self) -> str:
        return self.host if self.port is None else f"{self.host}:{self.port}"


def _split_port(name: str) -> tuple[str, str | None]:
    if name.startswith("["):
        end = name.find("]")
        if end == -1:
            return name, None
        rest = name[end + 1 :]
        if rest.startswith(":"):
            return name[: end + 1], rest[1:]
        return name, None
    host, sep, port = name.rpartition(":")
    if not sep:
        return name, None
    return host, port


def parse_server_name(name: object) -> ServerName | None:
    """Parse and validate a server name; None when it is not one."""
    if not isinstance(name, str) or not name or len(name) > 255 + 6:
        return None
    return _parse(name)


@functools.lru_cache(maxsize=8192)  # a few servers account for most traffic
def _parse(name: str) -> ServerName | None:
    host, port_text = _split_port(name)
    port: int | None = None
    if port_text is not None:
        if not _PORT.fullmatch(port_text):
            return None
        port = int(port_text)
        if port > 65535:
            return None
    if host.startswith("["):
        inner = host[1:-1] if host.endswith("]") else ""
        if not _IPV6_CHARS.fullmatch(inner):
            return None
        try:
            ipaddress.IPv6Address(inner)
        except ValueError:
            return None
        return ServerName(host, port, True)
    if _IPV4.fullmatch(host):
        try:
            ipaddress.IPv4Address(host)
        except ValueError:
            return None
        return ServerName(host, port, True)
    if not _DNS_NAME.fullmatch(host):
        return None
    return ServerName(host, port, False)


def strip_port(name: str) -> str:
    """The host part of a server name, brackets kept; the name itself if it has no port.

    Used for ACL matching, which ignores ports (spec: m.room.server_acl). Works on
    invalid names too, so a hostile name is still matched rather than skipped.
    """
    host, _ = _split_port(name)
    return host


def server_of_user(user_id: object) -> str | None:
    """The server part of a user ID (`@localpart:server`), or None when malformed."""
    if not isinstance(user_id, str) or not user_id.startswith("@"):
        return None
    _, sep, server = user_id.partition(":")
    if not sep or parse_server_name(server) is None:
        return None
    return server
