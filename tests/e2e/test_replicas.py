"""Two modgud replicas on one PostgreSQL, behind nginx (round robin, passive health
checks), in front of real Synapse as a homeserver that runs replicas runs it: on
PostgreSQL, with a federation-inbound worker (Redis) that receives the federation
traffic, modgud's module loaded there and in the main process, writing to modgud's
database. Through it: the scenario corpus with the same outcome as through one modgud,
a knock queued through one replica and approved through the other's CLI, one replica
killed under load, and the management room's bot leading from one replica at a time."""

from __future__ import annotations

import json
import threading
import time
import urllib.request
from collections import Counter

import pytest

from proxy_addons.database import reading
from proxy_addons.testbed.member import Member
from proxy_addons.testbed.scenarios import SCENARIOS, run_scenario
from proxy_addons.testbed.topology import Topology
from tests.e2e.test_scenarios import _report

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="session")
def replicas_topology(tmp_path_factory, postgres):
    topo = Topology(
        tmp_path_factory.mktemp("fed-replicas"),
        replicas=2,
        database=postgres.create_database("modgud_replicas"),
        synapse_database=postgres.create_database("synapse_hs1", c_locale=True),
        management=True,
    )
    topo.start()
    yield topo
    topo.stop()


@pytest.mark.parametrize("scenario", SCENARIOS, ids=lambda s: s.name)
def test_scenario_through_two_replicas(replicas_topology, scenario):
    """Every finding, blame and membership as through one modgud."""
    outcome = run_scenario(replicas_topology, scenario)
    assert outcome.ok, _report(outcome)


def test_both_replicas_served_and_say_they_are_ready(replicas_topology):
    """nginx balances; each replica is ready; the worker took the federation traffic with
    the module loaded in it."""
    topo = replicas_topology
    for _ in range(6):  # nginx takes turns
        assert topo.peer_send(topo.leaky, []).status == 200
    assert topo.hs1.worker is not None and topo.hs1.worker.poll() is None
    worker_log = (topo.hs1.workdir / "worker.log").read_text()
    assert "modgud enforce for" in worker_log and "/send/" in worker_log
    for replica in (0, 1):
        served = sum(
            float(line.rsplit(" ", 1)[1])
            for line in topo.metrics_text(replica).splitlines()
            if line.startswith("modgud_requests_total{")
        )
        assert served > 0, f"replica {replica} served nothing: nginx does not balance"
        probe = f"http://127.0.0.1:{topo.replica_metrics_ports[replica]}/ready"
        with urllib.request.urlopen(probe, timeout=10) as r:
            ready = json.loads(r.read())
        assert ready["ok"] and ready["database"] == "ok", ready


def test_a_knock_through_one_replica_approved_through_the_others_cli(replicas_topology):
    """The knock queue is the database's: a server knocks through replica 0, a moderator
    approves it with replica 1's CLI, and the server joins and posts through replica 0."""
    topo = replicas_topology
    room_id = topo.alice.create_room(room_version="10")
    topo.alice.send_state(room_id, "m.server.knock_rule", "", {"rule": "active"})
    time.sleep(1.5)
    knock = {"edu_type": "m.server.knock", "content": {"room_id": room_id}}
    assert topo.peer_send(topo.unknown, edus=[knock], via=0).status == 200
    listed = topo.alice.wait_for(
        lambda: [
            json.loads(line)
            for line in topo.cli(
                "knocks", "--room", room_id, "--json", replica=1
            ).stdout.splitlines()
        ],
        timeout=15,
    )
    assert [(k["server"], k["status"]) for k in listed] == [(topo.unknown.name, "pending")]
    approved = topo.cli("approve", room_id, topo.unknown.name, replica=1)
    assert approved.returncode == 0, approved.stderr

    def joins() -> bool:
        try:
            topo.peer_join(topo.unknown, "admitted", room_id, via=0)
            return True
        except Exception:  # noqa: BLE001 - PeerError until replica 0 has the new state
            return False

    assert topo.alice.wait_for(joins, timeout=20), topo.modgud_log(0)
    user = topo.unknown.user("admitted")
    _, pdu = topo.peer.build_event(
        room_id, topo.unknown, user, "m.room.message", {"msgtype": "m.text", "body": "via 0"}
    )
    assert topo.peer_send(topo.unknown, [pdu], via=0).status == 200
    assert topo.alice.wait_for_message(room_id, "via 0")
    decided = json.loads(topo.cli("knocks", "--room", room_id, "--json").stdout.splitlines()[0])
    assert decided["status"] == "approved"


