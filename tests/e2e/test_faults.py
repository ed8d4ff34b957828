"""Faults and restarts, end to end: a real Synapse (hs1) behind a real modgud, the
scripted peer sending. The homeserver is stopped and frozen (SIGSTOP), modgud is killed
with SIGKILL and frozen, and each time the test checks what [reliability] asks: nothing
the sender delivered is lost or applied twice, nothing committed is lost, and on_error
decides what passes while a check cannot be made.

These tests break their own topology (`faults_topology`) and leave it running again.
"""

from __future__ import annotations

import os
import secrets
import signal
import sqlite3
import threading
import time

import pytest

from proxy_addons.testbed.homeserver import ClientError

pytestmark = pytest.mark.e2e

DENY = {"allow": ["*"], "deny": ["denied.test"]}


def peer_room(topo):
    """A room of hs1 whose ACL denies denied.test, with the leaky peer's user joined."""
    room_id = topo.alice.create_room(room_version="10")
    topo.alice.send_state(room_id, "m.room.server_acl", "", DENY)
    user, _ = topo.peer_join(topo.leaky, "lee", room_id)
    assert topo.alice.wait_for(lambda: user in topo.alice.joined_members(room_id))
    return room_id, user


def message(topo, room_id, user, body, *, record=True):
    content = {"msgtype": "m.text", "body": body}
    return topo.peer.build_event(
        room_id, topo.leaky, user, "m.room.message", content, record=record
    )


def denied_message(topo, room_id, body):
    """A message written by denied.test, for the leaky server to relay (never a tip)."""
    content = {"msgtype": "m.text", "body": body}
    return topo.peer.build_event(
        room_id, topo.denied, topo.denied.user("d"), "m.room.message", content, record=False
    )


def count_bodies(topo, room_id, prefix):
    counts: dict[str, int] = {}
    for event in topo.alice.messages(room_id, limit=500):
        body = event.get("content", {}).get("body", "")
        if event["type"] == "m.room.message" and body.startswith(prefix):
            counts[body] = counts.get(body, 0) + 1
    return counts


