"""Endpoint classification (spec: Server-Server API paths)."""

import pytest

from proxy_addons.endpoints import EndpointClass, classify_path

ROOM = "!abc:example.org"
ROOM_Q = "%21abc%3Aexample.org"


@pytest.mark.parametrize(
    ("path", "cls", "name", "room_id"),
    [
        ("/_matrix/federation/v1/send/123", EndpointClass.SEND, "send", None),
        (
            f"/_matrix/federation/v1/make_join/{ROOM_Q}/%40u%3Ax",
            EndpointClass.ROOM_DATA,
            "make_join",
            ROOM,
        ),
        (
            f"/_matrix/federation/v2/send_join/{ROOM_Q}/%24e",
            EndpointClass.ROOM_DATA,
            "send_join",
            ROOM,
        ),
        (
            f"/_matrix/federation/v1/send_join/{ROOM_Q}/%24e",
            EndpointClass.ROOM_DATA,
            "send_join",
            ROOM,
        ),
        (
            f"/_matrix/federation/v1/make_leave/{ROOM_Q}/%40u%3Ax",
            EndpointClass.ROOM_DATA,
            "make_leave",
            ROOM,
        ),
        (
            f"/_matrix/federation/v2/send_leave/{ROOM_Q}/%24e",
            EndpointClass.ROOM_DATA,
            "send_leave",
            ROOM,
        ),
        (f"/_matrix/federation/v2/invite/{ROOM_Q}/%24e", EndpointClass.ROOM_DATA, "invite", ROOM),
        (
            f"/_matrix/federation/v1/make_knock/{ROOM_Q}/%40u%3Ax?ver=10",
            EndpointClass.ROOM_DATA,
            "make_knock",
            ROOM,
        ),
        (
            f"/_matrix/federation/v1/send_knock/{ROOM_Q}/%24e",
            EndpointClass.ROOM_DATA,
            "send_knock",
            ROOM,
        ),
        (
            f"/_matrix/federation/v1/state/{ROOM_Q}?event_id=%24e",
            EndpointClass.ROOM_DATA,
            "state",
            ROOM,
        ),
        (
            f"/_matrix/federation/v1/state_ids/{ROOM_Q}?event_id=%24e",
            EndpointClass.ROOM_DATA,
            "state_ids",
            ROOM,
        ),
        (
            f"/_matrix/federation/v1/backfill/{ROOM_Q}?v=%24e&limit=10",
            EndpointClass.ROOM_DATA,
            "backfill",
            ROOM,
        ),
        (
            f"/_matrix/federation/v1/event_auth/{ROOM_Q}/%24e",
            EndpointClass.ROOM_DATA,
            "event_auth",
            ROOM,
        ),
        (
            f"/_matrix/federation/v1/get_missing_events/{ROOM_Q}",
            EndpointClass.ROOM_DATA,
            "get_missing_events",
            ROOM,
        ),
        (
            f"/_matrix/federation/v1/timestamp_to_event/{ROOM_Q}?dir=f&ts=1",
            EndpointClass.ROOM_DATA,
            "timestamp_to_event",
            ROOM,
        ),
        (f"/_matrix/federation/v1/hierarchy/{ROOM_Q}", EndpointClass.ROOM_DATA, "hierarchy", ROOM),
        ("/_matrix/federation/v1/event/%24e", EndpointClass.EVENT, "event", None),
        ("/_matrix/federation/v1/query/profile?user_id=x", EndpointClass.OTHER, "query", None),
        ("/_matrix/federation/v1/version", EndpointClass.OTHER, "version", None),
        ("/_matrix/key/v2/server", EndpointClass.KEYS, "keys", None),
        ("/_matrix/client/versions", EndpointClass.NOT_FEDERATION, "other", None),
        ("/_matrix/federation/v1/send/", EndpointClass.OTHER, "send", None),
        ("/_matrix/federation/v1/state", EndpointClass.OTHER, "state", None),
        ("/\x00garbage", EndpointClass.NOT_FEDERATION, "other", None),
    ],
)
def test_classify_path(path, cls, name, room_id):
    """Each federation path maps to its class and, for room-data endpoints, its room."""
    endpoint = classify_path(path)
    assert (endpoint.cls, endpoint.name, endpoint.room_id) == (cls, name, room_id)


def test_send_txn_id_is_unquoted():
    """The transaction ID is taken from the path, percent-decoded."""
    assert classify_path("/_matrix/federation/v1/send/a%2Fb").txn_id == "a/b"
