"""modgud.yaml: loading and validation. Every error names the file, the key and the line."""

from __future__ import annotations

import enum
import ipaddress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import yaml
from yaml.constructor import ConstructorError

from proxy_addons.database import is_postgres
from rules.policy import ACTIONS, CHECKS, SEVERITIES, CheckActions, CheckSetting
from rules.servername import parse_server_name

__all__ = [
    "Config",
    "ConfigError",
    "KeyServer",
    "Listen",
    "Management",
    "Mode",
    "YamlMapping",
    "exposure_warnings",
    "is_loopback",
    "load_config",
    "read_yaml",
]


class ConfigError(Exception):
    """A config problem: `str()` is `file:line: key: message`."""

    def __init__(self, path: str, key: str, line: int | None, message: str) -> None:
        self.path, self.key, self.line, self.message = path, key, line, message
        where = f"{path}:{line}" if line else path
        super().__init__(f"{where}: {key}: {message}" if key else f"{where}: {message}")


class Mode(enum.StrEnum):
    ENFORCE = "enforce"
    AUDIT = "audit"
    SINK = "sink"  # a mirror's copy of the traffic: audit, answered locally, never forwarded


@dataclass(frozen=True, slots=True)
class Listen:
    host: str
    port: int

    def __str__(self) -> str:
        return f"{self.host}:{self.port}"


@dataclass(frozen=True, slots=True)
class KeyServer:
    """A notary modgud asks for server keys the homeserver's own key API does not serve
    (Synapse serves only keys it fetched from the origin itself), like Synapse's
    `trusted_key_servers`."""

    server_name: str
    verify_keys: tuple[tuple[str, str], ...]  # (key ID, unpadded base64 public key)
    url: str
    verify_tls: bool = True


@dataclass(frozen=True, slots=True)
class Management:
    """`management:` — the management room: where modgud's bot account posts knocks, leaks
    and alarms and takes moderators' commands (proxy_addons/management.py)."""

    room_id: str
    token: str = field(repr=False)
    client_api: str
    moderator_level: int = 50
    leak_interval_seconds: float = 600.0
    policy_list: str | None = None  # where `ban` writes; default the first policy list
    alarms: bool = True
    alarm_window_seconds: float = 60.0  # how often the alarms' counters are compared


@dataclass(frozen=True, slots=True)
class Config:
    path: str
    server_name: str
    upstream: str
    inbound: Listen
    metrics: Listen | None
    hook: Listen | None
    hook_token: str | None = field(repr=False)
    admin_api: str
    admin_token: str | None = field(repr=False)
    mode: Mode = Mode.ENFORCE
    on_error: str = "open"
    database: str = "modgud.db"
    tls_certificate: str | None = None
    tls_key: str | None = None
    verify_signatures: bool = True
    state_ttl_seconds: float = 300.0
    state_timeout_seconds: float = 5.0
    hook_state_timeout_seconds: float = 1.0
    max_body_bytes: int = 12 * 1024 * 1024
    # Event-index rows not seen for this many days are pruned; 0 keeps them for ever.
    index_retention_days: int = 30
    trusted_key_servers: tuple[KeyServer, ...] = ()
    # policy:
    participation_rooms: tuple[str, ...] = ()
    policy_lists: tuple[str, ...] = ()
    spaces: tuple[str, ...] = ()
    check_actions: CheckActions = field(default_factory=CheckActions)
    policy_refresh_seconds: float = 60.0
    # homeserver: the Client-Server API and a room admin's token, for approve/deny
    client_api: str = ""
    room_admin_token: str | None = field(default=None, repr=False)
    # servers that may appear as a label of the per-server metrics (bounded by the operator)
    metrics_servers: tuple[str, ...] = ()
    # outbound: the homeserver's https_proxy (the federation requests it sends itself)
    outbound: Listen | None = None
    outbound_ca_dir: str = "ca"  # mitmproxy's confdir: the CA the homeserver must trust
    outbound_verify_tls: bool = True  # verify remote servers' certificates, as Synapse does
    outbound_ca_file: str | None = None  # CA bundle for them instead of the system's roots
    outbound_signing_key: Any = field(default=None, repr=False)  # to strip and re-sign
    management: Management | None = None

    @property
    def fail_open(self) -> bool:
        return self.on_error == "open"

    @property
    def enforcing(self) -> bool:
        return self.mode is Mode.ENFORCE


