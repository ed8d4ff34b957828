"""Fuzzing load_config: whatever the file holds, it loads or raises ConfigError (file, key,
line and message; proxy_addons/config.py), never anything else."""

from __future__ import annotations

import pytest
import yaml
from hypothesis import strategies as st
from signedjson.key import generate_signing_key, write_signing_keys

from proxy_addons.config import Config, ConfigError, load_config
from tests.fuzz.harness import fuzz
from tests.fuzz.strategies import json_values, mangled, mutated, text

FILES = ("token", "empty", "hs.signing.key", "garbage", "cert.pem", "missing", "sub", "")

VALID = {
    "server_name": "hs.test",
    "upstream": "http://127.0.0.1:8008",
    "mode": "enforce",
    "on_error": "closed",
    "database": "modgud.db",
    "verify_signatures": True,
    "max_body_bytes": 65536,
    "listen": {"inbound": "0.0.0.0:8448", "metrics": "127.0.0.1:9464", "outbound": "[::1]:8449"},
    "tls": {"certificate": "cert.pem", "key": "cert.pem"},
    "hook": {"listen": "127.0.0.1:8099", "token_file": "token"},
    "homeserver": {
        "admin_api": "http://127.0.0.1:8008",
        "access_token_file": "token",
        "client_api": "https://hs.test",
        "room_admin_token_file": "token",
    },
    "state": {"ttl_seconds": 300, "timeout_seconds": 5.0, "hook_timeout_seconds": 1},
    "trusted_key_servers": [
        {
            "server_name": "matrix.org",
            "verify_keys": {"ed25519:auto": "Noi6WqcDj0QmPxCNQqgezwTlBKrfqehY1u2FyWP9uYw"},
            "url": "https://matrix.org",
            "verify_tls": True,
        }
    ],
    "metrics": {"servers": ["good.test", "[::1]:8448"]},
    "outbound": {"ca_dir": "ca", "verify_tls": False, "signing_key_file": "hs.signing.key"},
    "policy": {
        "participation_rooms": ["!a:hs.test"],
        "policy_lists": ["!bans:hs.test"],
        "spaces": ["!space:hs.test"],
        "refresh_seconds": 60,
        "checks": {
            "acl": "drop",
            "leaks": {"action": "flag", "severity": "high"},
            "edu_impersonation": False,
        },
        "space_checks": {"!space:hs.test": {"acl": "flag"}},
        "room_checks": {"!a:hs.test": {"signature": "off"}},
    },
}

# What YAML can say beyond plain data: tags, anchors, aliases, directives, odd scalars.
YAML_JUNK = (
    "!!python/object/apply:os.system ['true']",
    "!!python/name:os.system",
    "!!int x",
    "!!int 0x_",
    "!!float nan",
    "!!float abc",
    "!!binary '%%%'",
    "!!timestamp 2001-13-45",
    "!!bool maybe",
    "!!set {a, b}",
    "!!omap [a: 1, a: 2]",
    "!custom x",
    "&a [*a]",
    "*nowhere",
    "&a {k: *a}",
    "? [a, b]\n: c",
    "%YAML 1.3\n---\na: 1",
    "--- a\n--- b",
    "[" * 1000,
    "{" * 1000,
    "a:\n\tb: 1",
    ".inf",
    "-.inf",
    ".nan",
    "1" * 5000,
    "0o777",
    "1e400",
    "ä:ö",
    "\ufeffa: 1",
    "\x00",
    "'unterminated",
    "0.0.0.0:²",
    "host:٣",
    "http://[abc",
    "http://[::1",
    "https://h:99999999",
    "tok\x00en",
    "/" + "a" * 5000,
    "..",
)
yaml_junk = st.sampled_from(YAML_JUNK)
scalars = (
    st.sampled_from(FILES)
    | yaml_junk
    | st.sampled_from([0, -1, 1, 65535, 65536, 10**30, 0.5, -0.0, float("inf"), True, None])
    | text
)
values = json_values | scalars | st.lists(scalars, max_size=3)


def _dump(value: object) -> str:
    try:
        return yaml.safe_dump(value, allow_unicode=True)
    except (yaml.YAMLError, ValueError, TypeError):
        return "{}"


@st.composite
def near_valid_configs(draw: st.DrawFn) -> str:
    """The full valid config with values replaced, keys dropped or added, sections
    retyped; dumped as YAML, then perhaps edited as text."""
    config = draw(mutated(VALID, max_mutations=4))
    if isinstance(config, dict) and draw(st.booleans()):
        section = draw(st.sampled_from(sorted(VALID)))
        config[section] = draw(values | st.dictionaries(text | st.sampled_from(FILES), values))
    result = _dump(config)
    if draw(st.booleans()):
        lines = result.splitlines()
        pos = draw(st.integers(0, len(lines)))
        edit = draw(st.sampled_from(["insert", "delete", "indent", "junk-value"]))
        if edit == "insert":
            lines.insert(pos, draw(yaml_junk | text))
        elif edit == "delete" and lines:
            del lines[min(pos, len(lines) - 1)]
        elif edit == "indent" and lines:
            lines[min(pos, len(lines) - 1)] = "  " + lines[min(pos, len(lines) - 1)]
        elif lines:
            line = lines[min(pos, len(lines) - 1)]
            key = line.partition(":")[0]
            lines[min(pos, len(lines) - 1)] = f"{key}: {draw(yaml_junk)}"
        result = "\n".join(lines)
    return result


@st.composite
def config_bytes(draw: st.DrawFn) -> bytes:
    choice = draw(st.sampled_from(["near-valid", "text", "junk", "bytes", "dumped"]))
    if choice == "near-valid":
        return draw(near_valid_configs()).encode("utf-8", "surrogatepass")
    if choice == "text":
        return draw(st.text(max_size=300)).encode("utf-8", "surrogatepass")
    if choice == "junk":
        return "\n".join(draw(st.lists(yaml_junk, min_size=1, max_size=3))).encode()
    if choice == "bytes":
        return draw(mangled(_dump(VALID).encode()))
    return _dump(draw(st.dictionaries(st.sampled_from(sorted(VALID)) | text, values))).encode()


@pytest.fixture
def config_dir(tmp_path):
    """The files a config may name: a token, an empty file, a signing key, garbage."""
    (tmp_path / "token").write_text("secret\n")
    (tmp_path / "empty").write_text("")
    with open(tmp_path / "hs.signing.key", "w") as f:
        write_signing_keys(f, [generate_signing_key("a_key")])
    (tmp_path / "garbage").write_bytes(b"\xff\xfe ed25519 x \x00")
    (tmp_path / "cert.pem").write_text("not really a certificate")
    (tmp_path / "sub").mkdir()
    return tmp_path


def test_the_valid_config_loads(config_dir):
    """The base of the near-valid configs is itself valid (else the fuzzing would only
    ever meet the first error)."""
    (config_dir / "modgud.yaml").write_text(_dump(VALID))
    config = load_config(config_dir / "modgud.yaml")
    assert config.outbound is not None and config.hook_token == "secret"


@fuzz(config_bytes())
def test_load_config_raises_only_config_error(config_dir, raw):
    """Any file content: a Config, or a ConfigError whose message names the file."""
    path = config_dir / "modgud.yaml"
    path.write_bytes(raw)
    try:
        config = load_config(path)
    except ConfigError as e:
        assert str(e).startswith(str(path)) and e.message
        return
    assert isinstance(config, Config)
