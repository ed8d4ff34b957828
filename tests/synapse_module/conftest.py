"""The Synapse module's own code, from the checkout: synapse_module/ on the path, so
`modgud_synapse.judge` imports against modgud's source tree (rules, proxy_addons), as
the build's rewriting makes it do against the carried copies in Synapse's virtualenv.
modgud_synapse.module imports Synapse and is tested end to end (tests/e2e)."""

import sys
from pathlib import Path

MODULE_DIR = Path(__file__).resolve().parents[2] / "synapse_module"
if str(MODULE_DIR) not in sys.path:
    sys.path.insert(0, str(MODULE_DIR))
