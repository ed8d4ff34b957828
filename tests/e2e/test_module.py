"""modgud's Synapse module in a real Synapse: the same answers as the HTTP hook over the
whole scenario corpus, faults inside a callback that never reach Synapse (on_error
decides), a locked database that never delays it, and an install that adds nothing to
Synapse's virtualenv beyond the module and the one library it brings."""

from __future__ import annotations

import json
import os
import re
import shutil
import sqlite3
import subprocess
import time
from pathlib import Path

import pytest

from proxy_addons.testbed.homeserver import synapse_python
from proxy_addons.testbed.scenarios import SCENARIOS, run_scenario

from .test_firewall import bodies, deny_hs2, shared_room

pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parents[2]
FAULTY = Path(__file__).with_name("faults") / "faulty_modgud.py"

# `$event in !room [rules]: details`, as both judges log a refusal (describe_refusal).
_MODULE_LINE = re.compile(
    r" - modgud_synapse\.judge - INFO - .* - (?:refused|would refuse \(audit\)) "
    r"(\S+) in (\S+) \[([^\]]*)\]"
)
_HOOK_LINE = re.compile(
    r"hook: (?:refused|would refuse \(audit\)) \((the edge's verdict|the hook)\) "
    r"(\S+) in (\S+) \[([^\]]*)\]"
)
# What only the edge can know: who delivered an event, what it refused before, whether
# the signatures verify (it fetches the keys).
_EDGE_ONLY = ("acl.origin", "policy.origin", "participation.origin", "leak.", "signature.")


def _refusals(pattern: re.Pattern[str], text: str) -> dict[str, tuple[str, set[str]]]:
    found = {}
    for match in pattern.finditer(text):
        *by, event_id, room_id, rules = match.groups()
        found[event_id] = (room_id, set(rules.split(",")), *by)
    return found


def test_module_and_hook_refuse_the_same_events_over_the_corpus(hook_topology):
    """The whole corpus with the HTTP hook enforcing inside hs1 (so the hook stays
    covered by every scenario, the leaks among them) and the module beside it in audit,
    asked about every event first: each scenario's outcome holds, and event by event the
    module would refuse exactly what the hook refused on its own judgement; of what the
    hook refused on the edge's verdict, the module refuses all that the author alone
    decides (it cannot know who delivered an event)."""
    topo = hook_topology
    failures, rooms = [], set()
    for scenario in SCENARIOS:
        outcome = run_scenario(topo, scenario, settle=1.0)
        rooms.add(outcome.room_id)
        failures += [f"{scenario.name}: {f}" for f in outcome.failures]
    assert not failures, "\n".join(failures)
    time.sleep(1)
    module = _refusals(_MODULE_LINE, (topo.hs1.workdir / "homeserver.log").read_text())
    hook = _refusals(_HOOK_LINE, (topo.workdir / "modgud.log").read_text(errors="replace"))
    module = {e: r for e, r in module.items() if r[0] in rooms}
    hook = {e: r for e, r in hook.items() if r[0] in rooms}
    assert hook, "the corpus made the hook refuse nothing"
    own = {e for e, (_, _, by) in hook.items() if by == "the hook"}
    from_edge = {
        e
        for e, (_, rules, by) in hook.items()
        if by == "the edge's verdict" and any(not r.startswith(_EDGE_ONLY) for r in rules)
    }
    assert own | from_edge, hook
    assert own <= set(module), {e: hook[e] for e in own - set(module)}
    assert from_edge <= set(module), {e: hook[e] for e in from_edge - set(module)}
    # and the module refuses nothing the hook let through
    assert set(module) <= set(hook), {e: module[e] for e in set(module) - set(hook)}
    for event_id in own | from_edge:  # for the same reasons
        rules = {r for r in hook[event_id][1] if not r.startswith(_EDGE_ONLY)}
        assert module[event_id][1] == rules, (module[event_id], hook[event_id])


