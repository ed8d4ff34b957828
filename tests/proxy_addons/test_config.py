"""modgud.yaml loading: good configs load, every bad one names file, key and line."""

import pytest

from proxy_addons.config import ConfigError, Mode, load_config

MINIMAL = """\
server_name: example.org
upstream: http://127.0.0.1:8008
"""


def write(tmp_path, text, name="modgud.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return path


def test_minimal_config_has_safe_defaults(tmp_path):
    """Only server_name and upstream are required; metrics bind to loopback by default."""
    config = load_config(write(tmp_path, MINIMAL))
    assert config.server_name == "example.org"
    assert config.mode is Mode.ENFORCE
    assert config.fail_open
    assert str(config.inbound) == "0.0.0.0:8448"
    assert config.metrics is not None and config.metrics.host == "127.0.0.1"
    assert config.hook is None
    assert config.admin_api == "http://127.0.0.1:8008"
    assert config.database == str(tmp_path / "modgud.db")


def test_full_config_reads_tokens_from_files(tmp_path):
    """Token files are read relative to the config file, and tokens never show in repr."""
    (tmp_path / "hook.token").write_text("hook-secret\n")
    (tmp_path / "admin.token").write_text("admin-secret")
    text = MINIMAL + (
        "mode: audit\non_error: closed\n"
        "listen: {inbound: '127.0.0.1:8481', metrics: '127.0.0.1:9464'}\n"
        "hook: {listen: '127.0.0.1:8099', token_file: hook.token}\n"
        "homeserver: {admin_api: 'http://127.0.0.1:8081', access_token_file: admin.token}\n"
        "database: data/m.db\nverify_signatures: false\n"
        "state: {ttl_seconds: 60, timeout_seconds: 2, hook_timeout_seconds: 0.5}\n"
    )
    config = load_config(write(tmp_path, text))
    assert config.mode is Mode.AUDIT and not config.fail_open
    assert config.hook_token == "hook-secret" and config.admin_token == "admin-secret"
    assert "secret" not in repr(config)
    assert config.state_ttl_seconds == 60 and config.hook_state_timeout_seconds == 0.5
    assert config.admin_api == "http://127.0.0.1:8081"
    assert not config.verify_signatures


@pytest.mark.parametrize(
    ("text", "key", "line", "message"),
    [
        ("upstream: http://x\n", "server_name", 1, "is required"),
        (
            "server_name: 'bad name'\nupstream: http://x\n",
            "server_name",
            1,
            "not a valid server name",
        ),
        (MINIMAL + "mode: sink-ish\n", "mode", 3, "expected enforce, audit or sink"),
        (MINIMAL + "on_error: maybe\n", "on_error", 3, "expected open or closed"),
        (MINIMAL + "listen:\n  inbound: 8448\n", "listen.inbound", 4, "expected str"),
        (MINIMAL + "listen:\n  metrics: 'localhost:0'\n", "listen.metrics", 4, "host:port"),
        (MINIMAL + "listen:\n  outbound: 'nowhere'\n", "listen.outbound", 4, "host:port"),
        (MINIMAL + "hook:\n  token_file: missing.token\n", "hook.token_file", 4, "cannot read"),
        (MINIMAL + "verify_signatures: 'yes'\n", "verify_signatures", 3, "expected bool"),
        (MINIMAL + "state:\n  ttl_seconds: -1\n", "state.ttl_seconds", 4, "must be positive"),
        (MINIMAL + "colour: blue\n", "colour", 3, "unknown key"),
        (MINIMAL + "hook: [1, 2]\n", "hook", 3, "expected a mapping"),
        ("server_name: example.org\nupstream: ftp://x\n", "upstream", 2, "http(s)://"),
        (MINIMAL + "max_body_bytes: 10\n", "max_body_bytes", 3, "at least"),
        (MINIMAL + "index_retention_days: -1\n", "index_retention_days", 3, "from 0 (keep)"),
        (MINIMAL + "index_retention_days: 7.5\n", "index_retention_days", 3, "expected int"),
        (MINIMAL + "index_retention_days: true\n", "index_retention_days", 3, "expected int"),
        (MINIMAL + "trusted_key_servers: [1]\n", "trusted_key_servers", 3, "expected a mapping"),
        (
            MINIMAL + "trusted_key_servers:\n  - server_name: m.org\n    verify_keys: {}\n",
            "trusted_key_servers[0].verify_keys",
            5,
            "at least one key",
        ),
        (
            MINIMAL + "trusted_key_servers:\n  - server_name: m.org\n    verify_keys:\n"
            "      rsa:1: abc\n",
            "trusted_key_servers[0].verify_keys.rsa:1",
            6,
            "ed25519",
        ),
        (
            MINIMAL + "trusted_key_servers:\n  - server_name: m.org\n"
            "    verify_keys: {'ed25519:a': k}\n    colour: red\n",
            "trusted_key_servers[0].colour",
            6,
            "unknown key",
        ),
        (
            MINIMAL + "policy:\n  checks:\n    acls: drop\n",
            "policy.checks.acls",
            5,
            "unknown check",
        ),
        (
            MINIMAL + "policy:\n  checks:\n    acl: maybe\n",
            "policy.checks.acl",
            5,
            "action must be",
        ),
        (
            MINIMAL + "policy:\n  room_checks:\n    '!r:x':\n      acl: {severity: loud}\n",
            "policy.room_checks.!r:x.acl.severity",
            6,
            "expected info",
        ),
        (MINIMAL + "policy:\n  spaces: [lobby]\n", "policy.spaces", 4, "room IDs"),
        # management: (bot.token exists; missing.token does not)
        (
            MINIMAL + "management: {access_token_file: bot.token}\n",
            "management.room",
            3,
            "is required",
        ),
        (
            MINIMAL + "management:\n  room: '#alias:x'\n  access_token_file: bot.token\n",
            "management.room",
            4,
            "expected the management room's ID",
        ),
        (
            MINIMAL + "management:\n  room: '!m:x'\n",
            "management.access_token_file",
            4,
            "is required",
        ),
        (
            MINIMAL + "management:\n  room: '!m:x'\n  access_token_file: missing.token\n",
            "management.access_token_file",
            5,
            "cannot read",
        ),
        (
            MINIMAL
            + "management:\n  room: '!m:x'\n  access_token_file: bot.token\n  moderator_level: high\n",
            "management.moderator_level",
            6,
            "expected int",
        ),
        (
            MINIMAL
            + "management:\n  room: '!m:x'\n  access_token_file: bot.token\n  leak_interval_seconds: 0\n",
            "management.leak_interval_seconds",
            6,
            "must be positive",
        ),
        (
            MINIMAL
            + "management:\n  room: '!m:x'\n  access_token_file: bot.token\n  policy_list: bans\n",
            "management.policy_list",
            6,
            "expected a room ID",
        ),
        (
            MINIMAL
            + "management:\n  room: '!m:x'\n  access_token_file: bot.token\n  colour: red\n",
            "management.colour",
            6,
            "unknown key",
        ),
    ],
)
def test_config_errors_name_file_key_and_line(tmp_path, text, key, line, message):
    """Every config error carries the file, the dotted key and the line of that key."""
    (tmp_path / "bot.token").write_text("bot-secret")
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    error = info.value
    assert error.path == str(path)
    assert error.key == key
    assert error.line == line
    assert message in error.message
    assert str(error).startswith(f"{path}:{line}: {key}: ")


def test_broken_yaml_names_the_line(tmp_path):
    """A YAML syntax error is reported with its line, not as a traceback."""
    path = write(tmp_path, MINIMAL + "listen: {inbound: [\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert info.value.line is not None and info.value.line >= 3
    assert "not valid YAML" in info.value.message


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("!!int x\n", "not valid YAML: 'x' is not a valid tag:yaml.org,2002:int"),
        (MINIMAL + "max_body_bytes: !!int 0x_\n", "not valid YAML"),
        (MINIMAL + "mode: !!bool maybe\n", "not valid YAML"),
        (MINIMAL + "mode: !!timestamp 2001-13-45\n", "not valid YAML"),
        (MINIMAL + "mode: !!timestamp 2001-13-45 x\n", "not valid YAML"),
        (MINIMAL + "max_body_bytes: " + "1" * 5000 + "\n", "not valid YAML"),
        (MINIMAL + "hook: &a {x: *a}\n", "an alias refers to itself"),
        ("&a [*a]\n", "an alias refers to itself"),
        ("[" * 1000, "nested too deeply"),
        (MINIMAL + "? [a]\n: 1\n", "a key must be a plain value"),
        (MINIMAL + "listen: {inbound: '0.0.0.0:\u00b2'}\n", "expected host:port"),
        (MINIMAL + "listen: {inbound: '0.0.0.0:" + "1" * 4400 + "'}\n", "expected host:port"),
        (MINIMAL + "tls: {certificate: " + "a" * 5000 + ", key: k}\n", "no such file"),
        ("server_name: a.test\nupstream: http://[::1\n", "http(s)://"),
        ("server_name: a.test\nupstream: http://a.test:99999\n", "http(s)://"),
        (MINIMAL + 'hook: {token_file: "a\\0b"}\n', "contains a NUL character"),
        (MINIMAL + "state: {ttl_seconds: " + "9" * 400 + "}\n", "not that many"),
        (MINIMAL + "policy: {refresh_seconds: .nan}\n", "must be positive"),
    ],
)
def test_hostile_yaml_is_a_config_error(tmp_path, text, message):
    """What fuzzing load_config found raising ValueError, KeyError, AttributeError,
    OverflowError or RecursionError (tags their values do not fit, self-referring aliases, deep nesting,
    huge numbers, non-ASCII digits, bad URLs, NUL in a path, a file name too long) is a
    ConfigError."""
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, text))
    assert message in info.value.message


