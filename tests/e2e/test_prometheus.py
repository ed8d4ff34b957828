"""A real Prometheus (Debian's package) scrapes a live modgud and hs1's own metrics
listener (where modgud's Synapse module serves its figures) while scenario traffic runs
through them (hs1 behind modgud, its own federation through the outbound listener); every
query of every dashboard panel is evaluated through Prometheus's HTTP API and must return
data, except the two panels named below that only faults fill (the test topology lists the
leaky server in metrics.servers, so the per-server panels have data too). The alert rules
pass `promtool check rules` and their unit tests."""

from __future__ import annotations

import json
import re
import subprocess
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

from proxy_addons.testbed.homeserver import free_port
from proxy_addons.testbed.scenarios import SCENARIOS, run_scenario
from proxy_addons.testbed.topology import _wait_port

pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parents[2]
GRAFANA = REPO / "grafana"
RULES = GRAFANA / "alerts" / "modgud.rules.yaml"
RULE_TESTS = GRAFANA / "alerts" / "modgud.rules.test.yaml"

# Panels this run leaves empty on purpose, and why. Everything else must have data.
EXPECTED_EMPTY = {
    "Fail-open items by place": "no fault is injected: nothing is let through unchecked",
    "Internal errors by place": "a healthy run has none",
}

SCENARIO_NAMES = (
    "benign_chat",
    "knock",
    "denied_origin_posts",
    "relayed_leak",
    "built_on_denied",
    "edu_impersonation",
    "server_knock_edu",  # leaves a knock pending
)


def panels(dashboard: dict) -> list[dict]:
    out = []
    for panel in dashboard.get("panels", []):
        out.append(panel)
        out.extend(panel.get("panels", []))  # collapsed rows
    return [p for p in out if p.get("targets")]


def dashboards() -> dict[str, dict]:
    return {
        p.name: json.loads(p.read_text()) for p in sorted((GRAFANA / "dashboards").glob("*.json"))
    }


def substitute(expr: str, instance: str) -> str:
    for macro, value in (
        ("$__rate_interval", "1m"),
        ("$__interval", "15s"),
        ("$__range", "5m"),
        ("${instance}", instance),
        ("$instance", instance),
    ):
        expr = expr.replace(macro, value)
    return expr


class Prometheus:
    def __init__(self, workdir: Path, target: str, synapse: str) -> None:
        """Scrapes modgud (`target`) and Synapse's metrics listener (`synapse`), where
        modgud's Synapse module serves its figures."""
        self.port = free_port()
        workdir.mkdir(parents=True, exist_ok=True)
        config = workdir / "prometheus.yml"
        config.write_text(
            "global: {scrape_interval: 1s, evaluation_interval: 1s}\n"
            f"rule_files: ['{RULES}']\n"
            "scrape_configs:\n"
            f"  - job_name: modgud\n    static_configs: [{{targets: ['{target}']}}]\n"
            f"  - job_name: synapse\n    static_configs: [{{targets: ['{synapse}']}}]\n"
        )
        self.log = open(workdir / "prometheus.log", "wb")  # noqa: SIM115 - closed in stop()
        self.process = subprocess.Popen(
            [
                "prometheus",
                f"--config.file={config}",
                f"--storage.tsdb.path={workdir / 'data'}",
                f"--web.listen-address=127.0.0.1:{self.port}",
            ],
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )
        if not _wait_port(self.port, 30):
            self.stop()
            raise RuntimeError("prometheus did not start")

    def api(self, path: str, **params: str) -> dict:
        url = f"http://127.0.0.1:{self.port}/api/v1/{path}?{urllib.parse.urlencode(params)}"
        with urllib.request.urlopen(url, timeout=10) as r:
            return json.loads(r.read())

    def query(self, expr: str) -> list[dict]:
        answer = self.api("query", query=expr)
        assert answer["status"] == "success", (expr, answer)
        return answer["data"]["result"]

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(15)
        self.log.close()


