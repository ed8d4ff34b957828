"""`modgud audit CAPTURE`: a capture written by mitmproxy's own FlowWriter is replayed
through the edge in audit mode into a database of its own; leaks give exit status 1.
Room state comes from a static table here (a test double; the e2e tests use Synapse)."""

from __future__ import annotations

from mitmproxy import http
from mitmproxy.io import FlowWriter

import proxy_addons.replay as replay_module
from proxy_addons.cli import main
from proxy_addons.store import query_findings
from tests.proxy_addons.conftest import ROOM, StaticStateSource, pdu, policy, send_flow


def capture(tmp_path, flows):
    path = tmp_path / "capture.flows"
    with open(path, "wb") as f:
        writer = FlowWriter(f)
        for flow in flows:
            flow.response = http.Response.make(200, b'{"pdus": {}}')
            writer.add(flow)
    return str(path)


def test_replay_finds_the_relayed_leak_and_exits_1(make_runtime, tmp_path, monkeypatch, capsys):
    config_path = (
        make_runtime().runtime.config.path
    )  # a config file; the replay has its own runtime
    real_build = replay_module.build_runtime
    monkeypatch.setattr(
        replay_module,
        "build_runtime",
        lambda config: real_build(config, source=StaticStateSource({ROOM: policy()})),
    )
    benign = capture(tmp_path, [send_flow("good.test", [pdu("@a:good.test")])])
    assert main(["audit", benign, "--config", config_path]) == 0
    leaky = capture(
        tmp_path,
        [
            send_flow("good.test", [pdu("@a:good.test")]),
            send_flow("relay.test", [pdu("@evil:denied.test", body="leak")], txn_id="t2"),
        ],
    )
    out = str(tmp_path / "replay.db")
    assert main(["audit", leaky, "--config", config_path, "--db", out]) == 1
    assert "leak in !room:hs.test: blamed relay.test" in capsys.readouterr().out
    rows = list(query_findings([out]))
    assert [(r["rule"], r["action"], r["attributed_to"]) for r in rows] == [
        ("acl.sender", "flagged", "relay.test")
    ]
    assert main(["audit", str(tmp_path / "missing"), "--config", config_path]) == 2