class _Node:
    """A YAML mapping with the line of every key, for error messages."""

    def __init__(
        self, path: str, prefix: str, value: dict[str, Any], lines: dict[str, int], line: int
    ) -> None:
        self.path, self.prefix, self.value, self.lines, self.line = path, prefix, value, lines, line
        self.used: set[str] = set()

    def key(self, name: str) -> str:
        return f"{self.prefix}{name}"

    def error(self, name: str, message: str) -> ConfigError:
        return ConfigError(self.path, self.key(name), self.lines.get(name, self.line), message)

    def get(
        self, name: str, kind: type | tuple[type, ...], default: Any = None, required: bool = False
    ) -> Any:
        self.used.add(name)
        if name not in self.value or self.value[name] is None:
            if required:
                raise self.error(name, "is required")
            return default
        value = self.value[name]
        if kind is not bool and isinstance(value, bool) or not isinstance(value, kind):
            expected = (
                kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
            )
            shown = repr(value)[:100]
            raise self.error(name, f"expected {expected}, got {type(value).__name__} {shown}")
        if isinstance(value, str) and "\x00" in value:  # no file, URL or name holds one
            raise self.error(name, "contains a NUL character")
        return value

    def child(self, name: str, required: bool = False) -> _Node | None:
        self.used.add(name)
        raw = self.value.get(name)
        if raw is None:
            if required:
                raise self.error(name, "is required")
            return None
        if not isinstance(raw, YamlMapping):
            raise self.error(name, f"expected a mapping, got {type(raw).__name__}")
        return _Node(self.path, self.key(name) + ".", raw.data, raw.lines, raw.line)

    def reject_unknown(self) -> None:
        for name in self.value:
            if name not in self.used:
                raise self.error(name, "unknown key")


class YamlMapping:
    """A YAML mapping as read: its data (nested mappings are YamlMappings too), the line of
    each key and of the mapping itself."""

    def __init__(self, data: dict[str, Any], lines: dict[str, int], line: int) -> None:
        self.data, self.lines, self.line = data, lines, line


def _construct(node: yaml.Node, within: set[int] | None = None) -> Any:
    """Plain data with the line of every key; raises yaml.YAMLError (with the place) for
    what is not plain data. `within`: the collections being built, around this node."""
    if isinstance(node, yaml.MappingNode | yaml.SequenceNode):
        within = set() if within is None else within
        if id(node) in within:  # `&a [*a]`: would recurse forever
            raise ConstructorError(None, None, "an alias refers to itself", node.start_mark)
        within.add(id(node))
        try:
            return _construct_collection(node, within)
        finally:
            within.discard(id(node))
    try:
        return yaml.constructor.SafeConstructor().construct_object(node)  # scalars, typed
    except Exception:  # noqa: BLE001 - PyYAML's constructors raise what their parsing meets
        # a tag its value does not fit: `!!int x` (ValueError), `!!bool maybe` (KeyError)…
        what = f"{str(node.value)[:50]!r} is not a valid {node.tag}"
        raise ConstructorError(None, None, what, node.start_mark) from None


def _construct_collection(node: yaml.MappingNode | yaml.SequenceNode, within: set[int]) -> Any:
    if isinstance(node, yaml.SequenceNode):
        return [_construct(v, within) for v in node.value]
    data: dict[str, Any] = {}
    lines: dict[str, int] = {}
    for key_node, value_node in node.value:
        if not isinstance(key_node, yaml.ScalarNode):
            what = "a key must be a plain value, not a list or a mapping"
            raise ConstructorError(None, None, what, key_node.start_mark)
        key = str(key_node.value)
        data[key] = _construct(value_node, within)
        lines[key] = key_node.start_mark.line + 1
    return YamlMapping(data, lines, node.start_mark.line + 1)


