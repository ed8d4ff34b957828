"""modgud's own mitmproxy master: the proxy with only the addons modgud needs.

`mitmdump` loads mitmproxy's whole default addon set (31 addons, plus its dumper,
keepserving, readfile and errorcheck) and dispatches every hook of every request through
all of them: profiled on a 1-PDU /send, dispatching hooks was 39 % of plain mitmdump's
CPU time (docs/BENCHMARKS.md). `modgud run` runs the same proxy core (Core, Proxyserver,
NextLayer, TlsConfig) with modgud's addons and nothing else. Two more are loaded only when
their options are asked for on the command line: Save (`save_stream_file`, `-w`) and
ScriptLoader (`scripts`, `-s`).

Leaving the defaults out also leaves out their behaviour, which is the point: mitmdump's
Block addon kills every connection from a public IP address (`block_global`, on by
default), which on a federation port is every remote homeserver. What it was good for,
keeping the outbound listener (an HTTP proxy) from serving the internet, ProxyGuard does
for that listener alone.

`mitmdump -s proxy_addons/entrypoint.py` still works, with mitmdump's whole set.
"""

from __future__ import annotations

import argparse
import asyncio
import inspect
import ipaddress
import logging
import signal
from collections.abc import Callable, Sequence

from mitmproxy import addonmanager, connection, exceptions, hooks, master, options
from mitmproxy.addons import (
    core,
    disable_h2c,
    errorcheck,
    next_layer,
    proxyserver,
    save,
    script,
    termlog,
    tlsconfig,
)
from mitmproxy.proxy.mode_specs import RegularMode

__all__ = [
    "HandlerCache",
    "LeanMaster",
    "MasterError",
    "ProxyGuard",
    "lean_addons",
    "parse_extra_args",
    "run_master",
]

logger = logging.getLogger(__name__)

# Addons loaded only when one of their options is set, by the option's name.
OPTIONAL_ADDONS: dict[str, Callable[[], object]] = {
    "save_stream_file": save.Save,
    "save_stream_filter": save.Save,
    "scripts": script.ScriptLoader,
}


class MasterError(Exception):
    """A command-line option the lean proxy cannot take, said so the operator can act."""


class ProxyGuard:
    """The outbound listener is an HTTP proxy for the homeserver: a client from a public
    address is refused there, as mitmdump's `block_global` did (bound off loopback by
    mistake, it would be an open proxy). The inbound listener is what remote homeservers
    reach from public addresses: never refused for it."""

    def client_connected(self, client: connection.Client) -> None:
        if not isinstance(client.proxy_mode, RegularMode):
            return
        host = client.peername[0].rsplit("%", 1)[0] if client.peername else ""
        try:
            address = ipaddress.ip_address(host)
        except ValueError:
            return
        if isinstance(address, ipaddress.IPv6Address):
            address = address.ipv4_mapped or address
        if address.is_global:
            logger.warning("outbound listener: connection from public address %s refused", host)
            client.error = "Connection from a public address refused by the outbound listener."


def lean_addons() -> list[object]:
    """The proxy itself: options and commands, listeners, protocol detection, TLS; and
    DisableH2C, which keeps a cleartext HTTP/2 upgrade from confusing the HTTP/1 layer;
    and ProxyGuard."""
    return [
        core.Core(),
        proxyserver.Proxyserver(),
        next_layer.NextLayer(),
        tlsconfig.TlsConfig(),
        disable_h2c.DisableH2C(),
        ProxyGuard(),
    ]


class HandlerCache(addonmanager.AddonManager):
    """mitmproxy's addon manager, dispatching each hook to the addons that handle it.

    mitmproxy's own walks every addon for every hook of every flow, looking each hook's
    method up by name, and follows each flow hook with an `update` hook that no addon here
    handles. Here the handlers of a hook are looked up once (again after an addon is added
    or removed). Each handler runs as mitmproxy runs it: an exception is logged and the
    next handler runs, AddonHalt ends the hook. Addons whose sub-addons change while
    running (scripts) get mitmproxy's own dispatch.
    """

    def __init__(self, proxy: master.Master) -> None:
        super().__init__(proxy)
        self._handlers: dict[str, list[Callable[..., object]]] = {}

    def register(self, addon: object) -> object:
        self._handlers.clear()
        return super().register(addon)

    def remove(self, addon: object) -> None:
        self._handlers.clear()
        super().remove(addon)

    async def trigger_event(self, event: hooks.Hook) -> None:
        if "scriptloader" in self.lookup:
            await super().trigger_event(event)
            return
        handlers = self._handlers.get(event.name)
        if handlers is None:
            handlers = [func for addon in self.chain for _a, func in self._iter_hooks(addon, event)]
            self._handlers[event.name] = handlers
        if not handlers:
            return
        args = event.args()
        for func in handlers:
            try:
                with addonmanager.safecall():
                    result = func(*args)
                    if result is not None and inspect.isawaitable(result):
                        await result
            except exceptions.AddonHalt:
                return


