"""`modgud synapse-config` and `check-config --homeserver-config`: the homeserver.yaml
entry for modgud's Synapse module, and what a homeserver.yaml loads of modgud.
(That Synapse itself loads the printed entry is shown by every e2e topology, which takes
its module entry from `modgud synapse-config`.)"""

import pytest
import yaml

from proxy_addons.cli import main
from proxy_addons.config import ConfigError, load_config
from proxy_addons.synapseconfig import MODULE_CLASS, homeserver_modules, module_snippet

MODGUD = """\
server_name: example.org
upstream: http://127.0.0.1:8008
homeserver: {access_token_file: missing.token}
"""
HOOK = "hook: {listen: '127.0.0.1:8099'}\n"
MODULE_ENTRY = "  - module: modgud_synapse.ModgudModule\n    config: {{config: {path}}}\n"
ANTISPAM_ENTRY = (
    "  - module: synapse_http_antispam.HTTPAntispam\n"
    "    config: {{base_url: '{url}', authorization: x}}\n"
)


def _modgud(tmp_path, extra="", name="modgud.yaml"):
    path = tmp_path / name
    path.write_text(MODGUD + extra)
    return path


def _homeserver(tmp_path, *entries, server_name="example.org"):
    path = tmp_path / "homeserver.yaml"
    path.write_text(f"server_name: {server_name}\nmodules:\n" + "".join(entries))
    return path


def test_the_snippet_is_the_modules_entry_for_this_config(tmp_path, capsys):
    """Printed as valid YAML naming the module's class and the config's absolute path
    (the token file it names need not exist: the module reads no secrets)."""
    path = _modgud(tmp_path)
    assert main(["synapse-config", "--config", str(path)]) == 0
    printed = capsys.readouterr().out
    entry = yaml.safe_load(printed)["modules"]
    assert entry == [{"module": MODULE_CLASS, "config": {"config": str(path.resolve())}}]
    assert "pip install" in printed and "synapse_module" in printed
    assert str(tmp_path / "modgud.db") in printed  # what Synapse's user must write


def test_the_snippet_warns_of_the_hook_and_carries_a_mode(tmp_path):
    config = load_config(_modgud(tmp_path, HOOK), secrets=False)
    printed = module_snippet(config, mode="audit")
    assert "synapse_http_antispam.HTTPAntispam" in printed and "127.0.0.1:8099" in printed
    assert yaml.safe_load(printed)["modules"][0]["config"]["mode"] == "audit"


def test_a_path_yaml_would_misread_is_quoted(tmp_path):
    odd = tmp_path / "a: b #c"
    odd.mkdir()
    config = load_config(_modgud(odd), secrets=False)
    entry = yaml.safe_load(module_snippet(config))["modules"][0]
    assert entry["config"]["config"] == str((odd / "modgud.yaml").resolve())


def test_synapse_config_of_a_broken_config_is_a_config_error(tmp_path, capsys):
    path = tmp_path / "modgud.yaml"
    path.write_text("server_name: example.org\n")
    assert main(["synapse-config", "--config", str(path)]) == 2
    assert f"{path}:" in capsys.readouterr().err


def test_module_and_hook_for_the_same_homeserver_is_warned(tmp_path, capsys):
    path = _modgud(tmp_path, HOOK)
    (tmp_path / "missing.token").write_text("secret")  # check-config reads the secrets
    homeserver = _homeserver(
        tmp_path,
        MODULE_ENTRY.format(path=path),
        ANTISPAM_ENTRY.format(url="http://localhost:8099"),
    )
    assert main(["check-config", str(path), "--homeserver-config", str(homeserver)]) == 0
    out = capsys.readouterr().out
    assert f"in Synapse   module ({homeserver}:3)" in out
    assert "judged twice" in out and "line 3" in out and "line 5" in out


def test_a_hook_for_another_service_is_not_modguds(tmp_path):
    """synapse-http-antispam pointing elsewhere (another antispam service) is no warning."""
    path = _modgud(tmp_path, HOOK)
    homeserver = _homeserver(
        tmp_path,
        MODULE_ENTRY.format(path=path),
        ANTISPAM_ENTRY.format(url="http://127.0.0.1:9000"),
    )
    found = homeserver_modules(str(homeserver), load_config(path, secrets=False))
    assert found.warnings(load_config(path, secrets=False)) == []
    assert len(found.other_hooks) == 1 and not found.hooks


@pytest.mark.parametrize(
    ("entries", "server_name", "warning"),
    [
        ((), "example.org", "neither modgud's module nor its hook"),
        ((MODULE_ENTRY.format(path="/etc/other.yaml"),), "example.org", "reads /etc/other.yaml"),
        ((ANTISPAM_ENTRY.format(url="http://127.0.0.1:8099"),), "other.org", "other.org"),
    ],
)
def test_homeserver_warnings(tmp_path, entries, server_name, warning):
    path = _modgud(tmp_path, HOOK)
    config = load_config(path, secrets=False)
    homeserver = _homeserver(tmp_path, *entries, server_name=server_name)
    warnings = homeserver_modules(str(homeserver), config).warnings(config)
    assert len(warnings) == 1 and warning in warnings[0], warnings


def test_the_hook_alone_is_described_and_not_warned(tmp_path):
    path = _modgud(tmp_path, HOOK)
    config = load_config(path, secrets=False)
    homeserver = _homeserver(tmp_path, ANTISPAM_ENTRY.format(url="http://127.0.0.1:8099"))
    found = homeserver_modules(str(homeserver), config)
    assert found.describe() == f"HTTP hook ({homeserver}:3)" and found.warnings(config) == []


@pytest.mark.parametrize(
    ("text", "key", "line"),
    [
        ("modules: {a: 1}\n", "modules", 1),
        ("server_name: x\nmodules:\n  - just a string\n", "modules[0]", 2),
        ("modules:\n  - module: modgud_synapse.ModgudModule\n    config: {}\n", None, 2),
        ("modules: [\n", "", 2),
    ],
)
def test_a_broken_homeserver_yaml_names_file_key_and_line(tmp_path, text, key, line):
    path = _modgud(tmp_path)
    homeserver = tmp_path / "homeserver.yaml"
    homeserver.write_text(text)
    with pytest.raises(ConfigError) as e:
        homeserver_modules(str(homeserver), load_config(path, secrets=False))
    assert e.value.path == str(homeserver) and e.value.line == line
    assert e.value.key == (key if key is not None else "modules[0].config.config")
