"""mitmproxy script: `mitmdump -s proxy_addons/entrypoint.py --set modgud_config=modgud.yaml`.

`modgud run --config modgud.yaml` runs the same addons on a lean mitmproxy master
(proxy_addons/master.py) and also sets the listen mode and TLS.
"""

import os
import sys

# Loaded as a script, the repository root may not be on sys.path.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from proxy_addons.addonset import modgud_addons  # noqa: E402

addons = modgud_addons()