def test_one_replica_killed_under_load(replicas_topology):
    """kill -9 of a replica while transactions flow through nginx: federation goes on
    through the other, a transaction that failed is sent again (as Synapse retries) and
    lands once, and every relayed event of a denied server has exactly one finding —
    none lost with the replica, none doubled by the retry."""
    topo = replicas_topology
    room_id = topo.alice.create_room(room_version="10")
    topo.alice.send_state(
        room_id, "m.room.server_acl", "", {"allow": ["*"], "deny": ["denied.test"]}
    )
    relay = topo.leaky.user("relay")
    topo.peer_join(topo.leaky, "relay", room_id)
    denied_user = topo.denied.user("outcast")
    sent: list[str] = []
    leaked: list[str] = []
    failures: Counter[str] = Counter()
    stop = threading.Event()

    def send_until_accepted(pdus: list, txn_id: str) -> None:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                if topo.peer_send(topo.leaky, pdus, txn_id=txn_id).status == 200:
                    return
            except Exception:  # noqa: BLE001 - a connection cut by the kill: retried
                pass
            failures[txn_id] += 1
            time.sleep(0.5)
        raise AssertionError(f"transaction {txn_id} never accepted")

    def load() -> None:
        n = 0
        while not stop.is_set() and n < 60:
            body = f"load {n}"
            _, pdu = topo.peer.build_event(
                room_id, topo.leaky, relay, "m.room.message", {"msgtype": "m.text", "body": body}
            )
            pdus = [pdu]
            if n % 5 == 0:  # the relay slips in an event of a denied server
                event_id, leak = topo.peer.build_event(
                    room_id,
                    topo.denied,
                    denied_user,
                    "m.room.message",
                    {"msgtype": "m.text", "body": f"leak {n}"},
                    record=False,  # nothing is built on it: the findings are the leaks'
                )
                pdus.append(leak)
                leaked.append(event_id)
            send_until_accepted(pdus, f"load-{room_id}-{n}")
            sent.append(body)
            n += 1
            time.sleep(0.05)

    worker = threading.Thread(target=load)
    worker.start()
    time.sleep(2.0)
    topo.kill_modgud(1)
    worker.join(120)
    stop.set()
    try:
        assert not worker.is_alive() and len(sent) == 60
        for body in (sent[0], sent[-1]):
            assert topo.alice.wait_for_message(room_id, body, timeout=30)
        bodies = [e["content"].get("body") for e in topo.alice.messages(room_id, limit=200)]
        assert Counter(b for b in bodies if b and b.startswith("load ")) == Counter(sent)
        assert not [b for b in bodies if b and b.startswith("leak ")]
        rows = topo.wait_for_findings(
            lambda r: {f["event_id"] for f in r} >= set(leaked), timeout=30, room=room_id
        )
        per_event = Counter((f["event_id"], f["rule"]) for f in rows)
        assert {e for e, _ in per_event} == set(leaked), rows
        assert max(per_event.values()) == 1, per_event
    finally:
        topo.start_replica(1)


def test_a_policy_list_ban_reaches_every_replica(replicas_topology):
    """A moderator bans a server in the subscribed policy room (a local event: the main
    Synapse process's module records it): each replica refuses that server as origin
    from then on, without a restart, and lets it in again once the rule is removed."""
    topo = replicas_topology
    room_id = topo.alice.create_room(room_version="10")
    topo.peer_join(topo.spammer, "spam", room_id)
    spam = topo.spammer.user("spam")
    rule = {"entity": "*.denied.test", "recommendation": "m.ban", "reason": "spam"}
    topo.alice.send_state(topo.policy_room, "m.policy.rule.server", "ban-replicas", rule)

    def send(body: str, via: int):
        # hs1's main process may not show the worker's newest event at once: wait for it.
        newest = topo.alice.wait_for(lambda: topo.alice.messages(room_id, limit=1), timeout=10)
        assert newest, "hs1 shows no event in the room"
        latest = newest[0]["event_id"]
        content = {"msgtype": "m.text", "body": body}
        _, pdu = topo.peer.build_event(
            room_id, topo.spammer, spam, "m.room.message", content, prev_events=[latest]
        )
        return topo.peer_send(topo.spammer, [pdu], via=via)

    for via in (0, 1):

        def refused(via: int = via) -> bool:
            answer = send(f"spam via {via}", via)
            return any(
                f["rule"] == "policy.origin" and f["txn_id"] == answer.txn_id
                for f in topo.findings(room=room_id)
            )

        assert topo.alice.wait_for(refused, timeout=40, interval=1), topo.modgud_log(via)
    topo.alice.send_state(topo.policy_room, "m.policy.rule.server", "ban-replicas", {})
    for via in (0, 1):

        def lifted(via: int = via) -> bool:
            body = f"forgiven via {via} {time.monotonic()}"
            send(body, via)
            return topo.alice.wait_for_message(room_id, body, timeout=3) is not None

        assert topo.alice.wait_for(lifted, timeout=30, interval=1), topo.modgud_log(via)


def test_one_bot_leads_and_the_other_takes_over_when_it_dies(replicas_topology):
    """Both replicas run the management room's bot; one leads (a lease in PostgreSQL), so
    a knock is posted once, not once per replica. The leader killed (-9, the lease not
    given back), the other takes over once the lease runs out and posts the next knock."""
    topo = replicas_topology
    bot = topo.users["modgud"]
    mod = Member(topo.hs1.base_url, topo.tokens["mod"], topo.users["mod"], topo.management_room)

    def knock_posts(room_id: str) -> list[dict]:
        return [e for e in mod.posts(bot, "Knock: ") if room_id in e["content"]["body"]]

    def knocked_room() -> str:
        room_id = topo.alice.create_room(room_version="10")
        topo.alice.send_state(room_id, "m.server.knock_rule", "", {"rule": "active"})
        time.sleep(1.5)
        knock = {"edu_type": "m.server.knock", "content": {"room_id": room_id}}
        assert topo.peer_send(topo.denied, edus=[knock]).status == 200
        return room_id

    first = knocked_room()
    assert topo.alice.wait_for(lambda: knock_posts(first), timeout=30), topo.modgud_log(0)
    time.sleep(5)  # the other replica's rounds too
    assert len(knock_posts(first)) == 1
    with reading(topo.database) as conn:
        (holder,) = conn.one("SELECT holder FROM management_cursors WHERE name = 'leader'")
    pid = int(holder.split(":")[-2])
    (leader,) = [i for i, p in enumerate(topo.processes) if p is not None and p.pid == pid]
    topo.kill_modgud(leader)
    try:
        second = knocked_room()  # through nginx: to the replica still alive
        assert topo.alice.wait_for(lambda: knock_posts(second), timeout=90), topo.modgud_log(
            1 - leader
        )
        assert len(knock_posts(first)) == 1  # not posted again by the new leader
    finally:
        topo.start_replica(leader)
