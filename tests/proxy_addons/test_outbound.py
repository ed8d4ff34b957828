"""The outbound listener's addon on flows as mitmproxy hands them over (regular mode):
pushes to servers refused in a room, the rebuilt and re-signed mixed transaction, pulled
events, per-check actions and on_error. Room state comes from a static table (a test
double); tests/e2e/test_outbound.py runs the same against real Synapse."""

from __future__ import annotations

import json

import pytest
from mitmproxy import http
from mitmproxy.proxy.mode_specs import ProxyMode
from mitmproxy.test import taddons, tflow
from signedjson.key import generate_signing_key, get_verify_key, write_signing_keys

from proxy_addons.cli import main, proxy_settings
from proxy_addons.config import ConfigError, load_config
from proxy_addons.enforcer import Enforcer
from proxy_addons.outbound import OutboundWatcher
from rules.xmatrix import parse_xmatrix, sign_request, verify_request_signature
from tests.proxy_addons.conftest import (
    LOCAL,
    OPEN_ROOM,
    ROOM,
    StaticStateSource,
    pdu,
    policy,
    recorded_findings,
)

HS_KEY = generate_signing_key("a_key")
OUTBOUND = "listen: {outbound: '127.0.0.1:8449'}\n"


@pytest.fixture
def outbound_runtime(make_runtime, tmp_path):
    with open(tmp_path / "hs.signing.key", "w") as f:
        write_signing_keys(f, [HS_KEY])

    def make(mode="enforce", on_error="open", source=None, key=True, extra=""):
        section = "outbound: {signing_key_file: hs.signing.key}\n" if key else ""
        return make_runtime(mode, on_error, source=source, extra=OUTBOUND + section + extra)

    return make


def push_flow(destination, pdus=(), edus=(), txn_id="1700000000001"):
    """hs.test's own PUT /send to `destination`, through its https_proxy."""
    path = f"/_matrix/federation/v1/send/{txn_id}"
    content = {"origin": LOCAL, "origin_server_ts": 1, "pdus": list(pdus), "edus": list(edus)}
    auth = sign_request("PUT", path, LOCAL, destination, content, HS_KEY)
    request = http.Request.make(
        "PUT",
        f"https://{destination}{path}",
        json.dumps(content).encode(),
        {"Authorization": auth, "Content-Type": "application/json"},
    )
    return proxied(tflow.tflow(req=request))


def proxied(flow):
    flow.client_conn.proxy_mode = ProxyMode.parse("regular")
    return flow


async def run(holder, flow, response=None):
    watcher = OutboundWatcher(holder)
    with taddons.context(watcher):
        await watcher.request(flow)
        if response is not None and flow.response is None:
            flow.response = response
            await watcher.response(flow)
    return flow


def sent(flow):
    return json.loads(flow.request.content)


def typing(room_id):
    return {"edu_type": "m.typing", "content": {"room_id": room_id, "user_id": "@a:hs.test"}}


def receipt(*room_ids):
    read = {"m.read": {"@a:hs.test": {"event_ids": ["$e"], "data": {"ts": 1}}}}
    return {"edu_type": "m.receipt", "content": {r: read for r in room_ids}}


async def test_a_transaction_of_only_refused_events_is_answered_as_delivered(outbound_runtime):
    holder = outbound_runtime()
    flow = await run(holder, push_flow("denied.test", [pdu("@a:hs.test")], [typing(ROOM)]))
    assert flow.response is not None and flow.response.status_code == 200
    assert json.loads(flow.response.content) == {"pdus": {}}
    rows = recorded_findings(holder)
    assert {(r["rule"], r["action"], r["direction"], r["attributed_to"]) for r in rows} == {
        ("leak.outbound", "rejected", "outbound", LOCAL)
    }
    assert {r["event_type"] for r in rows} == {"m.room.message", "m.typing"}
    assert all(r["event_id"] for r in rows if r["event_type"] == "m.room.message")
    assert "ACL" in rows[0]["detail"]


