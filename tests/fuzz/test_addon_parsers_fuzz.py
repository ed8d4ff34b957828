"""Fuzzing the parsers of proxy_addons/: request paths, Authorization headers as mitmproxy
decodes them, and key-query answers (from the homeserver and from trusted key servers)."""

from __future__ import annotations

from hypothesis import strategies as st
from mitmproxy import http
from mitmproxy.test import tflow
from signedjson.key import generate_signing_key, get_verify_key
from signedjson.sign import sign_json
from unpaddedbase64 import encode_base64

from proxy_addons.config import KeyServer
from proxy_addons.endpoints import Endpoint, EndpointClass, classify_path
from proxy_addons.flowinfo import request_auth
from proxy_addons.keys import parse_server_keys
from rules.signatures import ServerKey
from rules.xmatrix import XMatrixAuth
from tests.fuzz.flows import wire
from tests.fuzz.harness import fuzz
from tests.fuzz.strategies import json_values, mutated, paths, strings, text, xmatrix_headers

NOTARY_KEY = generate_signing_key("n")
NOTARY = KeyServer(
    "notary.test",
    (("ed25519:n", encode_base64(get_verify_key(NOTARY_KEY).encode())),),
    "https://notary.test",
)
SERVER_KEY = generate_signing_key("1")


@fuzz(paths | st.text() | st.text(alphabet=st.characters(exclude_categories=())))
def test_classify_path_never_raises(path):
    """Any path, with or without query, percent-encoded or not, gets an Endpoint whose
    room, transaction and event IDs are strings where its class needs them."""
    endpoint = classify_path(path)
    assert isinstance(endpoint, Endpoint) and isinstance(endpoint.cls, EndpointClass)
    if endpoint.cls is EndpointClass.SEND:
        assert isinstance(endpoint.txn_id, str)
    if endpoint.cls is EndpointClass.ROOM_DATA:
        assert isinstance(endpoint.room_id, str)
    if endpoint.cls is EndpointClass.EVENT:
        assert isinstance(endpoint.event_id, str)


@fuzz(st.lists(xmatrix_headers().map(wire) | st.binary(max_size=80), max_size=3))
def test_request_auth_from_any_header_bytes(values):
    """Authorization headers of any bytes, several of them: the first valid X-Matrix one
    or None."""
    request = http.Request.make("GET", "https://hs.test/")
    request.headers = http.Headers([(b"Authorization", v) for v in values])
    auth = request_auth(tflow.tflow(req=request))
    assert auth is None or isinstance(auth, XMatrixAuth)


@st.composite
def key_answers(draw: st.DrawFn) -> object:
    """A key query answer: entries for the server asked about and others, signed by the
    server and the notary (or not), mutated now and then; or any JSON."""
    entries = []
    for _ in range(draw(st.integers(0, 3))):
        server = draw(st.sampled_from(["origin.test", "other.test"]) | strings)
        entry: dict[str, object] = {
            "server_name": server,
            "valid_until_ts": draw(st.integers(0, 2**63) | json_values),
            "verify_keys": {
                draw(st.sampled_from(["ed25519:1", "ed25519:", "rsa:1"]) | text): {
                    "key": draw(
                        st.just(encode_base64(get_verify_key(SERVER_KEY).encode())) | strings
                    )
                }
            },
            "old_verify_keys": draw(
                st.dictionaries(text, st.fixed_dictionaries({"key": strings}) | json_values)
            ),
        }
        if draw(st.booleans()) and isinstance(server, str):
            try:
                entry = sign_json(entry, server, SERVER_KEY)
                entry = sign_json(entry, "notary.test", NOTARY_KEY)
            except (ValueError, TypeError):
                pass
        entries.append(entry)
    answer: object = {"server_keys": entries}
    if draw(st.integers(0, 3)) == 0:
        answer = draw(mutated(answer))
    return draw(st.just(answer) | json_values)


@fuzz(key_answers(), st.sampled_from([None, NOTARY]))
def test_parse_server_keys_from_any_answer(answer, notary):
    """Keys of the server asked about, or ValueError when the answer has no key list."""
    try:
        keys = parse_server_keys("origin.test", answer, notary)
    except ValueError:
        assert not isinstance(answer, dict) or not isinstance(answer.get("server_keys"), list)
        return
    for key_id, key in keys.items():
        assert isinstance(key, ServerKey) and key.server_name == "origin.test"
        assert key.key_id == key_id and key_id.startswith("ed25519:")
