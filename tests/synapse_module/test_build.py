"""The module's build (synapse_module/setup.py): what goes into Synapse's virtualenv is
the module, rules/ and the listed parts of proxy_addons/, all under modgud_synapse, with
their imports pointed there. The real install into a real Synapse virtualenv, with its
`pip freeze` compared, is tests/e2e/test_module_install.py."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

SETUP = Path(__file__).resolve().parents[2] / "synapse_module" / "setup.py"


@pytest.fixture(scope="module")
def build():
    spec = importlib.util.spec_from_file_location("modgud_synapse_setup", SETUP)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # not __main__: setup() is not run
    return module


def test_imports_are_pointed_into_the_package(build):
    source = (
        "from rules.checks import judge_event\n"
        "import rules.acl\n"
        "    from proxy_addons.store import FindingStore\n"
        "from rulesets import x\n"
        "text = 'from rules.checks import nothing'\n"
    )
    assert build.rewrite(source, "t.py") == (
        "from modgud_synapse.rules.checks import judge_event\n"
        "import modgud_synapse.rules.acl\n"
        "    from modgud_synapse.shared.store import FindingStore\n"
        "from rulesets import x\n"
        "text = 'from rules.checks import nothing'\n"
    )


@pytest.mark.parametrize(
    "source",
    [
        "from proxy_addons.enforcer import Enforcer\n",
        "from mitmproxy import http\n",
        "    import aiohttp\n",
        "import proxy_addons\n",
    ],
)
def test_what_must_not_go_into_synapse_stops_the_build(build, source):
    with pytest.raises(build.BuildError):
        build.rewrite(source, "t.py")


def test_the_built_package_imports_alone_and_brings_nothing_else(build, tmp_path):
    """Built into a directory and imported from there alone (isolated mode: not the
    checkout): the judge and every carried module import, and neither rules, proxy_addons,
    mitmproxy nor aiohttp is loaded — only modgud_synapse and its dependencies."""
    written = build.write_package(tmp_path)
    names = {p.relative_to(tmp_path).parts[0] for p in written}
    assert names == {"modgud_synapse"}
    code = (
        "import sys; sys.path.insert(0, sys.argv[1])\n"
        "import importlib, pkgutil, modgud_synapse, modgud_synapse.judge\n"
        "for pkg in ('modgud_synapse.rules', 'modgud_synapse.shared'):\n"
        "    p = importlib.import_module(pkg)\n"
        "    for m in pkgutil.iter_modules(p.__path__):\n"
        "        importlib.import_module(pkg + '.' + m.name)\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in "
        "('rules', 'proxy_addons', 'mitmproxy', 'aiohttp'))\n"
        "print(bad)\n"
    )
    result = subprocess.run(
        [sys.executable, "-I", "-c", code, str(tmp_path)], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"