def is_loopback(host: str) -> bool:
    """Whether a listen host is reachable from this machine only (127.0.0.0/8, ::1,
    localhost). Any other name may resolve to anything, so it does not count."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _parse_listen(node: _Node, name: str, default: str | None) -> Listen | None:
    text = node.get(name, str, default)
    if text is None:
        return None
    host, sep, port = text.rpartition(":")
    # A port of 1 to 5 ASCII digits: str.isdigit() is also true of digits int() refuses,
    # like "²", and int() refuses more than 4,300 of them.
    digits = len(port) <= 5 and port.isascii() and port.isdigit()
    if not sep or not digits or not 0 < int(port) < 65536 or not host:
        raise node.error(name, f"expected host:port, got {text!r}")
    return Listen(host.strip("[]"), int(port))


def _parse_url(node: _Node, name: str, required: bool, default: str | None = None) -> str | None:
    url = node.get(name, str, default, required=required)
    if url is None:
        return None
    try:
        parts = urlsplit(url)
        valid = parts.scheme in ("http", "https") and bool(parts.hostname)
        parts.port  # noqa: B018 - raises ValueError for a port out of range
    except ValueError:  # "http://[::1" and the like
        valid = False
    if not valid:
        raise node.error(name, f"expected an http(s):// URL, got {url!r}")
    return url.rstrip("/")


def _is_file(path: Path) -> bool:
    try:
        return path.is_file()
    except OSError:  # a name too long: is_file() raises that one
        return False


MAX_TOKEN_BYTES = 4096


# What a secret is when the config is loaded without reading secrets (the Synapse module).
NOT_READ = "(not read)"


def _read_token(node: _Node, name: str, base: Path, secrets: bool = True) -> str | None:
    path = node.get(name, str)
    if path is None:
        return None
    if not secrets:
        return NOT_READ
    full = (base / path).resolve()
    # The file's content is a secret: no message below quotes any of it.
    try:
        with full.open("rb") as f:
            raw = f.read(MAX_TOKEN_BYTES + 1)
    except OSError as e:
        raise node.error(name, f"cannot read {full}: {e.strerror}") from None
    if len(raw) > MAX_TOKEN_BYTES:
        raise node.error(name, f"{full} is over {MAX_TOKEN_BYTES} bytes: not a token file")
    try:
        token = raw.decode("utf-8").strip()
    except UnicodeDecodeError:
        raise node.error(name, f"{full} is not UTF-8 text") from None
    if not token:
        raise node.error(name, f"{full} is empty")
    if not (token.isascii() and token.isprintable()) or " " in token:
        # It goes into an Authorization header as it is.
        raise node.error(name, f"{full} must hold one token: printable ASCII, no spaces")
    return token


def read_yaml(path: str) -> YamlMapping:
    """A YAML file whose top level is a mapping, with the line of every key; raises
    ConfigError naming the file and the line for what cannot be read or parsed."""
    try:
        raw = Path(path).read_bytes()
    except OSError as e:
        raise ConfigError(path, "", None, f"cannot read: {e.strerror}") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        raise ConfigError(path, "", line, f"not UTF-8: {e.reason} at byte {e.start}") from None
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
        tree = _construct(root) if root is not None else None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        raise ConfigError(
            path, "", mark.line + 1 if mark else None, f"not valid YAML: {e}"
        ) from None
    except RecursionError:
        raise ConfigError(path, "", None, "not valid YAML: nested too deeply") from None
    if not isinstance(tree, YamlMapping):
        raise ConfigError(path, "", 1, "expected a mapping at the top level")
    return tree


def load_config(path: str | Path, *, secrets: bool = True) -> Config:
    """Load and validate a config file; raises ConfigError naming file, key and line.

    `secrets=False` (the Synapse module, which runs as Synapse's user and needs none of
    them): token files, the TLS certificate and key and the signing key are neither read
    nor checked; tokens read as NOT_READ."""
    path = str(path)
    tree = read_yaml(path)
    base = Path(path).resolve().parent
    top = _Node(path, "", tree.data, tree.lines, 1)

    server_name = top.get("server_name", str, required=True)
    if parse_server_name(server_name) is None:
        raise top.error("server_name", f"not a valid server name: {server_name!r}")
    upstream = _parse_url(top, "upstream", required=True)
    assert upstream is not None

    listen = top.child("listen")
    if listen is None:
        listen = _Node(path, "listen.", {}, {}, 1)
    inbound = _parse_listen(listen, "inbound", "0.0.0.0:8448")
    assert inbound is not None
    metrics = _parse_listen(listen, "metrics", "127.0.0.1:9464")
    outbound = _parse_listen(listen, "outbound", None)
    listen.reject_unknown()

    tls = top.child("tls")
    cert = key = None
    if tls is not None:
        cert = tls.get("certificate", str, required=True)
        key = tls.get("key", str, required=True)
        for name, value in (("certificate", cert), ("key", key)):
            if secrets and not _is_file(base / value):
                raise tls.error(name, f"no such file: {base / value}")
        cert, key = str(base / cert), str(base / key)
        tls.reject_unknown()

    mode_text = top.get("mode", str, "enforce")
    if mode_text not in {m.value for m in Mode}:
        raise top.error("mode", f"expected enforce, audit or sink, got {mode_text!r}")
    on_error = top.get("on_error", str, "open")
    if on_error not in ("open", "closed"):
        raise top.error("on_error", f"expected open or closed, got {on_error!r}")

    hook_node = top.child("hook")
    hook = hook_token = None
    if hook_node is not None:
        hook = _parse_listen(hook_node, "listen", "127.0.0.1:8099")
        hook_token = _read_token(hook_node, "token_file", base, secrets)
        if hook is not None and hook_token is None and not is_loopback(hook.host):
            # Whoever reaches the hook can have events judged, rooms refetched and
            # findings recorded: off loopback, only the homeserver may call it.
            raise hook_node.error(
                "listen",
                f"{hook} is not a loopback address: set hook.token_file too "
                "(synapse-http-antispam's authorization), or listen on 127.0.0.1",
            )
        hook_node.reject_unknown()

    hs = top.child("homeserver")
    admin_api = upstream
    admin_token = room_admin_token = None
    client_api = upstream
    if hs is not None:
        admin_api = _parse_url(hs, "admin_api", required=False, default=upstream) or upstream
        admin_token = _read_token(hs, "access_token_file", base, secrets)
        client_api = _parse_url(hs, "client_api", required=False, default=admin_api) or admin_api
        room_admin_token = _read_token(hs, "room_admin_token_file", base, secrets)
        hs.reject_unknown()

    database = _parse_database(top, base)
    verify = top.get("verify_signatures", bool, True)
    state = top.child("state")
    ttl, timeout, hook_timeout = 300.0, 5.0, 1.0
    if state is not None:
        ttl = _seconds(state, "ttl_seconds", ttl)
        timeout = _seconds(state, "timeout_seconds", timeout)
        hook_timeout = _seconds(state, "hook_timeout_seconds", hook_timeout)
        state.reject_unknown()
    max_body = top.get("max_body_bytes", int, 12 * 1024 * 1024)
    if max_body < 65_536:
        raise top.error("max_body_bytes", "must be at least 65536")
    retention = top.get("index_retention_days", int, 30)
    if not 0 <= retention <= 36_500:
        raise top.error("index_retention_days", "must be a number of days from 0 (keep) to 36500")
    key_servers = _parse_key_servers(top)
    outbound_options = _parse_outbound(top, base, database, outbound is not None, secrets)
    metrics_servers = _parse_metrics(top)
    participation_rooms: tuple[str, ...] = ()
    policy_lists: tuple[str, ...] = ()
    spaces: tuple[str, ...] = ()
    actions = CheckActions()
    refresh = 60.0
    policy = top.child("policy")
    if policy is not None:
        participation_rooms = _room_ids(policy, "participation_rooms")
        policy_lists = _room_ids(policy, "policy_lists")
        spaces = _room_ids(policy, "spaces")
        actions = CheckActions(
            _checks(policy, "checks"),
            _scoped_checks(policy, "space_checks"),
            _scoped_checks(policy, "room_checks"),
        )
        refresh = _seconds(policy, "refresh_seconds", refresh)
        policy.reject_unknown()
    management = _parse_management(top, base, client_api, policy_lists, secrets)
    top.reject_unknown()

    return Config(
        path=path,
        server_name=server_name,
        upstream=upstream,
        inbound=inbound,
        metrics=metrics,
        outbound=outbound,
        **outbound_options,
        metrics_servers=metrics_servers,
        hook=hook,
        hook_token=hook_token,
        admin_api=admin_api,
        admin_token=admin_token,
        mode=Mode(mode_text),
        on_error=on_error,
        database=database,
        tls_certificate=cert,
        tls_key=key,
        verify_signatures=verify,
        state_ttl_seconds=ttl,
        state_timeout_seconds=timeout,
        hook_state_timeout_seconds=hook_timeout,
        max_body_bytes=max_body,
        index_retention_days=retention,
        trusted_key_servers=key_servers,
        participation_rooms=participation_rooms,
        policy_lists=policy_lists,
        spaces=spaces,
        check_actions=actions,
        policy_refresh_seconds=refresh,
        client_api=client_api,
        room_admin_token=room_admin_token,
        management=management,
    )


def _parse_management(
    top: _Node, base: Path, client_api: str, policy_lists: tuple[str, ...], secrets: bool
) -> Management | None:
    node = top.child("management")
    if node is None:
        return None
    room = node.get("room", str, required=True)
    if not room.startswith("!") or len(room) < 2:
        raise node.error("room", f"expected the management room's ID (!…), got {room!r}")
    token = _read_token(node, "access_token_file", base, secrets)
    if token is None:
        raise node.error("access_token_file", "is required (the bot account's access token)")
    api = _parse_url(node, "client_api", required=False, default=client_api) or client_api
    level = node.get("moderator_level", int, 50)
    if not 0 <= level <= 2**53:
        raise node.error("moderator_level", "must be a power level from 0")
    interval = _seconds(node, "leak_interval_seconds", 600.0)
    policy_list = node.get("policy_list", str)
    if policy_list is not None and not policy_list.startswith("!"):
        raise node.error("policy_list", f"expected a room ID (!…), got {policy_list!r}")
    if policy_list is None and policy_lists:
        policy_list = policy_lists[0]
    alarms = node.get("alarms", bool, True)
    window = _seconds(node, "alarm_window_seconds", 60.0)
    node.reject_unknown()
    return Management(room, token, api, level, interval, policy_list, alarms, window)


def _seconds(node: _Node, name: str, default: float) -> float:
    """A positive number of seconds."""
    value = node.get(name, (int, float), default)
    try:
        seconds = float(value)
    except OverflowError:  # an integer of hundreds of digits
        raise node.error(name, "must be a number of seconds, not that many") from None
    if not seconds > 0:  # NaN too
        raise node.error(name, "must be positive")
    return seconds


def _room_ids(node: _Node, name: str) -> tuple[str, ...]:
    values = node.get(name, list, [])
    for value in values:
        if not isinstance(value, str) or not value.startswith("!"):
            raise node.error(name, f"expected room IDs (!…), got {value!r}")
    return tuple(values)


def _parse_key_servers(top: _Node) -> tuple[KeyServer, ...]:
    entries = top.get("trusted_key_servers", list, [])
    out = []
    for i, entry in enumerate(entries):
        name = f"trusted_key_servers[{i}]"
        if not isinstance(entry, YamlMapping):
            raise top.error("trusted_key_servers", f"entry {i}: expected a mapping")
        node = _Node(top.path, name + ".", entry.data, entry.lines, entry.line)
        server_name = node.get("server_name", str, required=True)
        if parse_server_name(server_name) is None:
            raise node.error("server_name", f"not a valid server name: {server_name!r}")
        keys_node = node.child("verify_keys", required=True)
        assert keys_node is not None
        keys = []
        for key_id in keys_node.value:
            key = keys_node.get(key_id, str, required=True)
            if not key_id.startswith("ed25519:"):
                raise keys_node.error(key_id, "expected an ed25519:… key ID")
            keys.append((key_id, key))
        if not keys:
            raise node.error("verify_keys", "needs at least one key")
        url = _parse_url(node, "url", required=False, default=f"https://{server_name}")
        assert url is not None
        verify_tls = node.get("verify_tls", bool, True)
        node.reject_unknown()
        out.append(KeyServer(server_name, tuple(keys), url, verify_tls))
    return tuple(out)


def _parse_metrics(top: _Node) -> tuple[str, ...]:
    """`metrics: {servers: [...]}`: the servers whose names may label metrics, like
    Synapse's federation_metrics_domains (a bounded list, so label sets stay bounded)."""
    node = top.child("metrics")
    if node is None:
        return ()
    servers = node.get("servers", list, [])
    for value in servers:
        if not isinstance(value, str) or parse_server_name(value) is None:
            raise node.error("servers", f"expected server names, got {value!r}")
    if len(servers) > 1000:
        raise node.error("servers", "at most 1000 servers (each is a label value)")
    node.reject_unknown()
    return tuple(s.lower() for s in servers)


