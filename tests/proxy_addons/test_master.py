"""modgud's lean mitmproxy master (proxy_addons/master.py): which addons it runs, what it
leaves out, the extra command-line arguments of `modgud run`, and the hook dispatch that
must behave as mitmproxy's own."""

from __future__ import annotations

import pytest
from mitmproxy import addonmanager, connection, exceptions, options
from mitmproxy.proxy import server_hooks
from mitmproxy.proxy.layers.http import HttpRequestHook, HttpResponseHook
from mitmproxy.proxy.mode_specs import ProxyMode
from mitmproxy.test import tflow
from mitmproxy.tools.dump import DumpMaster

from proxy_addons.addonset import modgud_addons
from proxy_addons.master import HandlerCache, LeanMaster, MasterError, parse_extra_args

REVERSE = "mode=reverse:http://127.0.0.1:8008@127.0.0.1:0"


async def test_the_lean_master_runs_the_proxy_core_and_modguds_addons_only():
    """mitmdump's 35 addons are not loaded; modgud's are, after the proxy core."""
    proxy = LeanMaster(modgud_addons(), [REVERSE], quiet=False)
    names = list(proxy.addons.lookup)
    assert names[:7] == [
        "termlog",
        "core",
        "proxyserver",
        "nextlayer",
        "tlsconfig",
        "disableh2c",
        "proxyguard",
    ]
    assert names[-1] == "errorcheck"
    for absent in ("block", "save", "scriptloader", "dumper", "anticache", "mapremote"):
        assert absent not in names
    assert "configurator" in names and "enforcer" in names and "eventhook" in names
    assert "managementroom" in names
    assert len(names) < 16  # the core's 7 and errorcheck, modgud's 7


def _client(address: str, mode: str = REVERSE.removeprefix("mode=")) -> connection.Client:
    client = tflow.tclient_conn()
    client.peername = (address, 45678)
    client.proxy_mode = ProxyMode.parse(mode)
    return client


async def test_a_connection_from_a_public_address_is_accepted_inbound():
    """A federation port is reached by remote homeservers from public addresses; mitmdump's
    Block addon (block_global, on by default) kills those connections."""
    lean = LeanMaster([], [REVERSE], quiet=False)
    for address in ("8.8.8.8", "2001:4860:4860::8888", "::ffff:8.8.4.4"):
        client = _client(address)
        await lean.addons.handle_lifecycle(server_hooks.ClientConnectedHook(client))
        assert client.error is None

    dump = DumpMaster(options.Options(), with_termlog=False, with_dumper=False)
    client = _client("8.8.8.8")
    await dump.addons.handle_lifecycle(server_hooks.ClientConnectedHook(client))
    assert client.error == "Connection killed by block_global."


@pytest.mark.parametrize(
    ("address", "refused"),
    [
        ("8.8.8.8", True),
        ("::ffff:8.8.4.4", True),
        ("2001:4860:4860::8888", True),
        ("127.0.0.1", False),
        ("10.1.2.3", False),
        ("fe80::1%eth0", False),
    ],
)
async def test_the_outbound_listener_refuses_public_addresses(address, refused):
    """The outbound listener (regular mode) is the homeserver's proxy, never the world's."""
    lean = LeanMaster([], [REVERSE, "mode=regular@127.0.0.1:8449"], quiet=False)
    client = _client(address, "regular@127.0.0.1:8449")
    await lean.addons.handle_lifecycle(server_hooks.ClientConnectedHook(client))
    assert (client.error is not None) is refused


async def test_options_of_optional_addons_load_them(tmp_path):
    """`-- --set save_stream_file=F` (the testbed's capture, `modgud audit`'s input) loads
    Save; -q leaves only errors in the log."""
    capture = tmp_path / "capture.flows"
    proxy = LeanMaster([], [REVERSE, f"save_stream_file={capture}"], quiet=True)
    assert "save" in proxy.addons.lookup
    assert proxy.options.save_stream_file == str(capture)
    assert proxy.options.termlog_verbosity == "error"