def test_a_config_that_is_not_utf8_names_the_line(tmp_path):
    """Invalid UTF-8 is a ConfigError with its line (found by fuzzing: UnicodeDecodeError)."""
    path = tmp_path / "modgud.yaml"
    path.write_bytes(MINIMAL.encode() + b"mode: \xff\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert info.value.line == 3 and "not UTF-8" in info.value.message


def test_missing_file(tmp_path):
    """A missing config file is a ConfigError naming the path."""
    with pytest.raises(ConfigError) as info:
        load_config(tmp_path / "nope.yaml")
    assert "nope.yaml" in str(info.value)


def test_top_level_not_a_mapping(tmp_path):
    """A config that is a list or scalar is refused clearly."""
    with pytest.raises(ConfigError, match="mapping at the top level"):
        load_config(write(tmp_path, "- a\n- b\n"))


def test_trusted_key_servers(tmp_path):
    """Key servers as in Synapse's trusted_key_servers; the URL defaults to the name."""
    config = load_config(
        write(
            tmp_path,
            MINIMAL + "trusted_key_servers:\n  - server_name: matrix.org\n"
            "    verify_keys: {'ed25519:auto': Noi6WqcDj0QmPxCNQqgezwTlBKrfqehY1u2FyWP8GBQ}\n",
        )
    )
    (server,) = config.trusted_key_servers
    assert server.server_name == "matrix.org"
    assert server.url == "https://matrix.org"
    assert server.verify_keys == (("ed25519:auto", "Noi6WqcDj0QmPxCNQqgezwTlBKrfqehY1u2FyWP8GBQ"),)
    assert server.verify_tls is True


def test_check_settings_scoped(tmp_path):
    """Per check an action and severity, server-wide, per space, per room."""
    config = load_config(
        write(
            tmp_path,
            MINIMAL
            + "policy:\n  checks: {acl: flag, participation: {action: drop, severity: high}}\n"
            "  space_checks: {'!s:x': {policy_list: off}}\n"
            "  room_checks: {'!r:x': {acl: drop}}\n",
        )
    )
    actions = config.check_actions
    assert actions.setting("acl", None, ()).action == "flag"
    assert actions.setting("acl", "!r:x", ()).action == "drop"
    assert actions.setting("policy_list", "!other:x", ["!s:x"]).action == "off"
    assert actions.setting("participation", None, ()).severity == "high"
    assert actions.setting("signature", None, ()).action == "drop"  # default


def test_shipped_example_config_is_valid(tmp_path):
    """docs/modgud.example.yaml loads (its token and TLS files stubbed) and check-config
    reports its policy."""
    import shutil
    from pathlib import Path

    from proxy_addons.cli import main

    example = Path(__file__).resolve().parents[2] / "docs" / "modgud.example.yaml"
    path = tmp_path / "modgud.yaml"
    shutil.copy(example, path)
    # check-config opens the database: /var/lib/modgud is not on a test machine.
    path.write_text(path.read_text().replace("/var/lib/modgud/modgud.db", "modgud.db"))
    for name in (
        "fullchain.pem",
        "privkey.pem",
        "hook.token",
        "admin.token",
        "moderator.token",
        "bot.token",
    ):
        (tmp_path / name).write_text("x")
    (tmp_path / "homeserver.signing.key").write_text("ed25519 a_key " + "A" * 43 + "\n")
    config = load_config(path)
    assert config.outbound is not None and config.outbound_signing_key is not None
    assert config.policy_lists == ("!banlist:example.org",)
    assert config.check_actions.setting("edu_impersonation", None, ()).action == "flag"
    assert config.management is not None and config.management.policy_list == "!banlist:example.org"
    assert main(["check-config", str(path)]) == 0


def test_without_secrets_nothing_secret_is_read_and_the_rest_is_checked(tmp_path):
    """The Synapse module loads the same modgud.yaml as Synapse's user: token files, the
    TLS key and the signing key are not read (they may be modgud's alone), everything
    else is validated as usual."""
    from proxy_addons.config import NOT_READ

    text = MINIMAL + (
        "tls: {certificate: nowhere.pem, key: nowhere.key}\n"
        "hook: {listen: '127.0.0.1:8099', token_file: unreadable.token}\n"
        "homeserver: {access_token_file: unreadable.token}\n"
        "listen: {outbound: '127.0.0.1:8449'}\n"
        "outbound: {signing_key_file: unreadable.key}\n"
        "policy: {policy_lists: ['!bans:example.org']}\n"
    )
    path = write(tmp_path, text)
    with pytest.raises(ConfigError):
        load_config(path)
    config = load_config(path, secrets=False)
    assert config.hook_token == NOT_READ and config.admin_token == NOT_READ
    assert config.outbound_signing_key is None
    assert config.policy_lists == ("!bans:example.org",)
    with pytest.raises(ConfigError, match="modgud.yaml:3: mode"):
        load_config(write(tmp_path, MINIMAL + "mode: loud\n"), secrets=False)


def test_a_key_without_a_value_is_its_default(tmp_path):
    """`listen:` with nothing under it (a section emptied by hand) reads as absent."""
    config = load_config(write(tmp_path, MINIMAL + "listen:\nstate:\n"))
    assert str(config.inbound) == "0.0.0.0:8448" and config.state_ttl_seconds == 300


def test_database_is_a_path_or_a_postgresql_url(tmp_path):
    """An SQLite path is the config directory's; a postgresql:// URL is kept as it is; any
    other URL, or one without a database name, is an error naming the key and line."""
    base = "server_name: hs.test\nupstream: http://127.0.0.1:8008\n"
    path = tmp_path / "modgud.yaml"
    path.write_text(base + "database: data/m.db\n")
    assert load_config(path).database == str(tmp_path / "data" / "m.db")
    url = "postgresql://modgud:secret@db.example:5433/modgud?sslmode=require"
    path.write_text(base + f"database: {url}\n")
    config = load_config(path)
    assert config.database == url
    assert config.outbound_ca_dir == str(tmp_path / "ca")
    for bad, why in (
        ("mysql://u@h/db", "not a database modgud speaks"),
        ("postgresql://u@h", "names no database"),
        ("''", "empty"),
    ):
        path.write_text(base + f"database: {bad}\n")
        with pytest.raises(ConfigError) as raised:
            load_config(path)
        message = str(raised.value)
        assert why in message and "database" in message and ":3" in message, message


def test_management_room_settings(tmp_path):
    """management: the room, the bot's token from a file (never in repr), the Client-Server
    API from homeserver.client_api, and `ban`'s policy list defaulting to the first."""
    (tmp_path / "bot.token").write_text("bot-secret\n")
    text = MINIMAL + (
        "homeserver: {client_api: 'http://127.0.0.1:8009'}\n"
        "policy: {policy_lists: ['!bans:example.org', '!more:example.org']}\n"
        "management:\n"
        "  room: '!mgmt:example.org'\n"
        "  access_token_file: bot.token\n"
        "  moderator_level: 75\n"
        "  leak_interval_seconds: 120\n"
    )
    config = load_config(write(tmp_path, text))
    m = config.management
    assert m is not None
    assert (m.room_id, m.token, m.client_api) == (
        "!mgmt:example.org",
        "bot-secret",
        "http://127.0.0.1:8009",
    )
    assert (m.moderator_level, m.leak_interval_seconds, m.policy_list, m.alarms) == (
        75,
        120.0,
        "!bans:example.org",
        True,
    )
    assert "bot-secret" not in repr(config)
    assert load_config(write(tmp_path, MINIMAL)).management is None
