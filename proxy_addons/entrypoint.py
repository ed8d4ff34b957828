"""mitmproxy script: `mitmdump -s proxy_addons/entrypoint.py --set modgud_config=modgud.yaml`.

`modgud run --config modgud.yaml` does the same and also sets the listen mode and TLS.
"""

import os
import sys

# Loaded as a script, the repository root may not be on sys.path.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from proxy_addons.configurator import Configurator, RuntimeCloser  # noqa: E402
from proxy_addons.enforcer import Enforcer  # noqa: E402
from proxy_addons.eventhook import EventHook  # noqa: E402
from proxy_addons.exporter import MetricsExporter  # noqa: E402
from proxy_addons.outbound import OutboundWatcher  # noqa: E402
from proxy_addons.runtime import RuntimeHolder  # noqa: E402

_holder = RuntimeHolder()

addons = [
    Configurator(_holder),
    MetricsExporter(_holder),
    Enforcer(_holder),
    OutboundWatcher(_holder),
    EventHook(_holder),
    RuntimeCloser(_holder),  # last: its `done` runs after every other's
]
