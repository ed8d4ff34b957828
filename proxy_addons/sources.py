"""Where room state comes from, as the policy code sees it: a `fetch_state` coroutine
function, and the one error it raises. Shared by modgud's own state source (Synapse's admin
API) and the Synapse module's (Synapse's ModuleApi), so it imports neither's client."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

__all__ = ["FetchState", "StateError"]


class StateError(Exception):
    """The state source failed (unreachable, 5xx, bad answer)."""


# room ID -> the room's current state events, None when the homeserver is not in the room
FetchState = Callable[[str], Awaitable[list[object] | None]]