async def test_a_permitted_destination_is_untouched(outbound_runtime):
    holder = outbound_runtime()
    flow = push_flow("good.test", [pdu("@a:hs.test")], [receipt(ROOM)])
    before = (flow.request.content, flow.request.headers["Authorization"])
    await run(holder, flow)
    assert flow.response is None
    assert (flow.request.content, flow.request.headers["Authorization"]) == before
    assert recorded_findings(holder) == []


async def test_a_mixed_transaction_loses_the_refused_items_and_is_signed_again(outbound_runtime):
    """ROOM denies denied.test, OPEN_ROOM does not: the ROOM event and typing notice go,
    the receipt keeps only OPEN_ROOM, and the new body carries hs.test's valid signature."""
    holder = outbound_runtime()
    flow = push_flow(
        "denied.test",
        [pdu("@a:hs.test", body="refused"), pdu("@a:hs.test", room_id=OPEN_ROOM, body="fine")],
        [typing(ROOM), receipt(ROOM, OPEN_ROOM), typing(OPEN_ROOM)],
    )
    await run(holder, flow)
    assert flow.response is None
    body = sent(flow)
    assert [p["content"]["body"] for p in body["pdus"]] == ["fine"]
    assert body["edus"] == [receipt(OPEN_ROOM), typing(OPEN_ROOM)]
    assert body["origin"] == LOCAL
    auth = parse_xmatrix(flow.request.headers["Authorization"])
    assert auth is not None and (auth.origin, auth.destination) == (LOCAL, "denied.test")
    assert verify_request_signature(
        auth, "PUT", flow.request.path, "denied.test", body, get_verify_key(HS_KEY)
    )
    rows = recorded_findings(holder)
    assert sorted(r["event_type"] for r in rows) == ["m.receipt", "m.room.message", "m.typing"]
    assert {r["action"] for r in rows} == {"rejected"}


async def test_without_the_key_a_mixed_transaction_goes_out_flagged(outbound_runtime):
    holder = outbound_runtime(key=False)
    flow = push_flow(
        "denied.test", [pdu("@a:hs.test"), pdu("@a:hs.test", room_id=OPEN_ROOM, body="fine")]
    )
    body = flow.request.content
    await run(holder, flow)
    assert flow.response is None and flow.request.content == body
    assert [(r["rule"], r["action"]) for r in recorded_findings(holder)] == [
        ("leak.outbound", "flagged")
    ]


async def test_a_mixed_transaction_that_cannot_be_signed_goes_out_as_it_is(outbound_runtime):
    """A kept event with a lone surrogate (a JSON escape) is not canonical JSON, so the
    rebuilt transaction cannot be signed. Found by fuzzing: the body was changed first and
    signing then raised, an internal error that sent the new body with the old signature;
    now it goes out untouched, flagged, like a mixed transaction without the key."""
    holder = outbound_runtime()
    fine = {**pdu("@a:hs.test", room_id=OPEN_ROOM), "content": {"body": "\ud800"}}
    content = {"origin": LOCAL, "pdus": [pdu("@a:hs.test"), fine], "edus": []}
    body = json.dumps(content).encode()
    auth = sign_request("PUT", "/_matrix/federation/v1/send/1", LOCAL, "denied.test", {}, HS_KEY)
    request = http.Request.make(
        "PUT", "https://denied.test/_matrix/federation/v1/send/1", body, {"Authorization": auth}
    )
    flow = await run(holder, proxied(tflow.tflow(req=request)))
    assert flow.response is None
    assert (flow.request.content, flow.request.headers["Authorization"]) == (body, auth)
    registry = holder.runtime.metrics.registry
    assert not registry.get_sample_value("modgud_internal_errors_total", {"where": "outbound"})
    assert [(r["rule"], r["action"]) for r in recorded_findings(holder)] == [
        ("leak.outbound", "flagged")
    ]


