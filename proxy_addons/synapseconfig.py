"""modgud and Synapse's homeserver.yaml: the `modules:` snippet that loads modgud's
Synapse module for a config (`modgud synapse-config`), and what `check-config
--homeserver-config` says about a homeserver.yaml (both the module and the HTTP hook
judging the same events, the module reading another file, neither configured)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from proxy_addons.config import Config, ConfigError, YamlMapping, is_loopback, read_yaml
from proxy_addons.database import is_postgres, open_db

__all__ = ["MODULE_CLASS", "HomeserverModules", "homeserver_modules", "module_snippet"]

MODULE_CLASS = "modgud_synapse.ModgudModule"
ANTISPAM_CLASS = "synapse_http_antispam.HTTPAntispam"
# The module's distribution, beside proxy_addons/ in a checkout.
MODULE_DISTRIBUTION = Path(__file__).resolve().parents[1] / "synapse_module"


def module_snippet(config: Config, *, mode: str | None = None) -> str:
    """The `modules:` entry for homeserver.yaml, with what the operator must know around it
    as comments. `mode`: the module's own mode (audit, to trial it beside the hook)."""
    path = str(Path(config.path).resolve())
    distribution = MODULE_DISTRIBUTION if MODULE_DISTRIBUTION.is_dir() else "synapse_module"
    lines = [
        f"# modgud inside Synapse, for {config.server_name} ({path}).",
        "# Install it first, with the pip of Synapse's virtualenv, from the modgud checkout:",
    ]
    if is_postgres(config.database):
        lines += [
            f"#   /path/to/synapse-venv/bin/pip install '{distribution}[postgresql]'",
            f"# Synapse's user reads {path}; every Synapse process writes findings to the",
            f"# {open_db(config.database).describe()}; no admin token is used.",
        ]
    else:
        database = Path(config.database)
        lines += [
            f"#   /path/to/synapse-venv/bin/pip install {distribution}",
            f"# Synapse's user reads {path} and writes the database {database}",
            f"# (and its directory {database.parent}, for SQLite's journal); no admin token "
            "is used.",
        ]
    if config.hook is not None:
        lines += [
            f"# modgud.yaml also opens the HTTP hook ({config.hook}): remove any",
            f"# {ANTISPAM_CLASS} entry pointing at it, or every event is judged twice.",
        ]
    lines += [
        "modules:",
        f"  - module: {MODULE_CLASS}",
        "    config:",
        f"      config: {_yaml_string(path)}",
    ]
    if mode is not None:
        lines.append(f"      mode: {mode}")
    return "\n".join(lines) + "\n"


def _yaml_string(text: str) -> str:
    """A path as a YAML scalar: plain when that reads back the same, else single-quoted."""
    plain = text and not any(c in text for c in ":#'\"{}[],&*!|>%@`") and text == text.strip()
    return text if plain else "'" + text.replace("'", "''") + "'"


@dataclass(frozen=True, slots=True)
class Entry:
    line: int
    detail: str  # the module's config path, or the hook's base_url


@dataclass(frozen=True, slots=True)
class HomeserverModules:
    """What a homeserver.yaml loads of modgud."""

    path: str
    server_name: str | None
    modules: tuple[Entry, ...]  # modgud_synapse.ModgudModule entries
    hooks: tuple[Entry, ...]  # synapse-http-antispam entries pointing at modgud's hook
    other_hooks: tuple[Entry, ...]  # synapse-http-antispam entries pointing elsewhere

    def warnings(self, config: Config) -> list[str]:
        where = self.path
        found: list[str] = []
        if self.server_name is not None and self.server_name != config.server_name:
            found.append(
                f"{where}: server_name is {self.server_name}, modgud.yaml's is {config.server_name}"
            )
        if self.modules and self.hooks:
            found.append(
                f"{where}: both modgud's module (line {self.modules[0].line}) and "
                f"synapse-http-antispam for modgud's hook (line {self.hooks[0].line}, "
                f"{self.hooks[0].detail}) are configured: every event is judged twice, once "
                "over HTTP; remove the synapse-http-antispam entry"
            )
        if len(self.modules) > 1:
            found.append(f"{where}: modgud's module is listed {len(self.modules)} times")
        mine = str(Path(config.path).resolve())
        for entry in self.modules:
            if entry.detail != mine:
                found.append(f"{where}:{entry.line}: the module reads {entry.detail}, not {mine}")
        if not self.modules and not self.hooks:
            found.append(
                f"{where}: neither modgud's module nor its hook is configured: events that "
                "Synapse pulls itself, and single events inside transactions, are not judged "
                "(see `modgud synapse-config`)"
            )
        return found

    def describe(self) -> str:
        if self.modules:
            return f"module ({self.path}:{self.modules[0].line})"
        if self.hooks:
            return f"HTTP hook ({self.path}:{self.hooks[0].line})"
        return "none"


def homeserver_modules(path: str, config: Config) -> HomeserverModules:
    """Read what `path` (a homeserver.yaml) loads of modgud; ConfigError for a file that is
    not YAML or whose `modules:` is not a list of mappings."""
    tree = read_yaml(path)
    server_name = tree.data.get("server_name")
    raw = tree.data.get("modules") or []
    if not isinstance(raw, list):
        raise ConfigError(path, "modules", tree.lines.get("modules"), "expected a list")
    base = Path(path).resolve().parent
    modules: list[Entry] = []
    hooks: list[Entry] = []
    other: list[Entry] = []
    for index, entry in enumerate(raw):
        key = f"modules[{index}]"
        if not isinstance(entry, YamlMapping):
            raise ConfigError(path, key, tree.lines.get("modules"), "expected a mapping")
        name = entry.data.get("module")
        options = entry.data.get("config")
        options = options.data if isinstance(options, YamlMapping) else {}
        line = entry.lines.get("module", entry.line)
        if name == MODULE_CLASS:
            target = options.get("config")
            if not isinstance(target, str):
                raise ConfigError(
                    path, f"{key}.config.config", line, "expected the modgud.yaml path"
                )
            # Synapse opens a relative path from its working directory, unknown here: it
            # is read against homeserver.yaml's (the snippet prints absolute paths).
            modules.append(Entry(line, str((base / target).resolve())))
        elif name == ANTISPAM_CLASS:
            url = options.get("base_url")
            url = url if isinstance(url, str) else ""
            (hooks if _points_at(url, config) else other).append(Entry(line, url))
    return HomeserverModules(
        path,
        server_name if isinstance(server_name, str) else None,
        tuple(modules),
        tuple(hooks),
        tuple(other),
    )


def _points_at(url: str, config: Config) -> bool:
    """Whether synapse-http-antispam's base_url is modgud's hook listener."""
    if config.hook is None:
        return False
    try:
        parts = urlsplit(url)
        host, port = parts.hostname or "", parts.port
    except ValueError:
        return False
    if port != config.hook.port:
        return False
    same = host == config.hook.host.lower()
    both_local = is_loopback(host) and (
        is_loopback(config.hook.host) or config.hook.host in ("0.0.0.0", "::")
    )
    return same or both_local