async def test_an_option_of_an_addon_left_out_is_explained():
    """An option of mitmdump's other addons says where it is to be had; a bad value of a
    known option is mitmproxy's own error."""
    with pytest.raises(MasterError, match=r"anticache.*mitmdump -s proxy_addons/entrypoint.py"):
        LeanMaster([], [REVERSE, "anticache=true"], quiet=False)
    with pytest.raises(MasterError, match="ssl_insecure"):
        LeanMaster([], [REVERSE, "ssl_insecure=maybe"], quiet=False)


@pytest.mark.parametrize(
    ("args", "settings", "quiet"),
    [
        ([], [], False),
        (["-q"], [], True),
        (["--set", "a=1", "--set", "b=2"], ["a=1", "b=2"], False),
        (["-s", "x.py", "-w", "out.flows"], ["scripts=x.py", "save_stream_file=out.flows"], False),
        (["--quiet", "--save-stream-file", "f"], ["save_stream_file=f"], True),
    ],
)
def test_extra_arguments(args, settings, quiet):
    """What `modgud run ... --` takes, as mitmproxy option settings."""
    assert parse_extra_args(args) == (settings, quiet)


@pytest.mark.parametrize("args", [["--mode", "regular"], ["-v"], ["--set"], ["stray"]])
def test_extra_arguments_not_understood_are_refused(args):
    """Anything else is refused with what is taken, not passed on or ignored."""
    with pytest.raises(MasterError, match="extra mitmproxy arguments"):
        parse_extra_args(args)


class Recorder:
    """An addon that notes each hook it is given; `fail` raises, `halt` halts."""

    def __init__(self, name, calls, fail=False, halt=False):
        self.name, self.calls, self.fail, self.halt = name, calls, fail, halt

    def request(self, flow):
        self.calls.append((self.name, "request"))
        if self.fail:
            raise ValueError("boom")
        if self.halt:
            raise exceptions.AddonHalt

    async def response(self, flow):
        self.calls.append((self.name, "response"))


class Parent:
    """An addon with a sub-addon, as mitmproxy allows (`addons` attribute)."""

    def __init__(self, calls):
        self.addons = [Recorder("child", calls)]

    def request(self, flow):
        pass


def _managers(calls_a, calls_b, *, fail=False, halt=False):
    class FakeMaster:
        commands = None

    a = addonmanager.AddonManager.__new__(addonmanager.AddonManager)
    b = HandlerCache.__new__(HandlerCache)
    for manager, calls in ((a, calls_a), (b, calls_b)):
        manager.lookup, manager.chain, manager.master = {}, [], FakeMaster()
        if isinstance(manager, HandlerCache):
            manager._handlers = {}
        manager.chain = [
            Recorder("first", calls, fail=fail, halt=halt),
            Parent(calls),
            Recorder("last", calls),
        ]
    return a, b


@pytest.mark.parametrize(("fail", "halt"), [(False, False), (True, False), (False, True)])
async def test_the_handler_cache_dispatches_as_mitmproxy_does(fail, halt, caplog):
    """Same handlers in the same order, sub-addons included, async ones awaited; an
    exception is logged and the next handler runs; AddonHalt ends the hook."""
    mine, theirs = [], []
    reference, cached = _managers(theirs, mine, fail=fail, halt=halt)
    flow = tflow.tflow()
    for manager in (reference, cached):
        await manager.trigger_event(HttpRequestHook(flow))
        await manager.trigger_event(HttpResponseHook(flow))
    assert mine == theirs
    assert ("last", "request") in mine or halt
    assert ("first", "response") in mine
    if fail:
        assert "Addon error: boom" in caplog.text


async def test_an_addon_added_later_gets_the_hooks_already_dispatched():
    calls: list[tuple[str, str]] = []
    proxy = LeanMaster([Recorder("one", calls)], [REVERSE], quiet=False)
    flow = tflow.tflow()
    await proxy.addons.trigger_event(HttpRequestHook(flow))
    proxy.addons.add(Recorder("two", calls))
    await proxy.addons.trigger_event(HttpRequestHook(flow))
    assert calls == [("one", "request"), ("one", "request"), ("two", "request")]