async def test_audit_mode_and_a_flag_setting_only_record(outbound_runtime):
    for holder in (
        outbound_runtime(mode="audit"),
        outbound_runtime(extra="policy: {checks: {outbound: flag}}\n"),
    ):
        flow = await run(holder, push_flow("denied.test", [pdu("@a:hs.test")]))
        assert flow.response is None
        assert [(r["rule"], r["action"]) for r in recorded_findings(holder)] == [
            ("leak.outbound", "flagged")
        ]
    holder = outbound_runtime(extra="policy: {checks: {outbound: 'off'}}\n")
    flow = await run(holder, push_flow("denied.test", [pdu("@a:hs.test")]))
    assert flow.response is None and recorded_findings(holder) == []


async def test_unknown_room_state_fails_open_or_asks_for_a_retry(outbound_runtime):
    """on_error: closed never claims delivery of what it could not check: 503, so the
    homeserver keeps the events and sends them again later."""
    down = StaticStateSource(fail=True)
    closed = outbound_runtime(on_error="closed", source=down)
    flow = await run(closed, push_flow("good.test", [pdu("@a:hs.test")]))
    assert flow.response is not None and flow.response.status_code == 503
    opened = outbound_runtime(source=down)
    flow = await run(opened, push_flow("good.test", [pdu("@a:hs.test")]))
    assert flow.response is None
    assert [(r["rule"], r["action"]) for r in recorded_findings(opened)] == [
        ("error.state_unavailable", "flagged")
    ]


async def test_an_outgoing_acl_change_is_judged_by_the_new_state(outbound_runtime):
    """The homeserver sends a state event only once stored: the room is read again before
    the transaction that carries it is judged."""
    source = StaticStateSource({ROOM: policy(deny=())})
    holder = outbound_runtime(source=source)
    flow = await run(holder, push_flow("denied.test", [pdu("@a:hs.test", body="before")]))
    assert flow.response is None
    source.rooms[ROOM] = policy(deny=("denied.test",))
    acl = pdu("@a:hs.test", event_type="m.room.server_acl")
    acl["state_key"] = ""
    acl["content"] = {"allow": ["*"], "deny": ["denied.test"]}
    flow = await run(holder, push_flow("denied.test", [acl], txn_id="2"))
    assert flow.response is not None and flow.response.status_code == 200
    assert source.fetches == 2


async def test_pulled_events_of_a_refused_server_are_blamed_on_the_responder(outbound_runtime):
    holder = outbound_runtime()
    runtime = holder.runtime
    evil = pdu("@evil:denied.test", body="served")
    fine = pdu("@a:good.test", body="fine")
    # good.test delivered the evil event to us before (the edge indexed it).
    from rules.federation import parse_pdu

    runtime.index.see([parse_pdu(evil, 0, "good.test")], "good.test")
    assert runtime.store.flush(5)
    path = "/_matrix/federation/v1/get_missing_events/" + ROOM
    auth = sign_request("POST", path, LOCAL, "relay.test", {}, HS_KEY)
    request = http.Request.make("POST", f"https://relay.test{path}", b"{}", {"Authorization": auth})
    answer = http.Response.make(200, json.dumps({"events": [fine, evil, "junk"]}).encode())
    await run(holder, proxied(tflow.tflow(req=request)), answer)
    rows = [r for r in recorded_findings(holder) if r["rule"] == "leak.pulled"]
    assert [(r["attributed_to"], r["confidence"], r["sender_server"]) for r in rows] == [
        ("relay.test", "low", "denied.test")
    ]
    assert rows[0]["endpoint"] == "get_missing_events" and rows[0]["event_id"]
    assert "first delivered to us by good.test" in rows[0]["detail"]


async def test_each_listener_leaves_the_others_flows_alone(outbound_runtime):
    """The edge does not judge the homeserver's own requests, nor the watcher inbound ones."""
    holder = outbound_runtime()
    enforcer = Enforcer(holder)
    outbound = push_flow("denied.test", [pdu("@evil:denied.test")])
    with taddons.context(enforcer):
        await enforcer.request(outbound)
    assert outbound.response is None
    from tests.proxy_addons.conftest import send_flow

    inbound = send_flow("denied.test", [pdu("@evil:denied.test")])
    await run(holder, inbound)
    assert inbound.response is None
    assert recorded_findings(holder) == []