@pytest.fixture(scope="module")
def scraped(outbound_topology, tmp_path_factory):
    """Prometheus scraping the outbound topology's modgud every second, after scenario
    traffic, an outbound refusal and a pending knock went through it."""
    topo = outbound_topology
    target = f"127.0.0.1:{topo.metrics_port}"
    synapse = f"127.0.0.1:{topo.hs1.metrics_port}"
    prometheus = Prometheus(tmp_path_factory.mktemp("prometheus"), target, synapse)
    try:
        by_name = {s.name: s for s in SCENARIOS}
        for name in SCENARIO_NAMES:
            outcome = run_scenario(topo, by_name[name], settle=0.5)
            assert not outcome.failures, (name, outcome.failures)
        room_id = topo.alice.create_room(room_version="10")
        topo.peer_join(topo.outcast, "scraped", room_id)
        topo.peer_join(topo.spammer, "spam", room_id)
        topo.alice.send_state(
            room_id, "m.server.participation", topo.outcast.name, {"participation": "deny"}
        )
        ban = {"entity": "*.denied.test", "recommendation": "m.ban", "reason": "metrics"}
        topo.alice.send_state(topo.policy_room, "m.policy.rule.server", "ban-metrics", ban)
        time.sleep(1.5)
        topo.alice.send_message(room_id, "kept back")  # leak.outbound
        topo.alice.invite(room_id, topo.users["bob"])  # the module's user_may_invite
        for server, localpart in ((topo.outcast, "scraped"), (topo.spammer, "spam")):
            # participation.origin, then policy.origin (the ban is read within seconds)
            def posted(server=server, localpart=localpart):
                latest = topo.alice.messages(room_id, limit=1)[0]["event_id"]
                content = {"msgtype": "m.text", "body": "refused"}
                _, event = topo.peer.build_event(
                    room_id,
                    server,
                    server.user(localpart),
                    "m.room.message",
                    content,
                    prev_events=[latest],
                )
                topo.peer_send(server, [event])
                return any(f["origin"] == server.name for f in topo.findings(room=room_id))

            assert topo.alice.wait_for(posted, timeout=20, interval=1), server.name
        topo.alice.send_state(topo.policy_room, "m.policy.rule.server", "ban-metrics", {})
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if prometheus.query('modgud_leaks_total{kind="leak.outbound"}'):
                break
            time.sleep(1)
        time.sleep(3)  # a few more scrapes, so rate() over them has two points
        yield prometheus, target, synapse
    finally:
        prometheus.stop()


def test_every_dashboard_panel_returns_data(scraped):
    """With $instance = modgud and hs1's Synapse (both, as an operator picks "All")."""
    prometheus, modgud, synapse = scraped
    assert prometheus.query(f'up{{job="modgud",instance="{modgud}"}} == 1')
    assert prometheus.query(f'up{{job="synapse",instance="{synapse}"}} == 1')
    values = prometheus.api("label/instance/values", **{"match[]": "modgud_build_info"})
    assert {modgud, synapse} <= set(values["data"])  # the $instance variable's query
    instance = f"{modgud}|{synapse}"
    empty, checked = [], 0
    for name, dashboard in dashboards().items():
        for panel in panels(dashboard):
            title = panel.get("title", "")
            for target in panel["targets"]:
                expr = substitute(target["expr"], instance)
                result = prometheus.query(expr)
                checked += 1
                if not result and title not in EXPECTED_EMPTY:
                    empty.append(f"{name}: {title}: {expr}")
    assert checked >= 30, checked
    assert not empty, "panels without data:\n" + "\n".join(empty)


def test_panels_that_should_show_traffic_show_it(scraped):
    """Spot checks that the numbers mean what the panels say."""
    prometheus, instance, synapse = scraped
    sel = f'instance="{instance}"'
    kinds = {
        r["metric"]["kind"]
        for r in prometheus.query(f"sum by (kind) (modgud_leaks_total{{{sel}}})")
    }
    assert {"acl.sender", "leak.outbound", "leak.pulled", "edu.impersonation"} <= kinds, kinds
    (pending,) = prometheus.query(f"modgud_knocks_pending{{{sel}}}")
    assert float(pending["value"][1]) >= 1
    directions = {
        r["metric"]["direction"]
        for r in prometheus.query(f"sum by (direction) (modgud_transaction_seconds_count{{{sel}}})")
    }
    assert directions == {"inbound", "outbound"}
    # The module, on Synapse's listener: its refusals (the relayed leak), its build, and
    # its time per event from its own histogram.
    module = f'instance="{synapse}"'
    refused = prometheus.query(
        f'sum(modgud_module_calls_total{{{module},callback="check_event_for_spam",'
        'answer="refuse",decided_by="module"})'
    )
    assert refused and float(refused[0]["value"][1]) >= 1, refused
    (build,) = prometheus.query(f"modgud_build_info{{{module}}}")
    assert build["metric"]["mitmproxy"] == "none" and build["metric"]["mode"] == "enforce"
    (p99,) = prometheus.query(
        "histogram_quantile(0.99, sum by (le) "
        f'(modgud_module_seconds_bucket{{{module},callback="check_event_for_spam"}}))'
    )
    assert 0 < float(p99["value"][1]) < 1.0, p99


def test_alert_rules_and_the_compose_prometheus_config_are_valid():
    check = subprocess.run(
        ["promtool", "check", "rules", str(RULES)], capture_output=True, text=True
    )
    assert check.returncode == 0, check.stdout + check.stderr
    test = subprocess.run(
        ["promtool", "test", "rules", str(RULE_TESTS)], capture_output=True, text=True
    )
    assert test.returncode == 0, test.stdout + test.stderr
    config = subprocess.run(
        ["promtool", "check", "config", str(GRAFANA / "prometheus.yaml")],
        capture_output=True,
        text=True,
    )
    assert config.returncode == 0, config.stdout + config.stderr  # the compose stack's
    # Every alert has a unit test.
    alerts = set(re.findall(r"^\s*- alert:\s*(\S+)", RULES.read_text(), re.M))
    tested = set(re.findall(r"alertname:\s*(\S+)", RULE_TESTS.read_text()))
    assert alerts and alerts <= tested, alerts - tested
