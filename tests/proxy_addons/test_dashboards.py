"""grafana/: the dashboards reference only metrics modgud exports, work both imported (the
DS_PROMETHEUS input) and provisioned (a datasource variable of the same name), and filter
every query by $instance. The real-Prometheus evaluation of every panel is in
tests/e2e/test_prometheus.py."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from proxy_addons.metrics import ModuleMetrics

GRAFANA = Path(__file__).resolve().parents[2] / "grafana"
DASHBOARDS = sorted((GRAFANA / "dashboards").glob("*.json"))
# PromQL words that look like metric names but are not
_KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "offset", "bool"}


def _panels(dashboard):
    for panel in dashboard.get("panels", []):
        yield panel
        yield from panel.get("panels", [])


def _exprs(dashboard):
    for panel in _panels(dashboard):
        for target in panel.get("targets", []):
            yield panel, target.get("expr", "")


def _exported(make_runtime) -> set[str]:
    """What modgud exports, and its Synapse module (on Synapse's registry) besides."""
    holder = make_runtime(extra="metrics: {servers: [relay.test]}\n")
    text = generate_latest(holder.runtime.metrics.registry).decode()
    text += generate_latest(ModuleMetrics(CollectorRegistry()).registry).decode()
    names = set()
    for family in text_string_to_metric_families(text):
        names.add(family.name)
        names.update(s.name for s in family.samples)
    # Series that appear only once something happened (a labelled counter starts empty).
    for family in list(names):
        names.update({f"{family}_total", f"{family}_bucket", f"{family}_sum", f"{family}_count"})
    return names | {"up"}


def _metric_names(expr: str) -> set[str]:
    without_labels = re.sub(r"\{[^}]*\}", "", expr)
    without_strings = re.sub(r'"[^"]*"', "", without_labels)
    words = set(re.findall(r"\b([a-z_][a-z0-9_]*)\b(?!\s*\()", without_strings))
    return {
        w for w in words if w.startswith(("modgud_", "process_", "python_")) or w == "up"
    } - _KEYWORDS


def test_four_dashboards_exist():
    assert {p.stem for p in DASHBOARDS} == {
        "modgud-overview",
        "modgud-leaks",
        "modgud-participation",
        "modgud-performance",
    }


@pytest.mark.parametrize("path", DASHBOARDS, ids=lambda p: p.stem)
def test_dashboard_references_only_exported_metrics(make_runtime, path):
    dashboard = json.loads(path.read_text())
    exported = _exported(make_runtime)
    unknown = {}
    for panel, expr in _exprs(dashboard):
        missing = _metric_names(expr) - exported
        if missing:
            unknown[panel.get("title")] = sorted(missing)
    assert not unknown


@pytest.mark.parametrize("path", DASHBOARDS, ids=lambda p: p.stem)
def test_dashboard_is_importable_and_provisionable(path):
    dashboard = json.loads(path.read_text())
    assert [i["name"] for i in dashboard.get("__inputs", [])] == ["DS_PROMETHEUS"]
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["DS_PROMETHEUS"]["type"] == "datasource"
    assert variables["instance"]["type"] == "query"
    ids = [p["id"] for p in _panels(dashboard)]
    assert len(ids) == len(set(ids))
    exprs = list(_exprs(dashboard))
    assert exprs
    for panel, expr in exprs:
        assert panel["datasource"]["uid"] == "${DS_PROMETHEUS}", panel.get("title")
        assert 'instance=~"$instance"' in expr, (panel.get("title"), expr)


def test_provisioning_points_at_the_dashboards():
    sources = yaml.safe_load((GRAFANA / "provisioning/datasources/prometheus.yaml").read_text())
    assert sources["datasources"][0]["type"] == "prometheus"
    providers = yaml.safe_load((GRAFANA / "provisioning/dashboards/modgud.yaml").read_text())
    assert providers["providers"][0]["type"] == "file"
    compose = yaml.safe_load((GRAFANA / "compose.yaml").read_text())
    mounts = " ".join(v for s in compose["services"].values() for v in s.get("volumes", []))
    assert providers["providers"][0]["options"]["path"] in mounts
