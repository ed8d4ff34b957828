"""A member of the management room, for tests and the demo: a moderator (or not) who
speaks through mautrix, the client library modgud's bot uses, and reads what the bot
posted."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp
from mautrix.api import HTTPAPI, Method, Path
from mautrix.client import ClientAPI
from mautrix.types import EventID, EventType, MessageType, RoomID, TextMessageEventContent

__all__ = ["Member"]


class Member:
    def __init__(self, base_url: str, token: str, user_id: str, room_id: str) -> None:
        self.base_url = base_url
        self.token = token
        self.user_id = user_id
        self.room = RoomID(room_id)

    def _run[T](self, call: Callable[[ClientAPI], Awaitable[T]]) -> T:
        async def go() -> T:
            async with aiohttp.ClientSession() as session:
                api = HTTPAPI(base_url=self.base_url, token=self.token, client_session=session)
                return await call(ClientAPI(api=api))

        return asyncio.run(go())

    def say(self, body: str) -> str:
        content = TextMessageEventContent(msgtype=MessageType.TEXT, body=body)
        return str(
            self._run(lambda c: c.send_message_event(self.room, EventType.ROOM_MESSAGE, content))
        )

    def react(self, event_id: str, key: str) -> str:
        return str(self._run(lambda c: c.react(self.room, EventID(event_id), key)))

    def messages(self) -> list[dict[str, Any]]:
        """The room's latest 500 messages, oldest first, as the server sends them."""
        page = self._run(
            lambda c: c.api.request(
                Method.GET,
                Path.v3.rooms[self.room].messages,
                query_params={"dir": "b", "limit": "500"},
            )
        )
        return [e for e in reversed(page["chunk"]) if e["type"] == "m.room.message"]

    def posts(self, sender: str, starts: str) -> list[dict[str, Any]]:
        """`sender`'s messages whose body starts with `starts`."""
        return [
            e
            for e in self.messages()
            if e["sender"] == sender and e["content"].get("body", "").startswith(starts)
        ]

    def answers(self, sender: str, event_id: str) -> list[dict[str, Any]]:
        """`sender`'s messages in the thread of `event_id`."""
        return [
            e
            for e in self.messages()
            if e["sender"] == sender
            and e["content"].get("m.relates_to", {}).get("rel_type") == "m.thread"
            and e["content"]["m.relates_to"].get("event_id") == event_id
        ]