def _parse_database(top: _Node, base: Path) -> str:
    """`database:` an SQLite path (relative to the config's directory) or a PostgreSQL URL
    (postgresql://user[:password]@host[:port]/dbname; also whatever libpq takes after `?`,
    sslmode say). Opened and checked by `modgud check-config`; `run` opens it at start."""
    database = top.get("database", str, "modgud.db")
    if not database.strip():
        raise top.error("database", "empty: give an SQLite path or a postgresql:// URL")
    if "://" not in database:
        return str(base / database)
    parts = urlsplit(database)
    if not is_postgres(database):
        raise top.error(
            "database",
            f"{parts.scheme}:// is not a database modgud speaks (SQLite path or postgresql://)",
        )
    if not parts.path.strip("/") and "dbname=" not in parts.query:
        raise top.error("database", "the PostgreSQL URL names no database (…/dbname)")
    return database


def _parse_outbound(
    top: _Node, base: Path, database: str, listening: bool, secrets: bool = True
) -> dict[str, Any]:
    """The `outbound:` section: how modgud, as the homeserver's https_proxy, talks TLS to
    the homeserver (its CA) and to remote servers, and the key to re-sign with."""
    node = top.child("outbound")
    # The CA is kept next to an SQLite database by default: that directory is modgud's to
    # write; with PostgreSQL, next to the config.
    home = base if is_postgres(database) else Path(database).parent
    out: dict[str, Any] = {"outbound_ca_dir": str(home / "ca")}
    if node is None:
        return out
    if not listening:
        raise top.error("outbound", "set listen.outbound to run the outbound listener")
    ca_dir = node.get("ca_dir", str)
    if ca_dir is not None:
        out["outbound_ca_dir"] = str(base / ca_dir)
    out["outbound_verify_tls"] = node.get("verify_tls", bool, True)
    ca_file = node.get("ca_file", str)
    if ca_file is not None:
        if not _is_file(base / ca_file):
            raise node.error("ca_file", f"no such file: {base / ca_file}")
        out["outbound_ca_file"] = str(base / ca_file)
    key_file = node.get("signing_key_file", str)
    if key_file is not None and secrets:
        out["outbound_signing_key"] = _read_signing_key(node, base / key_file)
    node.reject_unknown()
    return out