def send_until_accepted(topo, pdus, txn_id, timeout=120.0):
    """Resend one transaction, same txn_id, until it is accepted — as a homeserver's
    federation sender does after a connection error or a 5xx."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            answer = topo.peer_send(topo.leaky, pdus, txn_id=txn_id)
            if answer.status == 200:
                return answer
        except OSError:
            pass  # modgud is down: connection refused or reset
        time.sleep(0.3)
    raise AssertionError(f"transaction {txn_id} never accepted")


def table_count(topo, table):
    conn = sqlite3.connect(f"file:{topo.database}?mode=ro", uri=True)
    try:
        return conn.execute(f"SELECT COUNT(*) FROM {table}").fetchone()[0]  # noqa: S608 - fixed names
    finally:
        conn.close()


def test_kill_9_under_load_loses_nothing_committed_and_each_transaction_lands_once(
    faults_topology,
):
    """modgud is killed with SIGKILL while the peer sends 30 transactions (some relaying
    denied.test's messages). The sender retries what failed with the same txn_id; after
    the restart every message is in hs1's room exactly once, the findings and index rows
    committed before the kill are all still there (WAL), the database is intact, and
    every relayed leak has its finding. While modgud is down, Synapse's hook call fails
    and (fail_open false for check_event_for_spam, as configured here) a local user's
    message is refused rather than let through unchecked."""
    topo = faults_topology
    room_id, user = peer_room(topo)
    run = secrets.token_hex(3)
    txns, leaks = [], []
    for i in range(30):
        pdus = [message(topo, room_id, user, f"k{run}-{i}")[1]]
        if i % 3 == 0:
            leak_id, leak = denied_message(topo, room_id, f"leak{run}-{i}")
            pdus.append(leak)
            leaks.append(leak_id)
        txns.append((f"kill{run}-{i}", pdus))
    accepted: list[str] = []

    def sender():
        for txn_id, pdus in txns:
            send_until_accepted(topo, pdus, txn_id)
            accepted.append(txn_id)

    thread = threading.Thread(target=sender)
    thread.start()
    assert topo.alice.wait_for(lambda: len(accepted) >= 10, timeout=60, interval=0.05)
    findings_before = table_count(topo, "findings")
    index_before = table_count(topo, "events")
    knocks_before = table_count(topo, "knocks")
    topo.kill_modgud()
    with pytest.raises(ClientError):
        topo.alice.send_message(room_id, f"while modgud is down {run}")
    topo.restart_modgud()
    thread.join(180)
    assert len(accepted) == 30
    conn = sqlite3.connect(f"file:{topo.database}?mode=ro", uri=True)
    assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    conn.close()
    assert table_count(topo, "findings") >= findings_before
    assert table_count(topo, "events") >= index_before
    assert table_count(topo, "knocks") >= knocks_before

    def all_there():
        return len(count_bodies(topo, room_id, f"k{run}-")) == 30

    assert topo.alice.wait_for(all_there, timeout=60, interval=1)
    counts = count_bodies(topo, room_id, f"k{run}-")
    assert set(counts.values()) == {1}, counts
    assert count_bodies(topo, room_id, "leak") == {}
    assert count_bodies(topo, room_id, "while modgud is down") == {}
    rows = topo.wait_for_findings(
        lambda r: {f["event_id"] for f in r} >= set(leaks), room=room_id, timeout=30
    )
    assert {f["event_id"] for f in rows} >= set(leaks)


def test_homeserver_down_sender_retries_and_the_event_lands_once(faults_topology):
    """hs1 stopped: modgud answers the transaction with a 5xx (mitmproxy's 502: the
    upstream is unreachable), so the sender keeps it; once hs1 is back the same
    transaction is accepted, and sent a third time it is not applied again (Synapse's
    transaction idempotency, untouched by modgud)."""
    topo = faults_topology
    room_id, user = peer_room(topo)
    run = secrets.token_hex(3)
    _, pdu = message(topo, room_id, user, f"down{run}")
    txn_id = f"down{run}"
    topo.hs1.stop()
    try:
        answer = topo.peer_send(topo.leaky, [pdu], txn_id=txn_id)
        assert 500 <= answer.status < 600, answer.body
    finally:
        topo.hs1.start()
    assert topo.peer_send(topo.leaky, [pdu], txn_id=txn_id).status == 200
    assert topo.peer_send(topo.leaky, [pdu], txn_id=txn_id).status == 200
    assert topo.alice.wait_for_message(room_id, f"down{run}")
    time.sleep(1)
    assert count_bodies(topo, room_id, f"down{run}") == {f"down{run}": 1}


def _frozen(topo, seconds):
    """SIGSTOP hs1 now, SIGCONT it `seconds` later (from a timer thread)."""
    pid = topo.hs1.process.pid
    os.kill(pid, signal.SIGSTOP)
    timer = threading.Timer(seconds, os.kill, (pid, signal.SIGCONT))
    timer.start()
    return timer


def test_frozen_homeserver_state_unavailable_open_passes_closed_asks_to_retry(faults_topology):
    """hs1 frozen (SIGSTOP), so its room-state API does not answer: for a room modgud has
    not cached (modgud restarted meanwhile), on_error open forwards the transaction once the state wait (5 s) is over,
    counting and recording the fail-open; on_error closed answers 503 without touching
    hs1, and the sender's retry after hs1 is back is accepted."""
    topo = faults_topology
    run = secrets.token_hex(3)
    for on_error in ("open", "closed"):
        room_id, user = peer_room(topo)
        _, pdu = message(topo, room_id, user, f"cold{run}{on_error}")
        timer = _frozen(topo, 12)
        try:
            # Restarted while hs1 is frozen: the room's state is not cached, and nothing
            # (such as a hook call from hs1) can fetch it before the transaction arrives.
            topo.restart_modgud(on_error=on_error)
            answer = topo.peer_send(topo.leaky, [pdu], txn_id=f"cold{run}{on_error}")
        finally:
            timer.join()
        if on_error == "open":
            assert answer.status == 200, answer.body  # forwarded; hs1 answered once thawed
            assert 'modgud_fail_open_total{where="state"}' in topo.metrics_text()
            rows = topo.wait_for_findings(
                lambda r: any(f["rule"] == "error.state_unavailable" for f in r), room=room_id
            )
            assert [f["action"] for f in rows] == ["flagged"]
        else:
            assert answer.status == 503, answer.body
            again = topo.peer_send(topo.leaky, [pdu], txn_id=f"cold{run}{on_error}")
            assert again.status == 200
    topo.restart_modgud(on_error="open")


def test_frozen_modgud_delays_local_events_and_loses_none(faults_topology):
    """modgud frozen (SIGSTOP) for 3 s: Synapse's hook call waits, so a local user's
    message waits too — it is sent once modgud runs again, not refused or lost."""
    topo = faults_topology
    room_id = topo.alice.create_room(room_version="10")
    pid = topo.modgud.pid
    os.kill(pid, signal.SIGSTOP)
    timer = threading.Timer(3, os.kill, (pid, signal.SIGCONT))
    timer.start()
    try:
        started = time.monotonic()
        topo.alice.send_message(room_id, "through a frozen hook")
        waited = time.monotonic() - started
    finally:
        timer.join()
    assert waited >= 2.5  # it did wait for the hook
    assert topo.alice.wait_for_message(room_id, "through a frozen hook")
