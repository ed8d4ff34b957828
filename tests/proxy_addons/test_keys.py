"""Key fetching: the homeserver's notary API first, then the configured trusted key
servers, whose answers count only when both the notary's and the server's own signatures
verify. The key server here is the testbed's real federation peer on loopback (TLS); the
homeserver is absent (a closed port), as when Synapse cannot serve a key."""

from __future__ import annotations

import aiohttp
import pytest
from signedjson.key import encode_verify_key_base64, generate_signing_key, get_verify_key

from proxy_addons.config import KeyServer
from proxy_addons.keys import KeyCache
from proxy_addons.testbed.homeserver import free_port
from proxy_addons.testbed.peer import FederationPeer


@pytest.fixture(scope="module")
def peer(tmp_path_factory):
    peer = FederationPeer(tmp_path_factory.mktemp("peer"), free_port())
    peer.add_server("denied.test")
    with peer:
        yield peer


def key_server(peer, verify_key=None):
    key_id = peer.notary.key_id
    key = verify_key or encode_verify_key_base64(get_verify_key(peer.notary.signing_key))
    return KeyServer(peer.notary.name, ((key_id, key),), f"https://{peer.notary.name}", False)


async def fetch(peer, notary):
    async with aiohttp.ClientSession() as session:
        cache = KeyCache(f"http://127.0.0.1:{free_port()}", lambda: session, key_servers=(notary,))
        denied = peer.servers["denied.test"]
        return await cache.ensure("denied.test", denied.key_id), denied


async def test_key_from_a_trusted_key_server(peer):
    """The homeserver cannot serve it; the trusted key server can, verified."""
    key, denied = await fetch(peer, key_server(peer))
    assert key is not None
    assert encode_verify_key_base64(key.verify_key) == encode_verify_key_base64(
        get_verify_key(denied.signing_key)
    )


async def test_key_server_with_another_key_is_not_believed(peer):
    """An answer the configured notary key does not verify is ignored."""
    other = encode_verify_key_base64(get_verify_key(generate_signing_key("x")))
    key, _ = await fetch(peer, key_server(peer, other))
    assert key is None