class LeanMaster(master.Master):
    """A mitmproxy master with the lean addons, modgud's and those `settings` ask for,
    dispatching hooks through a HandlerCache. ErrorCheck makes a listener that cannot start
    (port taken) end the process."""

    def __init__(self, addons: Sequence[object], settings: Sequence[str], quiet: bool) -> None:
        super().__init__(options.Options(), with_termlog=False)
        self.addons = HandlerCache(self)
        self._termlog_addon = termlog.TermLog()
        self.addons.add(self._termlog_addon)
        optional: list[Callable[[], object]] = []
        for spec in settings:
            make = OPTIONAL_ADDONS.get(spec.split("=", 1)[0])
            if make is not None and make not in optional:
                optional.append(make)
        self.addons.add(*lean_addons(), *(make() for make in optional))
        self.addons.add(*addons)
        self.addons.add(errorcheck.ErrorCheck())
        try:
            self.options.set(*settings)
            if quiet:
                self.options.update(termlog_verbosity="error")
        except exceptions.OptionsError as e:
            raise MasterError(_explain(str(e))) from None


def _explain(error: str) -> str:
    if error.startswith(("No such option", "Unknown option")):
        return (
            f"{error}. modgud runs mitmproxy with only the addons it needs; for an option "
            "of mitmdump's other addons, run `mitmdump -s proxy_addons/entrypoint.py "
            "--set modgud_config=modgud.yaml` instead"
        )
    return error


def parse_extra_args(args: Sequence[str]) -> tuple[list[str], bool]:
    """`modgud run ... -- EXTRA`: mitmdump's `--set KEY=VALUE`, `-s SCRIPT`, `-w FILE` and
    `-q`; their option settings and whether to log only errors."""
    parser = argparse.ArgumentParser(prog="modgud run ... --", add_help=False, exit_on_error=False)
    parser.add_argument("--set", dest="settings", action="append", default=[])
    parser.add_argument("-s", "--scripts", dest="scripts", action="append", default=[])
    parser.add_argument("-w", "--save-stream-file", dest="save_stream_file")
    parser.add_argument("-q", "--quiet", action="store_true")
    try:
        parsed, unknown = parser.parse_known_args(list(args))
    except argparse.ArgumentError as e:
        raise MasterError(f"extra mitmproxy arguments: {e}") from None
    if unknown:
        raise MasterError(
            f"extra mitmproxy arguments: {' '.join(unknown)} not understood "
            "(modgud run takes --set KEY=VALUE, -s SCRIPT, -w FILE and -q after --)"
        )
    settings = list(parsed.settings)
    settings += [f"scripts={path}" for path in parsed.scripts]
    if parsed.save_stream_file:
        settings.append(f"save_stream_file={parsed.save_stream_file}")
    return settings, parsed.quiet


def run_master(
    addons: Callable[[], Sequence[object]], settings: Sequence[str], quiet: bool
) -> None:
    """Run the proxy until SIGINT or SIGTERM, as mitmdump does. `addons` is called inside
    the event loop (mitmproxy's master and some addons want a running loop)."""

    async def main() -> None:
        logging.getLogger().setLevel(logging.DEBUG)
        for noisy in ("asyncio", "hpack"):
            logging.getLogger(noisy).setLevel(logging.WARNING)
        proxy = LeanMaster(addons(), settings, quiet)
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGINT, proxy.shutdown)
        loop.add_signal_handler(signal.SIGTERM, proxy.shutdown)
        # A peer closing its socket mid-write must not end the process.
        signal.signal(signal.SIGPIPE, signal.SIG_IGN)
        await proxy.run()

    asyncio.run(main())
