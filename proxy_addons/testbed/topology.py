"""A small federation on loopback: hs1 behind modgud, hs2 and hs3 direct.

    hs2 (127.0.0.1:P2) ─┐
                         ├─ TLS ─> modgud (localhost:P1) ─ plain HTTP ─> hs1 [modgud module]
    hs3 (localhost:P3) ─┘                 ▲ or: event hook (synapse-http-antispam)

With `replicas=N`, nginx takes P1 (TLS, round robin with passive health checks, as the
README's replica guide sets it up) in front of N `modgud run` replicas on plain HTTP,
sharing `database` (a PostgreSQL URL).

Inside hs1, events are judged by modgud's Synapse module (the default, `inside="module"`),
by the HTTP hook (`"hook"`), or by the hook with the module beside it in audit mode
(`"both"`: the hook decides, the module's would-be answers can be compared with it).

hs2's name is an IP literal and hs1/hs3's are `localhost`, so an ACL that denies
`127.0.0.1` tells them apart (ACLs ignore ports). Used by the end-to-end tests and the demo;
`modgud run` never loads this.
"""

from __future__ import annotations

import json
import secrets
import socket
import sqlite3
import ssl
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from proxy_addons.store import query_findings
from proxy_addons.testbed.homeserver import (
    ClientApi,
    Redis,
    SynapseHomeserver,
    free_port,
    read_signing_key,
)
from proxy_addons.testbed.nginx import Nginx
from proxy_addons.testbed.peer import FederationPeer, FederationResponse, PeerServer
from rules.eventhash import compute_event_id
from rules.roomversion import get_room_version
from rules.signatures import sign_event
from rules.xmatrix import sign_request

__all__ = ["Topology"]

REPO = Path(__file__).resolve().parents[2]