def _metric(text: str, name: str, **labels: str) -> float:
    want = {f'{k}="{v}"' for k, v in labels.items()}
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            inside = line[line.find("{") + 1 : line.find("}")] if "{" in line else ""
            if want <= set(inside.split(",")):
                total += float(line.rsplit(" ", 1)[1])
    return total


@pytest.fixture
def faulty_module(faults_topology):
    """hs1 of the faults topology with the faulty module in place of the HTTP hook (and
    the hook's own entry restored afterwards, hs1 and modgud restarted as they were)."""
    topo = faults_topology
    hs1 = topo.hs1
    saved = list(hs1.modules)
    shutil.copy(FAULTY, hs1.workdir / FAULTY.name)
    entry = {
        "module": "faulty_modgud.FaultyModgud",
        "config": {"config": str(topo.config_path), "raise_on_body": "FAULT"},
    }

    def load(on_error: str) -> None:
        topo.restart_modgud(on_error=on_error)  # rewrites modgud.yaml, which the module reads
        hs1.modules = [entry]
        hs1.restart()

    try:
        yield topo, load
    finally:
        hs1.modules = saved
        topo.restart_modgud(on_error="open")
        hs1.restart()


def _leaky_message(topo, room_id: str, body: str) -> None:
    latest = topo.alice.messages(room_id, limit=1)[0]["event_id"]
    _, pdu = topo.peer.build_event(
        room_id,
        topo.leaky,
        topo.leaky.user("lee"),
        "m.room.message",
        {"msgtype": "m.text", "body": body},
        prev_events=[latest],
    )
    assert topo.peer_send(topo.leaky, [pdu]).status == 200


def test_a_fault_inside_the_module_never_reaches_synapse(faulty_module):
    """A callback that raises: with on_error open the event passes (counted as an
    internal error and a fail-open on hs1's own metrics listener, logged); with
    on_error closed it is refused; either way Synapse goes on taking the events after
    it. (The fault is injected by a subclass of the real module: see faults/.)"""
    topo, load = faulty_module
    load("open")
    room_id = topo.alice.create_room(room_version="10")
    topo.peer_join(topo.leaky, "lee", room_id)
    before = topo.hs1.metrics_text()
    _leaky_message(topo, room_id, "FAULT with on_error open")
    assert topo.alice.wait_for_message(room_id, "FAULT with on_error open", timeout=20)
    after = topo.hs1.metrics_text()
    for name in ("modgud_internal_errors_total", "modgud_fail_open_total"):
        grew = _metric(after, name, where="module") - _metric(before, name, where="module")
        assert grew >= 1, name
    calls = "modgud_module_calls_total"
    assert _metric(after, calls, answer="allow", decided_by="error") >= 1
    assert "a fault injected by the test" in (topo.hs1.workdir / "homeserver.log").read_text()

    load("closed")
    _leaky_message(topo, room_id, "FAULT with on_error closed")
    _leaky_message(topo, room_id, "after the fault")
    assert topo.alice.wait_for_message(room_id, "after the fault", timeout=20)
    assert "FAULT with on_error closed" not in bodies(topo.alice, room_id)
    refused = _metric(topo.hs1.metrics_text(), calls, answer="refuse", decided_by="error")
    assert refused >= 1


def test_a_locked_database_never_delays_synapse(enforce_topology):
    """The database is locked by another process while a relayed leak arrives: the
    module refuses it at once (the transaction is answered while the lock is still
    held), the failed writes are counted on hs1's metrics listener, and the finding is
    written once the lock is gone — none is lost."""
    topo = enforce_topology
    room_id = shared_room(topo, "10", with_carol=True)
    deny_hs2(topo, room_id)
    event_id, pdu = topo.craft_message(room_id, "10", topo.hs2, topo.users["bob"], "locked out")
    typing = {
        "edu_type": "m.typing",
        "content": {"room_id": room_id, "user_id": topo.users["carol"], "typing": True},
    }
    failures_before = _metric(topo.hs1.metrics_text(), "modgud_store_write_failures_total")
    lock = sqlite3.connect(topo.database, timeout=30, isolation_level=None)
    lock.execute("BEGIN EXCLUSIVE")
    try:
        status, _ = topo.send_transaction(topo.hs3, [pdu], [typing])
        assert status == 200
        locked_until = time.monotonic() + 8  # beyond the writers' 5 s busy timeout
        while time.monotonic() < locked_until:
            time.sleep(0.5)
        # Still locked, and hs1 answered and went on: the leak is not shown.
        assert "locked out" not in bodies(topo.alice, room_id)
        failures = _metric(topo.hs1.metrics_text(), "modgud_store_write_failures_total")
        assert failures > failures_before
    finally:
        lock.execute("ROLLBACK")
        lock.close()
    rows = topo.wait_for_findings(lambda r: any(f["event_id"] == event_id for f in r), room=room_id)
    assert [f["rule"] for f in rows if f["event_id"] == event_id] == ["acl.sender"]


