"""`mode: sink` behind a real nginx (Debian's package), set up as the README says: nginx
serves the federation port and proxies to Synapse, and mirrors every federation request to
modgud, whose answers it throws away. The traffic reaches Synapse untouched; the sink
records the leak, with the request signatures intact through nginx."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from proxy_addons.store import query_findings
from proxy_addons.testbed.homeserver import free_port
from proxy_addons.testbed.nginx import Nginx
from proxy_addons.testbed.scenarios import Stage
from proxy_addons.testbed.topology import _wait_port

pytestmark = pytest.mark.e2e  # nginx missing fails here, saying what to install (make deps)


@pytest.fixture
def sink(audit_topology, tmp_path):
    """A second modgud in sink mode on hs1's state, behind nginx in front of hs1."""
    topo = audit_topology
    config = yaml.safe_load(topo.config_path.read_text())
    port = free_port()
    for key in ("hook", "outbound"):
        config.pop(key, None)
    config.update(
        mode="sink",
        database=str(tmp_path / "sink.db"),
        listen={"inbound": f"127.0.0.1:{port}", "metrics": f"127.0.0.1:{free_port()}"},
    )
    config["homeserver"] = {"access_token_file": str(topo.workdir / "admin.token")}
    path = tmp_path / "sink.yaml"
    path.write_text(yaml.safe_dump(config))
    modgud = Path(sys.executable).with_name("modgud")
    log = open(tmp_path / "sink.log", "wb")  # noqa: SIM115 - closed below
    process = subprocess.Popen(
        [str(modgud), "run", "--config", str(path)], stdout=log, stderr=subprocess.STDOUT
    )
    nginx = Nginx(tmp_path / "nginx", free_port(), topo.hs1.base_url, f"http://127.0.0.1:{port}")
    try:
        assert _wait_port(port, 30), (tmp_path / "sink.log").read_text()
        nginx.start()
        yield nginx, path, tmp_path / "sink.db"
    finally:
        nginx.stop()
        process.terminate()
        process.wait(15)
        log.close()


def test_sink_behind_nginx_records_the_leak_and_alters_nothing(audit_topology, sink):
    topo = audit_topology
    nginx, config_path, database = sink
    stage = Stage(topo, "10")
    stage.open_room()
    dee = stage.join("denied", "dee")
    lee = stage.join("leaky", "lee")
    stage.deny("denied")
    leak = stage.message("denied", dee, "leaked past nginx")
    benign = stage.message("leaky", lee, "plain message via nginx")
    via_nginx = f"127.0.0.1:{nginx.port}"
    answer = topo.peer.send(topo.leaky, topo.hs1.server_name, via_nginx, [leak, benign])
    assert answer.status == 200, (answer.body, nginx.log())
    # Synapse answered, not modgud: it lists both events, and the sink altered nothing.
    assert set(answer.body["pdus"]) == {stage.event_id(leak), stage.event_id(benign)}
    assert topo.alice.wait_for_message(stage.room_id, "plain message via nginx")

    def rows():
        if not database.exists():
            return []
        return [r for r in query_findings([str(database)]) if r["room_id"] == stage.room_id]

    assert topo.alice.wait_for(lambda: rows(), timeout=20), nginx.log()
    found = rows()
    assert [(r["rule"], r["action"], r["attributed_to"], r["event_id"]) for r in found] == [
        ("acl.sender", "flagged", topo.leaky.name, stage.event_id(leak))
    ]
    # The mirrored copy kept its X-Matrix signature valid (checked: verify_signatures on).
    assert not [r for r in query_findings([str(database)]) if r["rule"].startswith("signature")]
    modgud = Path(sys.executable).with_name("modgud")
    leaks = subprocess.run(
        [str(modgud), "leaks", "--db", str(database), "--room", stage.room_id],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert f"blamed {topo.leaky.name}" in leaks.stdout, leaks.stdout + leaks.stderr