def _wait_port(port: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return True
        time.sleep(0.1)
    return False


class Topology:
    def __init__(
        self,
        workdir: Path,
        *,
        mode: str = "enforce",
        on_error: str = "open",
        outbound: bool = False,
        inside: str = "module",
        replicas: int = 1,
        database: str | None = None,
        synapse_database: str | None = None,
        management: bool = False,
        leak_interval_seconds: float = 600.0,
    ) -> None:
        """`outbound`: hs1 sends its federation through modgud's outbound listener (its
        https_proxy), trusting modgud's CA (federation_custom_ca_list) and verifying.
        `inside`: what judges events inside hs1 — module, hook, or both (see above).
        `replicas`: that many modgud processes behind nginx, on `database` (a
        PostgreSQL URL; default: an SQLite file, for one replica).
        `synapse_database`: hs1 on PostgreSQL (a database with the C locale) with a
        federation-inbound worker (and Redis) — modgud's upstream, the module loaded
        there as in the main process — as a homeserver that runs replicas runs.
        `management`: a management room on hs1 (alice creator, `mod` 50, `visitor` 0, the
        bot account `modgud` invited), its bot run by modgud."""
        if inside not in ("module", "hook", "both"):
            raise ValueError(f"inside: module, hook or both, not {inside!r}")
        if replicas > 1 and (database is None or "://" not in database):
            raise ValueError("replicas share a PostgreSQL database: give its URL")
        if replicas > 1 and (outbound or inside != "module"):
            raise ValueError("replicas: with the module inside hs1 and no outbound listener")
        self.workdir = Path(workdir)
        self.mode = mode
        self.on_error = on_error
        self.outbound = outbound
        self.inside = inside
        self.modgud_port = free_port()
        self.hook_port = free_port()
        self.outbound_port = free_port()
        # Each replica's inbound and metrics listeners (one replica: on the public port).
        self.replica_ports = (
            [free_port() for _ in range(replicas)] if replicas > 1 else [self.modgud_port]
        )
        self.replica_metrics_ports = [free_port() for _ in range(replicas)]
        self.metrics_port = self.replica_metrics_ports[0]
        self.nginx: Nginx | None = None
        if replicas > 1:
            self.nginx = Nginx(
                self.workdir / "nginx",
                self.modgud_port,
                [f"http://127.0.0.1:{port}" for port in self.replica_ports],
            )
        self.hook_token = secrets.token_hex(16)
        hs2_tls, hs3_tls = free_port(), free_port()
        # The scripted peer: a reachable "leaky" server and servers whose names do not
        # resolve; every homeserver fetches their keys through the peer's notary.
        self.peer = FederationPeer(self.workdir / "peer", free_port())
        self.leaky = self.peer.add_server()
        self.denied = self.peer.add_server("denied.test")
        self.unknown = self.peer.add_server("unknown.test")
        self.spammer = self.peer.add_server("spam.denied.test")  # for *.denied.test bans
        self.outcast = self.peer.add_server()  # reachable; for the outbound tests alone
        keys = {"trusted_key_servers": [self.peer.trusted_key_server]}
        antispam = {
            "module": "synapse_http_antispam.HTTPAntispam",
            "config": {
                "base_url": f"http://127.0.0.1:{self.hook_port}",
                "authorization": self.hook_token,
                "enabled_callbacks": [
                    "check_event_for_spam",
                    "user_may_invite",
                    "federated_user_may_invite",
                ],
                # Fail closed in tests: a broken hook must show, not silently allow.
                "fail_open": {"check_event_for_spam": False},
            },
        }
        self.config_path = self.workdir / "modgud.yaml"
        # The module's entry is set in start(), from `modgud synapse-config`.
        modules = {"module": [], "hook": [antispam], "both": [antispam]}[inside]
        hs1_config: dict[str, Any] = dict(keys)
        if outbound:
            from proxy_addons.outbound import ensure_ca

            hs1_config |= {
                "https_proxy": f"http://127.0.0.1:{self.outbound_port}",
                # Every federation request of hs1 meets modgud's certificates, so hs1
                # verifies them, against modgud's CA alone.
                "federation_verify_certificates": True,
                "federation_custom_ca_list": [str(ensure_ca(self.workdir / "ca"))],
            }
        self.redis = Redis(self.workdir / "redis", free_port()) if synapse_database else None
        self.hs1 = SynapseHomeserver(
            self.workdir / "hs1",
            f"localhost:{self.modgud_port}",
            http_port=free_port(),
            modules=modules,
            extra_config=hs1_config,
            metrics_port=free_port(),
            database_url=synapse_database,
            federation_worker=self.redis,
        )
        self.hs2 = SynapseHomeserver(
            self.workdir / "hs2",
            f"127.0.0.1:{hs2_tls}",
            http_port=free_port(),
            tls_port=hs2_tls,
            extra_config=keys,
        )
        self.hs3 = SynapseHomeserver(
            self.workdir / "hs3",
            f"localhost:{hs3_tls}",
            http_port=free_port(),
            tls_port=hs3_tls,
            extra_config=keys,
        )
        self.processes: list[subprocess.Popen[bytes] | None] = [None] * replicas
        self.database: str = database or str(self.workdir / "modgud.db")
        self.capture = self.workdir / "capture.flows"
        self.alice: ClientApi
        self.bob: ClientApi
        self.carol: ClientApi
        self.users: dict[str, str] = {}
        self.policy_room = ""
        self.space = ""
        self.management = management
        self.leak_interval_seconds = leak_interval_seconds
        self.management_room = ""
        self.tokens: dict[str, str] = {}  # hs1 accounts of the management room, by name

    # -- lifecycle -------------------------------------------------------------------

    @property
    def modgud(self) -> subprocess.Popen[bytes] | None:
        """The (first) modgud process."""
        return self.processes[0]

    def config_of(self, replica: int) -> Path:
        return self.config_path if replica == 0 else self.workdir / f"modgud-{replica}.yaml"

    @property
    def module_loaded(self) -> bool:
        return self.inside in ("module", "both")

    @property
    def hook_used(self) -> bool:
        return self.inside in ("hook", "both")

    def start(self) -> Topology:
        self.workdir.mkdir(parents=True, exist_ok=True)
        if self.redis is not None:
            self.redis.start()
        self.peer.start()
        # The module reads modgud.yaml when hs1 starts: one without the policy rooms,
        # which exist only once hs1 runs; hs1 is restarted with the final one below.
        self._write_config()
        if self.module_loaded:
            # The module as an operator loads it: the entry `modgud synapse-config` prints
            # (in front of synapse-http-antispam with "both", so that both are asked).
            self.hs1.modules[:0] = self._module_entry()
        errors: list[BaseException] = []

        def start(hs: SynapseHomeserver) -> None:
            try:
                hs.start()
            except BaseException as e:  # noqa: BLE001 - reported below
                errors.append(e)

        threads = [
            threading.Thread(target=start, args=(hs,)) for hs in (self.hs1, self.hs2, self.hs3)
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if errors:
            self.stop()
            raise errors[0]
        alice_id, alice_token = self.hs1.register_user("alice", admin=True)
        (self.workdir / "admin.token").write_text(alice_token)
        (self.workdir / "hook.token").write_text(self.hook_token)
        # A policy list modgud subscribes to (alice moderates it).
        admin = ClientApi(self.hs1.base_url, alice_token)
        self.policy_room = admin.create_room(preset="private_chat", name="modgud test bans")
        # A space whose policy binds its rooms (alice builds its hierarchy in tests).
        self.space = admin.create_room(name="modgud test space")
        if self.management:
            self._make_management_room(admin)
        self._start_modgud()
        if self.module_loaded:
            self.hs1.restart()  # the module reads the policy rooms now in modgud.yaml
        for name, hs in (("bob", self.hs2), ("carol", self.hs3)):
            user_id, token = hs.register_user(name)
            self.users[name] = user_id
            setattr(self, name, ClientApi(hs.base_url, token))
        self.users["alice"] = alice_id
        self.alice = ClientApi(self.hs1.base_url, alice_token)
        return self

    def _make_management_room(self, admin: ClientApi) -> None:
        for name in ("modgud", "mod", "visitor"):
            self.users[name], self.tokens[name] = self.hs1.register_user(name)
        (self.workdir / "bot.token").write_text(self.tokens["modgud"])
        self.management_room = admin.create_room(
            preset="private_chat",
            name="modgud management",
            power_levels={"users": {self.users["mod"]: 50}},  # alice: creator (v12)
        )
        for name in ("modgud", "mod", "visitor"):
            admin.invite(self.management_room, self.users[name])
        for name in ("mod", "visitor"):
            ClientApi(self.hs1.base_url, self.tokens[name]).join(self.management_room)

    def _management_config(self) -> list[str]:
        if not self.management_room:
            return []
        return [
            "management:",
            f"  room: '{self.management_room}'",
            "  access_token_file: bot.token",
            f"  leak_interval_seconds: {self.leak_interval_seconds}",
            "  alarm_window_seconds: 5",
        ]

    def _module_entry(self) -> list[dict[str, Any]]:
        mode = ["--mode", "audit"] if self.inside == "both" else []
        snippet = self.cli("synapse-config", *mode)
        if snippet.returncode != 0:
            raise RuntimeError(f"modgud synapse-config failed: {snippet.stderr}")
        entries: list[dict[str, Any]] = yaml.safe_load(snippet.stdout)["modules"]
        return entries

    def _write_config(self) -> None:
        for replica in range(len(self.processes)):
            self._write_replica_config(replica)

    def _write_replica_config(self, replica: int) -> None:
        policy = (
            f"policy: {{policy_lists: ['{self.policy_room}'], spaces: ['{self.space}'],"
            " refresh_seconds: 5}"
            if self.policy_room
            else "policy: {refresh_seconds: 5}"
        )
        hook = (
            [f"hook: {{listen: '127.0.0.1:{self.hook_port}', token_file: hook.token}}"]
            if self.hook_used
            else []
        )
        self.config_of(replica).write_text(
            "\n".join(
                [
                    f"server_name: {self.hs1.server_name}",
                    f"upstream: {self.hs1.federation_url}",
                    "listen:",
                    f"  inbound: 127.0.0.1:{self.replica_ports[replica]}",
                    f"  metrics: 127.0.0.1:{self.replica_metrics_ports[replica]}",
                    *self._outbound_config(),
                    *hook,
                    f"homeserver: {{admin_api: '{self.hs1.base_url}', access_token_file: admin.token,"
                    " room_admin_token_file: admin.token}",
                    f"metrics: {{servers: ['{self.leaky.name}']}}",
                    policy,
                    *self._management_config(),
                    f"mode: {self.mode}",
                    f"on_error: {self.on_error}",
                    f"database: {self.database}",
                    "state: {ttl_seconds: 30}",
                    "trusted_key_servers:",
                    f"  - server_name: '{self.peer.notary.name}'",
                    f"    verify_keys: {json.dumps(self.peer.trusted_key_server['verify_keys'])}",
                    f"    url: https://{self.peer.notary.name}",
                    "    verify_tls: false  # the test peer's self-signed certificate",
                    "",
                ]
            )
        )

    def _start_modgud(self) -> None:
        self._write_config()
        for replica in range(len(self.processes)):
            self.start_replica(replica)
        if self.nginx is not None and self.nginx.process is None:
            self.nginx.start()

    def start_replica(self, replica: int) -> None:
        """Start one `modgud run` (its config written already)."""
        name = "modgud.log" if replica == 0 else f"modgud-{replica}.log"
        log = open(self.workdir / name, "ab")  # noqa: SIM115 - closed with the process
        modgud = Path(sys.executable).with_name("modgud")
        capture = self.capture if replica == 0 else self.workdir / f"capture-{replica}.flows"
        self.processes[replica] = subprocess.Popen(
            [
                str(modgud),
                "run",
                "--config",
                str(self.config_of(replica)),
                "--",
                "--set",
                f"save_stream_file={capture}",  # every flow, for `modgud audit` replays
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=self.workdir,
        )
        hook_up = not self.hook_used or _wait_port(self.hook_port, 30)
        if not (hook_up and _wait_port(self.replica_ports[replica], 30)):
            self.stop()
            raise RuntimeError("modgud did not start:\n" + self.modgud_log())

    def kill_modgud(self, replica: int = 0) -> None:
        """kill -9: no clean stop, no flush (what a crash or the OOM killer does)."""
        process = self.processes[replica]
        assert process is not None
        process.kill()
        process.wait(10)

    def restart_modgud(self, *, on_error: str | None = None) -> None:
        """Start modgud again (after kill_modgud, or stopping it first), optionally with
        another on_error."""
        for process in self.processes:
            if process is not None and process.poll() is None:
                process.terminate()
                process.wait(15)
        if on_error is not None:
            self.on_error = on_error
        self._start_modgud()

    def _outbound_config(self) -> list[str]:
        if not self.outbound:
            return []
        return [
            f"  outbound: 127.0.0.1:{self.outbound_port}",
            "outbound:",
            "  ca_dir: ca",
            "  verify_tls: false  # the test servers' self-signed certificates",
            f"  signing_key_file: {self.hs1.signing_key_path}",
        ]

    def cli(
        self, *args: str, timeout: float = 120, replica: int = 0
    ) -> subprocess.CompletedProcess[str]:
        """Run `modgud ARGS --config <a replica's config>`, as an operator would."""
        modgud = Path(sys.executable).with_name("modgud")
        return subprocess.run(
            [str(modgud), *args, "--config", str(self.config_of(replica))],
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    def modgud_log(self, replica: int = 0) -> str:
        path = self.workdir / ("modgud.log" if replica == 0 else f"modgud-{replica}.log")
        return path.read_text(errors="replace")[-4000:] if path.exists() else ""

    def stop(self) -> None:
        if self.nginx is not None:
            self.nginx.stop()
        for process in self.processes:
            if process is not None and process.poll() is None:
                process.terminate()
                try:
                    process.wait(15)
                except subprocess.TimeoutExpired:
                    process.kill()
        for hs in (self.hs3, self.hs2, self.hs1):
            try:
                hs.stop()
            except Exception:  # noqa: BLE001 - best effort on teardown
                pass
        if self.redis is not None:
            self.redis.stop()
        self.peer.stop()

    def __enter__(self) -> Topology:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- observations ----------------------------------------------------------------

    def findings(self, **filters: Any) -> list[dict[str, Any]]:
        if "://" not in self.database and not Path(self.database).exists():
            return []
        return list(query_findings([self.database], **filters))

    def wait_for_findings(
        self, predicate: Callable[[list[dict[str, Any]]], bool], timeout: float = 20, **filters: Any
    ) -> list[dict[str, Any]]:
        deadline = time.monotonic() + timeout
        while True:
            rows = self.findings(**filters)
            if predicate(rows) or time.monotonic() > deadline:
                return rows
            time.sleep(0.25)

    def metrics_text(self, replica: int = 0) -> str:
        with urllib.request.urlopen(
            f"http://127.0.0.1:{self.replica_metrics_ports[replica]}/metrics", timeout=5
        ) as r:
            return str(r.read().decode())

    # -- the scripted peer, talking to hs1 through modgud -------------------------------

    @property
    def hs1_address(self) -> str:
        return f"127.0.0.1:{self.modgud_port}"

    def address(self, via: int | None = None) -> str:
        """Where the peer reaches hs1: its federation port (modgud, or nginx in front of
        the replicas), or one replica's own listener (`via`: its index)."""
        return self.hs1_address if via is None else f"127.0.0.1:{self.replica_ports[via]}"

    def peer_join(
        self,
        server: PeerServer,
        localpart: str,
        room_id: str,
        membership: str = "join",
        *,
        via: int | None = None,
    ) -> tuple[str, str]:
        """A user of a peer server joins (or knocks on, or leaves) a room of hs1."""
        user_id = server.user(localpart)
        event_id, _ = self.peer.join(
            server, user_id, room_id, self.hs1.server_name, self.address(via), membership=membership
        )
        return user_id, event_id

    def peer_send(
        self,
        server: PeerServer,
        pdus: list[dict[str, Any]] = (),  # type: ignore[assignment]
        edus: list[dict[str, Any]] = (),  # type: ignore[assignment]
        *,
        raw_body: bytes | None = None,
        txn_id: str | None = None,
        via: int | None = None,
    ) -> FederationResponse:
        return self.peer.send(
            server,
            self.hs1.server_name,
            self.address(via),
            pdus,
            edus,
            raw_body=raw_body,
            txn_id=txn_id,
        )

    def space_with_a_locked_room(self, levels: dict[str, Any]) -> tuple[str, list[str], str]:
        """A space of alice's with m.space.power_levels `levels` and three rooms: two of
        alice's and one another user created, where alice — the room admin — is at 0.
        Returns (space, the rooms, the locked room)."""
        via = {"via": [self.hs1.server_name]}
        space = self.alice.create_room(name="power levels space")
        rooms = [
            self.alice.create_room(name="space room"),
            self.alice.create_room(room_version="10"),
        ]
        _, token = self.hs1.register_user(f"dave{secrets.token_hex(4)}")
        locked = ClientApi(self.hs1.base_url, token).create_room(name="dave's room")
        self.alice.join(locked)
        for room in (*rooms, locked):
            self.alice.send_state(space, "m.space.child", room, via)
        self.alice.send_state(space, "m.space.power_levels", "", levels)
        return space, [*rooms, locked], locked

    # -- crafted federation traffic ------------------------------------------------------

    def hs1_event(self, event_id: str) -> dict[str, Any] | None:
        """Depth and the like from hs1's own database (a test's view of the truth)."""
        db = sqlite3.connect(f"file:{self.hs1.workdir / 'homeserver.db'}?mode=ro", uri=True)
        try:
            row = db.execute(
                "SELECT e.depth, j.json FROM events e JOIN event_json j USING (event_id) WHERE e.event_id = ?",
                (event_id,),
            ).fetchone()
        finally:
            db.close()
        if row is None:
            return None
        event: dict[str, Any] = json.loads(row[1])
        event["depth"] = row[0]
        return event

    def craft_message(
        self, room_id: str, room_version: str, author: SynapseHomeserver, user_id: str, body: str
    ) -> tuple[str, dict[str, Any]]:
        """A correctly hashed and signed message by `user_id`, built on hs1's latest event."""
        state = {
            (e["type"], e.get("state_key")): e["event_id"] for e in self.alice.room_state(room_id)
        }
        latest = self.alice.messages(room_id, limit=1)[0]["event_id"]
        depth = int((self.hs1_event(latest) or {}).get("depth", 1)) + 1
        auth = [state[("m.room.power_levels", "")], state[("m.room.member", user_id)]]
        if room_version != "12":
            auth.insert(0, state[("m.room.create", "")])
        event = {
            "room_id": room_id,
            "sender": user_id,
            "type": "m.room.message",
            "content": {"msgtype": "m.text", "body": body},
            "origin_server_ts": int(time.time() * 1000),
            "depth": depth,
            "prev_events": [latest],
            "auth_events": auth,
        }
        rv = get_room_version(room_version)
        assert rv is not None
        signed = sign_event(
            event, rv, author.server_name, read_signing_key(author.signing_key_path)
        )
        event_id = compute_event_id(signed, rv)
        assert event_id is not None
        return event_id, signed

    def send_transaction(
        self,
        origin: SynapseHomeserver,
        pdus: list[dict[str, Any]],
        edus: list[dict[str, Any]] | None = None,
    ) -> tuple[int, Any]:
        """PUT /send to hs1 through modgud, signed as `origin` (with its real key)."""
        txn_id = "t" + secrets.token_hex(6)
        path = f"/_matrix/federation/v1/send/{txn_id}"
        content = {
            "origin": origin.server_name,
            "origin_server_ts": int(time.time() * 1000),
            "pdus": pdus,
            "edus": edus or [],
        }
        auth = sign_request(
            "PUT",
            path,
            origin.server_name,
            self.hs1.server_name,
            content,
            read_signing_key(origin.signing_key_path),
        )
        request = urllib.request.Request(
            f"https://127.0.0.1:{self.modgud_port}{path}",
            data=json.dumps(content).encode(),
            method="PUT",
            headers={"Authorization": auth, "Content-Type": "application/json"},
        )
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE  # mitmproxy's generated certificate, on loopback
        try:
            with urllib.request.urlopen(request, timeout=30, context=context) as resp:
                return resp.status, json.loads(resp.read() or b"null")
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read() or b"null")