def test_outbound_config_and_command_line(tmp_path):
    base = "server_name: hs.test\nupstream: http://127.0.0.1:8008\n"
    (tmp_path / "ok.yaml").write_text(
        base + OUTBOUND + "outbound: {ca_dir: myca, verify_tls: false}\n"
    )
    config = load_config(tmp_path / "ok.yaml")
    args = proxy_settings(config, None)
    assert "mode=regular@127.0.0.1:8449" in args
    for option in ("connection_strategy=lazy", f"confdir={tmp_path / 'myca'}", "ssl_insecure=true"):
        assert option in args
    (tmp_path / "bundle.pem").write_text("")
    (tmp_path / "ca.yaml").write_text(base + OUTBOUND + "outbound: {ca_file: bundle.pem}\n")
    args = proxy_settings(load_config(tmp_path / "ca.yaml"), None)
    assert f"ssl_verify_upstream_trusted_ca={tmp_path / 'bundle.pem'}" in args
    assert "ssl_insecure=true" not in args
    (tmp_path / "off.yaml").write_text(base)
    assert not any("regular" in a for a in proxy_settings(load_config(tmp_path / "off.yaml"), None))


@pytest.mark.parametrize(
    ("text", "key", "line", "message"),
    [
        ("outbound: {verify_tls: false}\n", "outbound", 3, "set listen.outbound"),
        (OUTBOUND + "outbound: {ca_file: nope.pem}\n", "outbound.ca_file", 4, "no such file"),
        (
            OUTBOUND + "outbound: {signing_key_file: nope}\n",
            "outbound.signing_key_file",
            4,
            "cannot read",
        ),
        (
            OUTBOUND + "outbound: {signing_key_file: bad.key}\n",
            "outbound.signing_key_file",
            4,
            "Synapse's format",
        ),
        (OUTBOUND + "outbound: {verify_tls: 'no'}\n", "outbound.verify_tls", 4, "expected bool"),
        (OUTBOUND + "outbound: {colour: red}\n", "outbound.colour", 4, "unknown"),
    ],
)
def test_outbound_config_errors_name_the_key(tmp_path, text, key, line, message):
    (tmp_path / "bad.key").write_text("not a key at all\n")
    path = tmp_path / "modgud.yaml"
    path.write_text("server_name: hs.test\nupstream: http://127.0.0.1:8008\n" + text)
    with pytest.raises(ConfigError) as e:
        load_config(path)
    assert (e.value.key, e.value.line) == (key, line)
    assert message in str(e.value)


def test_ca_command_creates_the_ca_once_and_prints_its_certificate(tmp_path, capsys):
    path = tmp_path / "modgud.yaml"
    path.write_text("server_name: hs.test\nupstream: http://127.0.0.1:8008\n" + OUTBOUND)
    assert main(["ca", "--config", str(path)]) == 0
    cert = capsys.readouterr().out.strip()
    assert cert == str(tmp_path / "ca" / "mitmproxy-ca-cert.pem")
    first = open(cert).read()
    assert first.startswith("-----BEGIN CERTIFICATE-----")
    assert main(["ca", "--config", str(path)]) == 0
    assert open(capsys.readouterr().out.strip()).read() == first  # kept, not replaced
    path.write_text("server_name: hs.test\nupstream: http://127.0.0.1:8008\n")
    assert main(["ca", "--config", str(path)]) == 2


async def test_a_pulled_event_is_blamed_on_who_delivered_it_a_moment_ago(make_runtime):
    """The index's rows wait in the writer's queue for its flush interval; the first
    deliverer of a pulled event is read after what was queued before is written."""
    from rules.federation import parse_transaction

    holder = make_runtime()
    runtime = holder.runtime
    body = json.dumps({"origin": "relay.test", "pdus": [pdu("@x:denied.test")], "edus": []})
    txn = parse_transaction(body.encode(), "t1", "relay.test")
    assert runtime.index.see(txn.pdus, "relay.test") == 1
    found = await OutboundWatcher(holder)._first_deliverers(
        runtime, [(p, "$e", None) for p in txn.pdus]
    )
    assert found == {(ROOM, txn.pdus[0].content_hash): "relay.test"}
