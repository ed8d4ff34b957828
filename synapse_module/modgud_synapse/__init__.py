"""modgud's Synapse module: `module: modgud_synapse.ModgudModule` in homeserver.yaml.

The class is imported on first use, so the rest of the package (the judge, the carried
rules) imports without Synapse too.
"""

from __future__ import annotations

from typing import Any

__all__ = ["ModgudModule"]


def __getattr__(name: str) -> Any:
    if name == "ModgudModule":
        from modgud_synapse.module import ModgudModule

        return ModgudModule
    raise AttributeError(f"module 'modgud_synapse' has no attribute {name!r}")
