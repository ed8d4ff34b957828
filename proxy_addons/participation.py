"""Writing m.server.participation into a room through the homeserver's Client-Server API,
as a room admin whose token the operator keeps in a file (`homeserver.room_admin_token_file`).

Used by `modgud approve` and `modgud deny`. modgud does not hold the decision itself: the
state event in the room does, and modgud's state refresh makes it effective at the edge.
"""

from __future__ import annotations

import json
import secrets
import urllib.error
import urllib.request
from urllib.parse import quote

from rules.roomstate import PARTICIPATION_TYPES
from rules.servername import parse_server_name

__all__ = ["ParticipationError", "write_participation"]

EVENT_TYPE = "m.server.participation"
assert EVENT_TYPE in PARTICIPATION_TYPES


class ParticipationError(Exception):
    """Why the participation event could not be written, in words for the operator."""


def write_participation(
    client_api: str,
    token: str,
    room_id: str,
    server: str,
    participation: str,
    reason: str | None = None,
    *,
    timeout: float = 15.0,
) -> str:
    """PUT the state event; returns its event ID or raises ParticipationError."""
    if participation not in ("permitted", "deny"):
        raise ParticipationError(f"participation must be permitted or deny, not {participation!r}")
    if parse_server_name(server) is None:
        raise ParticipationError(f"{server!r} is not a server name")
    if not room_id.startswith("!"):
        raise ParticipationError(f"{room_id!r} is not a room ID (!…)")
    content: dict[str, str] = {"participation": participation}
    if reason:
        content["reason"] = reason
    url = (
        f"{client_api.rstrip('/')}/_matrix/client/v3/rooms/{quote(room_id, safe='')}"
        f"/state/{EVENT_TYPE}/{quote(server, safe='')}"
    )
    request = urllib.request.Request(
        url,
        data=json.dumps(content).encode(),
        method="PUT",
        headers={
            "Authorization": f"Bearer {token}",
            "Content-Type": "application/json",
            "X-Request-Id": secrets.token_hex(4),
        },
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout) as resp:
            answer = json.loads(resp.read() or b"{}")
    except urllib.error.HTTPError as e:
        raise ParticipationError(_explain(e.code, e.read(), room_id)) from None
    except (urllib.error.URLError, OSError) as e:
        reason_text = getattr(e, "reason", e)
        raise ParticipationError(f"homeserver unreachable at {client_api}: {reason_text}") from None
    event_id = answer.get("event_id") if isinstance(answer, dict) else None
    if not isinstance(event_id, str):
        raise ParticipationError("the homeserver accepted the event but returned no event_id")
    return event_id


def _explain(status: int, body: bytes, room_id: str) -> str:
    try:
        answer = json.loads(body)
    except ValueError:
        answer = {}
    error = str(answer.get("error", "")) if isinstance(answer, dict) else ""
    errcode = str(answer.get("errcode", "")) if isinstance(answer, dict) else ""
    if status == 401:
        return (
            f"the room admin token was refused ({errcode or status}): check room_admin_token_file"
        )
    if status == 404 or errcode == "M_NOT_FOUND":
        return f"unknown room {room_id}: the homeserver does not know it"
    if status == 403 and "not in room" in error.lower():
        return f"unknown room {room_id}, or the room admin is not joined to it ({error})"
    if status == 403:
        return (
            f"no power: the room admin may not send {EVENT_TYPE} in {room_id} ({error}); "
            "raise their power level or that of the event type"
        )
    return f"the homeserver answered {status} {errcode}: {error}".strip()