def _read_signing_key(node: _Node, path: Path) -> Any:
    """The homeserver's signing key, in Synapse's format (`ed25519 a_AbCd <seed>`)."""
    from signedjson.key import read_signing_keys

    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise node.error("signing_key_file", f"cannot read {path}: {e.strerror}") from None
    try:
        keys = read_signing_keys(text.splitlines())
    except Exception as e:  # noqa: BLE001 - signedjson raises several kinds
        raise node.error(
            "signing_key_file", f"{path}: not a signing key in Synapse's format ({e})"
        ) from None
    if not keys:
        raise node.error("signing_key_file", f"{path}: no key in it")
    return keys[0]


def _checks(node: _Node, name: str) -> dict[str, CheckSetting]:
    """`{check: action}` or `{check: {action, severity}}`, every name and value checked."""
    checks = node.child(name)
    if checks is None:
        return {}
    out: dict[str, CheckSetting] = {}
    for check in checks.value:
        if check not in CHECKS:
            raise checks.error(check, f"unknown check; expected one of {', '.join(CHECKS)}")
        raw = checks.value[check]
        if isinstance(raw, bool):  # YAML 1.1 reads a bare `off` as false (and `on` as true)
            setting = CheckSetting("drop" if raw else "off")
        elif isinstance(raw, str):
            setting = CheckSetting(checks.get(check, str))
        else:
            sub = checks.child(check, required=True)
            assert sub is not None
            setting = CheckSetting(sub.get("action", str, "drop"), sub.get("severity", str))
            if setting.severity is not None and setting.severity not in SEVERITIES:
                raise sub.error("severity", f"expected {', '.join(SEVERITIES)}")
            sub.reject_unknown()
        if setting.action not in ACTIONS:
            raise checks.error(
                check, f"action must be {', '.join(ACTIONS)}, not {setting.action!r}"
            )
        checks.used.add(check)
        out[check] = setting
    return out