def _freeze(python: Path) -> list[str]:
    out = subprocess.run(
        [str(python), "-m", "pip", "freeze", "--all"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return sorted(line for line in out.splitlines() if line and not line.startswith("-e "))


def test_installing_the_module_adds_only_itself_and_msgspec(tmp_path):
    """On a copy of the e2e Synapse virtualenv without the module: the README's pip
    command adds modgud-synapse and msgspec and changes no package Synapse pins; the
    e2e virtualenv is exactly that; only the `modgud_synapse` import name is added, and
    neither mitmproxy nor modgud's own rules/ and proxy_addons/ become importable."""
    synapse_venv = Path(synapse_python()).parent.parent
    venv = tmp_path / "venv"
    shutil.copytree(synapse_venv, venv, symlinks=True)
    python = venv / "bin" / "python"
    ours = ("modgud-synapse", "modgud_synapse", "msgspec")
    subprocess.run(
        [str(python), "-m", "pip", "uninstall", "-q", "-y", "modgud-synapse", "msgspec"],
        check=True,
    )
    before = _freeze(python)
    assert not [p for p in before if p.lower().startswith(ours)]
    check = subprocess.run([str(python), "-m", "pip", "check"], capture_output=True, text=True)
    assert check.returncode == 0, check.stdout  # Synapse needs neither
    # The README's command, run from the checkout (as `python -m pip`: the copy's own
    # bin/pip still names the original virtualenv's interpreter).
    try:
        install = subprocess.run(
            [str(python), "-m", "pip", "install", "-q", "./synapse_module"],
            cwd=REPO,
            capture_output=True,
            text=True,
            env={**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1"},
        )
    finally:  # setuptools builds in the checkout: leave no stale build behind (as make does)
        for leftover in ("build", "modgud_synapse.egg-info"):
            shutil.rmtree(REPO / "synapse_module" / leftover, ignore_errors=True)
    assert install.returncode == 0, install.stderr
    after = _freeze(python)
    added = sorted(set(after) - set(before))
    assert set(before) <= set(after), sorted(set(before) - set(after))  # nothing changed
    assert [re.split("==| @ ", p)[0].lower() for p in added] == ["modgud-synapse", "msgspec"], added
    assert _freeze(Path(synapse_python())) == after  # the e2e Synapse runs this install
    probe = (
        "import importlib.metadata as m, importlib.util as u, json;"
        "files = m.distribution('modgud-synapse').files;"
        "tops = sorted({f.parts[0] for f in files if f.suffix == '.py'});"
        "print(json.dumps({'tops': tops, 'missing': [n for n in "
        "('mitmproxy', 'rules', 'proxy_addons', 'aiohttp') if u.find_spec(n) is None]}))"
    )
    seen = json.loads(
        subprocess.run(
            [str(python), "-c", probe], capture_output=True, text=True, check=True, cwd=tmp_path
        ).stdout
    )
    assert seen["tops"] == ["modgud_synapse"], seen
    assert seen["missing"] == ["mitmproxy", "rules", "proxy_addons", "aiohttp"], seen
    loads = subprocess.run(
        [str(python), "-c", "import modgud_synapse.module as m; print(m.ModgudModule.__name__)"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert loads.stdout.strip() == "ModgudModule", loads.stderr
