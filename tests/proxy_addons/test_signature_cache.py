"""Event signatures are verified once per event and set of signatures: an event relayed
or delivered again is answered from the cache, a copy with other (forged) signatures is
verified on its own. Keys from a static table (a test double for the key servers)."""

from __future__ import annotations

from signedjson.key import get_verify_key

import proxy_addons.enforcer as enforcer_module
from rules.roomversion import get_room_version
from rules.signatures import ServerKey, sign_event
from tests.proxy_addons.conftest import KEYS, pdu, recorded_findings, run_edge, send_flow


def _trust(runtime, server):
    key = KEYS[server]
    key_id = f"ed25519:{key.version}"
    runtime.keys._keys[server] = (
        1e18,
        {key_id: ServerKey(server, key_id, get_verify_key(key), 2**62)},
    )


async def test_repeated_and_relayed_events_are_verified_once(make_runtime, monkeypatch):
    holder = make_runtime(verify_signatures=True)
    runtime = holder.runtime
    for server in ("good.test", "relay.test"):
        _trust(runtime, server)
    calls = []
    real = enforcer_module.verify_event_signatures

    def counting(*args, **kwargs):
        calls.append(args[0].get("content", {}).get("body"))
        return real(*args, **kwargs)

    monkeypatch.setattr(enforcer_module, "verify_event_signatures", counting)
    version = get_room_version("10")
    event = sign_event(pdu("@a:good.test", body="once"), version, "good.test", KEYS["good.test"])
    await run_edge(holder, send_flow("good.test", [event]))
    await run_edge(holder, send_flow("good.test", [event], txn_id="t2"))  # again
    await run_edge(holder, send_flow("relay.test", [event], txn_id="t3"))  # relayed
    assert calls == ["once"]
    assert runtime.signatures.hits == 2
    # The same event with a forged signature is checked on its own, and refused.
    forged = dict(event, signatures={"good.test": {"ed25519:1": "A" * 86}})
    flow = send_flow("relay.test", [forged], txn_id="t4")
    await run_edge(holder, flow)
    assert calls == ["once", "once"]
    assert [r["rule"] for r in recorded_findings(holder)].count("signature.event") == 1


def test_cache_keys_tell_signatures_apart_that_json_could_conflate():
    """The cache key encodes the signatures as decoded: the order of their keys does not
    matter, but values a JSON encoder may write alike (1 and 1.0, infinity and null) and
    any changed signature give other keys; a digest of other signed bytes too."""
    from proxy_addons.verdicts import SignatureCache

    digest = b"d" * 32
    sigs = {"a.test": {"ed25519:1": "sig", "ed25519:2": "other"}, "b.test": {"ed25519:1": "x"}}
    reordered = {"b.test": {"ed25519:1": "x"}, "a.test": {"ed25519:2": "other", "ed25519:1": "sig"}}
    key = SignatureCache.key(digest, sigs)
    assert key is not None and key == SignatureCache.key(digest, reordered)
    assert key != SignatureCache.key(b"e" * 32, sigs)
    variants = [
        {"a.test": {"ed25519:1": "sih", "ed25519:2": "other"}, "b.test": {"ed25519:1": "x"}},
        {"a.test": {"ed25519:1": 1}},
        {"a.test": {"ed25519:1": 1.0}},
        {"a.test": {"ed25519:1": float("inf")}},
        {"a.test": {"ed25519:1": None}},
    ]
    keys = [SignatureCache.key(digest, v) for v in variants]
    assert key not in keys and len(set(keys)) == len(keys)
    assert SignatureCache.key(digest, {"a.test": object()}) is None  # not encodable: no cache
