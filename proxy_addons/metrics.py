"""Prometheus metrics. Prefix modgud_, counters end in _total, label sets bounded
(rule, action, direction, endpoint class, outcome) — never server names or room IDs."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info

__all__ = ["Metrics"]


class Metrics:
    """All of modgud's metrics on one registry (injectable, so tests read samples)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self.requests = Counter(
            "modgud_requests",
            "Federation requests seen, by endpoint class and outcome",
            ["direction", "endpoint", "outcome"],
            registry=registry,
        )
        self.pdus = Counter(
            "modgud_pdus",
            "PDUs checked, by action (allowed|dropped|flagged) and deciding rule",
            ["direction", "action", "rule"],
            registry=registry,
        )
        self.edus = Counter(
            "modgud_edus",
            "EDUs checked, by EDU type class, action and deciding rule",
            ["direction", "action", "rule"],
            registry=registry,
        )
        self.findings = Counter(
            "modgud_findings",
            "Findings recorded, by rule and action",
            ["rule", "action", "severity"],
            registry=registry,
        )
        self.hook_calls = Counter(
            "modgud_hook_calls",
            "Event hook (synapse-http-antispam) calls, by answer and how it was decided",
            ["callback", "answer", "decided_by"],
            registry=registry,
        )
        self.hook_seconds = Histogram(
            "modgud_hook_seconds",
            "Event hook answer time",
            buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.05, 0.25, 1.0, 2.5),
            registry=registry,
        )
        self.transaction_seconds = Histogram(
            "modgud_transaction_seconds",
            "Time modgud spends deciding one inbound request (not counting the homeserver)",
            buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5, 2.5),
            registry=registry,
        )
        self.state_fetches = Counter(
            "modgud_state_fetches",
            "Room-state fetches from the homeserver, by outcome",
            ["outcome"],
            registry=registry,
        )
        self.state_fetch_seconds = Histogram(
            "modgud_state_fetch_seconds",
            "Room-state fetch latency",
            registry=registry,
        )
        self.fail_open = Counter(
            "modgud_fail_open",
            "Items let through because a check could not be made (on_error: open)",
            ["where"],
            registry=registry,
        )
        self.internal_errors = Counter(
            "modgud_internal_errors",
            "Internal errors caught by modgud, by place",
            ["where"],
            registry=registry,
        )
        self.knocks = Counter(
            "modgud_knocks",
            "Knocks (m.server.knock) from servers not yet permitted, queued for approval",
            registry=registry,
        )
        self.policy_rules = Gauge(
            "modgud_policy_list_rules",
            "Ban rules (servers and users) from the subscribed policy lists",
            registry=registry,
        )
        self.rooms_cached = Gauge(
            "modgud_rooms_cached", "Rooms in the state cache", registry=registry
        )
        self.verdicts_cached = Gauge(
            "modgud_verdicts_cached", "Event verdicts kept for the event hook", registry=registry
        )
        self.build = Info("modgud_build", "modgud build information", registry=registry)

    def observe_state_fetch(self, outcome: str, seconds: float) -> None:
        self.state_fetches.labels(outcome).inc()
        self.state_fetch_seconds.observe(seconds)
