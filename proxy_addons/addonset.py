"""modgud's addons, in order: what `modgud run` adds to its lean master and what
`mitmdump -s proxy_addons/entrypoint.py` loads."""

from proxy_addons.configurator import Configurator, RuntimeCloser
from proxy_addons.enforcer import Enforcer
from proxy_addons.eventhook import EventHook
from proxy_addons.exporter import MetricsExporter
from proxy_addons.management import ManagementRoom
from proxy_addons.outbound import OutboundWatcher
from proxy_addons.runtime import RuntimeHolder

__all__ = ["modgud_addons"]


def modgud_addons() -> list[object]:
    """A new set of modgud's addons sharing one runtime."""
    holder = RuntimeHolder()
    return [
        Configurator(holder),
        MetricsExporter(holder),
        Enforcer(holder),
        OutboundWatcher(holder),
        EventHook(holder),
        ManagementRoom(holder),
        RuntimeCloser(holder),  # last: its `done` runs after every other's
    ]