def _scoped_checks(node: _Node, name: str) -> dict[str, dict[str, CheckSetting]]:
    scoped = node.child(name)
    if scoped is None:
        return {}
    out = {}
    for room_id in scoped.value:
        if not room_id.startswith("!"):
            raise scoped.error(room_id, "expected a room ID (!…)")
        out[room_id] = _checks(scoped, room_id)
    return out


def exposure_warnings(config: Config) -> list[str]:
    """What the operator explicitly opened beyond loopback, and what that exposes (each
    bind off loopback needs a setting; none is a default, but each deserves a word)."""
    out = []
    if config.metrics is not None and not is_loopback(config.metrics.host):
        out.append(
            f"listen.metrics {config.metrics} is not a loopback address: whoever reaches it "
            "reads modgud's metrics (firewall it to Prometheus)"
        )
    if config.outbound is not None and not is_loopback(config.outbound.host):
        out.append(
            f"listen.outbound {config.outbound} is not a loopback address: whoever reaches "
            "it can use it as an HTTP proxy (firewall it to the homeserver)"
        )
    if config.hook is not None and not is_loopback(config.hook.host):
        out.append(
            f"hook.listen {config.hook} is not a loopback address: its token crosses the "
            "network in plain HTTP (keep it on a private network)"
        )
    return out
