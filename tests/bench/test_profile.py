"""The profile breakdown the pipeline benchmark prints (tests/bench/profile.py)."""

from __future__ import annotations

import pytest

from tests.bench.profile import PARTS, breakdown, format_breakdown

LOOP = "<module> (mitmdump:8);run (asyncio/runners.py:118);BaseEventLoop._run_once (x.py:1)"
HOOKS = LOOP + ";AddonManager.trigger_event (mitmproxy/addonmanager.py:245)"
EDGE = HOOKS + ";Enforcer.request (proxy_addons/enforcer.py:101)"

RAW = "\n".join(
    [
        # modgud's parse under the dispatch: the innermost named part takes it, not dispatch
        f"{EDGE};_check_send (e.py:1);parse_transaction (rules/federation.py:430);x (y:1) 30",
        f"{EDGE};_check_send (e.py:1);check_transaction (rules/checks.py:590) 10",
        f"{EDGE};flow_state (proxy_addons/flowinfo.py:80) 5",
        f"{HOOKS};MapLocal.request (mitmproxy/addons/maplocal.py:1) 7",
        f"{LOOP};HttpLayer._handle_event (mitmproxy/proxy/layers/http/__init__.py:1) 20",
        # the hook's work handed to the main loop is the hook's, not mitmproxy's
        f"{LOOP};evaluate_event (proxy_addons/eventhook.py:150);check_event (r.py:1) 2",
        "Thread._bootstrap (threading.py:1);FindingStore._run (proxy_addons/store.py:1);"
        "FindingStore._write (proxy_addons/store.py:2) 8",
        # waiting: idle, left out
        f"{LOOP};EpollSelector.select (selectors.py:468) 500",
        "Thread._bootstrap (threading.py:1);FindingStore._run (s.py:1);Queue.get (queue.py:1) 900",
        "",
        "a malformed line",
    ]
)


def test_samples_go_to_the_first_part_that_holds_them_and_idle_ones_nowhere() -> None:
    parts = breakdown(RAW, transactions=10, rate=200)  # 5 ms a sample
    assert parts == {
        "modgud edge: parse the /send body": pytest.approx(15.0),
        "modgud edge: checks (ACL, policy, leaks)": pytest.approx(5.0),
        "modgud edge: the rest (flow state, verdicts, metrics)": pytest.approx(2.5),
        "modgud SQLite writer (its thread)": pytest.approx(4.0),
        "modgud event hook": pytest.approx(1.0),
        "mitmproxy: addon hooks and their dispatch": pytest.approx(3.5),
        "mitmproxy: HTTP, connections, event loop": pytest.approx(10.0),
    }
    # every busy sample is counted once
    assert sum(parts.values()) == pytest.approx((30 + 10 + 5 + 7 + 20 + 2 + 8) * 5 / 10)


def test_the_table_has_a_row_per_part_present_and_the_totals() -> None:
    table = format_breakdown(
        {
            "mitmdump": breakdown(f"{LOOP};h (x:1) 4", 2, 100),
            "modgud": breakdown(RAW, 10, 200),
        }
    )
    lines = table.splitlines()
    assert lines[0].split()[-2:] == ["mitmdump", "modgud"]
    assert lines[-1].split()[-2:] == ["20.000", "41.000"]
    named = {part for part, _ in PARTS}
    rows = lines[1:-1]
    assert len(rows) == 7 and all(any(row.startswith(p) for p in named) for row in rows)
