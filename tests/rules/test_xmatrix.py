"""X-Matrix request authentication (spec: Server-Server API, "Request Authentication")."""

from __future__ import annotations

import pytest
from signedjson.key import generate_signing_key, get_verify_key

from rules.xmatrix import XMatrixAuth, parse_xmatrix, sign_request, verify_request_signature


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        (
            'X-Matrix origin="a.org",destination="b.org",key="ed25519:1",sig="abc"',
            XMatrixAuth("a.org", "b.org", "ed25519:1", "abc"),
        ),
        (
            "X-Matrix origin=a.org,key=ed25519:1,sig=abc",
            XMatrixAuth("a.org", None, "ed25519:1", "abc"),
        ),
        (
            'x-matrix ORIGIN="a.org", Key="ed25519:1" ,\tSig="abc"',
            XMatrixAuth("a.org", None, "ed25519:1", "abc"),
        ),
        (
            'X-Matrix origin="a.org",key="ed25519:1",sig="a\\"b"',
            XMatrixAuth("a.org", None, "ed25519:1", 'a"b'),
        ),
        (
            'X-Matrix origin="a.org:8448",key="ed25519:a_b",sig="s"',
            XMatrixAuth("a.org:8448", None, "ed25519:a_b", "s"),
        ),
        ('X-Matrix origin="a.org",key="ed25519:1"', None),
        ('X-Matrix key="ed25519:1",sig="s"', None),
        ('X-Matrix origin="bad name",key="ed25519:1",sig="s"', None),
        ('X-Matrix origin="a.org",key="rsa:1",sig="s"', None),
        ('X-Matrix origin="a.org",key="ed25519:",sig="s"', None),
        ('X-Matrix origin="a.org,key="ed25519:1",sig="s', None),
        ("Bearer abc", None),
        ("X-Matrix", None),
        ("X-Matrix garbage", None),
        ("", None),
        ("X-Matrix " + "a=b," * 5000, None),
    ],
)
def test_parse_xmatrix(header, expected):
    """Parsing follows Synapse: names case-insensitive, quoted or bare values, escapes."""
    assert parse_xmatrix(header) == expected


@pytest.mark.parametrize(
    "header",
    [
        'X-Matrix origin="a.org",key="ed25519:1",sig="abc",origin="b.org"',
        'X-Matrix origin="a.org",key="ed25519:1",sig="abc",SIG="def"',
        'X-Matrix origin="a.org",destination="b.org",key="ed25519:1",sig="s",destination="c.org"',
        # two credentials folded into one header, as HTTP allows for repeated headers
        'X-Matrix origin="a.org",key="ed25519:1",sig="s",X-Matrix origin="b.org",key="ed25519:1",'
        'sig="t"',
    ],
)
def test_a_parameter_given_twice_is_refused(header):
    """Synapse keeps the last of a repeated parameter; which value counts must never be
    a guess between modgud and the homeserver, so such a header is not valid X-Matrix
    (a request with it is answered 401 and blames nobody)."""
    assert parse_xmatrix(header) is None


KEY = generate_signing_key("1")
PATH = "/_matrix/federation/v1/send/t1?x=1"
BODY = {"origin": "a.org", "pdus": [], "edus": []}


def test_sign_then_verify_round_trip():
    """A request we sign verifies with the origin's verify key."""
    auth = parse_xmatrix(sign_request("PUT", PATH, "a.org", "b.org", BODY, KEY))
    assert auth is not None and auth.destination == "b.org"
    assert verify_request_signature(auth, "PUT", PATH, "b.org", BODY, get_verify_key(KEY))


@pytest.mark.parametrize(
    ("method", "uri", "destination", "content"),
    [
        ("POST", PATH, "b.org", BODY),
        ("PUT", "/_matrix/federation/v1/send/t2", "b.org", BODY),
        ("PUT", PATH, "c.org", BODY),
        ("PUT", PATH, "b.org", {**BODY, "pdus": [{}]}),
        ("PUT", PATH, "b.org", None),
    ],
)
def test_tampered_requests_do_not_verify(method, uri, destination, content):
    """Method, URI (with query), destination and body are all covered by the signature."""
    auth = parse_xmatrix(sign_request("PUT", PATH, "a.org", "b.org", BODY, KEY))
    assert not verify_request_signature(
        auth, method, uri, destination, content, get_verify_key(KEY)
    )


def test_garbage_signature_does_not_raise():
    """A signature that is not base64 simply fails."""
    auth = XMatrixAuth("a.org", "b.org", "ed25519:1", "!!!")
    assert not verify_request_signature(auth, "PUT", PATH, "b.org", BODY, get_verify_key(KEY))
