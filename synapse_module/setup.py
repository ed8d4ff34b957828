"""Builds modgud-synapse: the module's own package plus modgud's code it needs, carried
under `modgud_synapse.` (rules/ as modgud_synapse.rules, the listed proxy_addons modules
as modgud_synapse.shared). Their imports are rewritten to those names while copying, so
the same source serves modgud (top-level `rules`, `proxy_addons`) and Synapse's
virtualenv (only `modgud_synapse`).

The build stops when a carried module imports something not carried (another part of
proxy_addons, mitmproxy, aiohttp): that would fail at import in Synapse, or drag the proxy
in. tests/synapse_module/test_build.py builds the package this way and checks it.
"""

from __future__ import annotations

import re
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
PACKAGE = "modgud_synapse"
# The mitmproxy-free parts of proxy_addons the module uses (besides all of rules/).
SHARED = (
    "config",
    "database",
    "eventindex",
    "metrics",
    "news",
    "operatorpolicy",
    "recording",
    "sources",
    "store",
)
FORBIDDEN = ("mitmproxy", "aiohttp")

_IMPORT = re.compile(r"^(\s*)(from|import)\s+(rules|proxy_addons)((?:\.\w+)*)(\s|$)", re.M)
_FORBIDDEN = re.compile(r"^\s*(?:from|import)\s+(" + "|".join(FORBIDDEN) + r")(?:\.|\s|$)", re.M)


class BuildError(Exception):
    pass


def rewrite(source: str, where: str) -> str:
    """`source` with its imports of rules and proxy_addons pointed into modgud_synapse."""
    bad = _FORBIDDEN.search(source)
    if bad:
        raise BuildError(f"{where} imports {bad.group(1)}, which must not go into Synapse")

    def point(match: re.Match[str]) -> str:
        indent, verb, top, rest, end = match.groups()
        if top == "rules":
            return f"{indent}{verb} {PACKAGE}.rules{rest}{end}"
        module = rest.lstrip(".").split(".")[0]
        if module not in SHARED:
            raise BuildError(f"{where} imports proxy_addons.{module or '?'}, which is not carried")
        return f"{indent}{verb} {PACKAGE}.shared{rest}{end}"

    return _IMPORT.sub(point, source)


def carried_files() -> dict[str, Path]:
    """Target path inside the wheel -> source file."""
    files = {f"{PACKAGE}/rules/{p.name}": p for p in sorted((REPO / "rules").glob("*.py"))}
    files |= {
        f"{PACKAGE}/shared/{name}.py": REPO / "proxy_addons" / f"{name}.py" for name in SHARED
    }
    files[f"{PACKAGE}/shared/__init__.py"] = REPO / "proxy_addons" / "__init__.py"
    for p in sorted((HERE / PACKAGE).glob("*.py")):
        files[f"{PACKAGE}/{p.name}"] = p
    return files


def write_package(target: Path) -> list[Path]:
    """Write the whole package, rewritten, under `target`; returns the files written."""
    written = []
    for relative, source in carried_files().items():
        out = target / relative
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(rewrite(source.read_text(encoding="utf-8"), relative), encoding="utf-8")
        written.append(out)
    return written


if __name__ == "__main__":  # run by setuptools' build backend; the tests import the rest
    from setuptools import setup
    from setuptools.command.build_py import build_py

    class BuildWithCarried(build_py):
        def run(self) -> None:
            super().run()
            write_package(Path(self.build_lib))

    setup(cmdclass={"build_py": BuildWithCarried})
