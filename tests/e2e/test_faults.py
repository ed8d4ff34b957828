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
    """modgud is killed with SIGKILL while the peer sends 30 transactions (every third
    also relays a denied.test message), each resent with the same txn_id until accepted,
    as a federation sender does; then started again. Every transaction is accepted, the
    database is intact, no committed finding, index row or knock is lost, no message is
    there twice, no leak is in the room and each has its finding. Every message is in
    hs1's room except one whose hook call Synapse was making at the moment of the kill:
    with synapse-http-antispam's `fail_open: false` (as configured here) Synapse
    soft-fails and redacts that event for good — its rule for spam, which no sender's
    retry undoes. Only the transaction in flight can be hit, and hs1's log must name each
    such event. While modgud is down, a local user's message is refused rather than let
    through unchecked."""
    topo = faults_topology
    hs1_log = topo.hs1.workdir / "homeserver.log"
    log_start = hs1_log.stat().st_size
    room_id, user = peer_room(topo)
    run = secrets.token_hex(3)
    txns, leaks, bodies = [], [], {}
    for i in range(30):
        event_id, pdu = message(topo, room_id, user, f"k{run}-{i}")
        bodies[event_id] = f"k{run}-{i}"
        pdus = [pdu]
        if i % 3 == 0:
            leak_id, leak = denied_message(topo, room_id, f"leak{run}-{i}")
            pdus.append(leak)
            leaks.append(leak_id)
        txns.append((f"load{run}-{i}", pdus))
    accepted: list[str] = []

    def sender():
        for txn_id, pdus in txns:
            send_until_accepted(topo, pdus, txn_id)
            accepted.append(txn_id)

    thread = threading.Thread(target=sender)
    thread.start()
    assert topo.alice.wait_for(lambda: len(accepted) >= 10, timeout=60, interval=0.05)
    committed = {t: table_count(topo, t) for t in ("findings", "events", "knocks")}
    topo.kill_modgud()
    with pytest.raises(ClientError):
        topo.alice.send_message(room_id, f"while modgud is down {run}")
    topo.restart_modgud()
    thread.join(180)
    assert len(accepted) == 30
    conn = sqlite3.connect(f"file:{topo.database}?mode=ro", uri=True)
    assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    conn.close()
    assert all(table_count(topo, t) >= n for t, n in committed.items())
    # The last transaction's message is there once everything before it was handled.
    assert topo.alice.wait_for_message(room_id, f"k{run}-29", timeout=60)
    counts = count_bodies(topo, room_id, f"k{run}-")
    assert set(counts.values()) == {1}, counts
    assert count_bodies(topo, room_id, "leak") == {}
    rows = topo.wait_for_findings(
        lambda r: {f["event_id"] for f in r} >= set(leaks), room=room_id, timeout=30
    )
    assert {f["event_id"] for f in rows} >= set(leaks)
    assert count_bodies(topo, room_id, "while modgud is down") == {}
    missing = [e for e, body in bodies.items() if body not in counts]
    assert len(missing) <= 1, missing
    with hs1_log.open() as log:
        log.seek(log_start)
        text = log.read()
    assert all(f"soft-failing {e}" in text for e in missing), missing


def test_clean_stop_waits_for_the_homeserver_and_loses_no_message(faults_topology):
    """modgud gets SIGTERM (a restart, an upgrade) while a transaction it forwarded is
    still at hs1 (frozen for 4 s, so this is certain): modgud answers new requests 503
    and stays until hs1 has answered, so hs1's hook calls for that transaction's events
    are answered too. Without the wait, hs1 (fail_open false) would soft-fail the message
    for good."""
    topo = faults_topology
    room_id, user = peer_room(topo)
    run = secrets.token_hex(3)
    # The room's state cached again after the join's refetches (RESTALE_DELAYS end at 5 s):
    # hs1 frozen, a state fetch would wait for it instead of forwarding at once.
    time.sleep(5.5)
    assert topo.peer_send(topo.leaky, [message(topo, room_id, user, f"warm{run}")[1]]).status == 200
    _, pdu = message(topo, room_id, user, f"stop{run}")
    answers = []
    timer = _frozen(topo, 4)
    try:
        sender = threading.Thread(
            target=lambda: answers.append(topo.peer_send(topo.leaky, [pdu], txn_id=f"stop{run}"))
        )
        sender.start()
        time.sleep(1)  # checked and forwarded to the frozen hs1 by now
        topo.modgud.send_signal(signal.SIGTERM)
        time.sleep(0.5)
        assert topo.modgud.poll() is None  # still waiting for hs1
        late = topo.peer_send(topo.leaky, [message(topo, room_id, user, f"late{run}")[1]])
        assert late.status == 503, late.body
    finally:
        timer.join()
    sender.join(30)
    assert [a.status for a in answers] == [200]
    topo.modgud.wait(30)
    assert "1 inbound request(s) in flight were answered" in topo.modgud_log()
    topo.restart_modgud()
    assert topo.alice.wait_for_message(room_id, f"stop{run}")
    assert count_bodies(topo, room_id, f"stop{run}") == {f"stop{run}": 1}


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
        # Long enough for modgud's restart, the key wait (hs1 is the notary: 5 s) and the
        # state wait (5 s) on a loaded machine; 12 s left about one second to spare, and
        # a busy full run once used it up (hs1 thawed, answered the state read, no
        # fail-open to count).
        timer = _frozen(topo, 18)
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
