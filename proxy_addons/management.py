"""The management room: modgud as a bot account in a Matrix room of the protected
homeserver, where moderators already work (as with Mjolnir, Draupnir and Meowlnir).

It posts each new knock (with what modgud knows of the server), leaks grouped per (room,
blamed server, rule) and rate-limited, and operational alarms; it takes `!modgud` commands
and ✅/❌ reactions on knock messages from members whose power level in the room is at
least `management.moderator_level`, and answers each in a thread. The Client-Server API is
spoken through mautrix (the bot's token for the room; the room admin's token,
`homeserver.room_admin_token_file`, for what it writes elsewhere: participation and
policy-list rules), Synapse's admin API for a knocked room's name and type.

Restarts neither repeat nor lose anything (`Memory`, schema version 3):
- every message goes into an outbox before it is sent, and is sent with the outbox row's
  transaction ID, so sending it again after a crash gives the event already sent (Synapse
  keeps client transaction IDs for 30 minutes);
- the sync token is kept after each batch is handled, and every command and reaction
  acted on is remembered by event ID, so a batch handled again after a crash acts once;
  an answer's transaction ID is derived from its command's event ID, so a command acted
  on again answers once;
- what was read of findings (a row-ID cursor) and the leak groups' rate limits are kept
  in the same transaction as the outbox rows they produce.

With replicas on one PostgreSQL database, one bot is the leader at a time (a lease in the
database, renewed every few seconds): it alone syncs, posts knocks and leaks and acts on
commands. Every replica posts its own alarms, as its own counters are what they read.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import itertools
import json
import logging
import os
import secrets
import socket
import time
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any, cast

import aiohttp
from mautrix.api import HTTPAPI, Method, SynapseAdminPath
from mautrix.client import ClientAPI
from mautrix.errors import MatrixError
from mautrix.types import EventType, FilterID, PaginationDirection, RoomID, SyncToken
from prometheus_client import CollectorRegistry

from proxy_addons import alarms, notices
from proxy_addons.config import Config, Management
from proxy_addons.database import Connection, DatabaseError, reading, writing
from proxy_addons.leaks import LEAK_RULES, query_leaks
from proxy_addons.notices import Command, CommandError, Message
from proxy_addons.participation import ParticipationError, write_participation
from proxy_addons.store import decide_knock, query_findings, query_knocks
from rules.roomstate import room_policy_from_state

__all__ = ["ManagementBot", "Memory", "Post", "decide"]

logger = logging.getLogger(__name__)

LEASE_SECONDS = 30.0
SYNC_TIMEOUT_MS = 2_000
IDLE_SECONDS = 2.0  # a follower's pause between leader checks; the leader's sync long-poll
LEAK_REOPEN_SECONDS = 86_400.0  # after a quiet day a leak group gets a new message
LEAK_BATCH = 500
SETTLE_SECONDS = 3.0
CATCH_UP_EVENTS = 1_000  # a limited timeline is paged back at most this far
RETRY_MAX_SECONDS = 60.0
POLICY_RULE_TYPE = "m.policy.rule.server"

SYNC_FILTER = {
    "presence": {"types": []},
    "account_data": {"types": []},
    "room": {
        "timeline": {"types": ["m.room.message", "m.reaction"], "limit": 100},
        "state": {"types": [], "lazy_load_members": True},
        "ephemeral": {"types": []},
        "account_data": {"types": []},
    },
}
LEAK_MARKS = ", ".join("?" for _ in LEAK_RULES)
_LEAK_FINDINGS = (
    "SELECT id, ts, rule, room_id, event_id, sender_server, attributed_to, "  # noqa: S608
    f"confidence, detail FROM findings WHERE id > ? AND rule IN ({LEAK_MARKS}) "
    "ORDER BY id LIMIT ?"
)


@dataclass(frozen=True, slots=True)
class Post:
    """A message for the management room, kept in the outbox until sent."""

    txn_id: str
    kind: str  # knock | leak | count (a leak group's follow-up) | answer | note
    item: str  # what it is about: "room server" for a knock, the group key, an event ID
    content: Mapping[str, Any]


def txn_for(kind: str, item: str) -> str:
    """A transaction ID that the same message always gets (answers, knocks)."""
    return f"modgud.{kind}.{hashlib.sha256(item.encode()).hexdigest()[:32]}"


def fresh_txn(kind: str) -> str:
    return f"modgud.{kind}.{secrets.token_hex(16)}"


# -- memory ------------------------------------------------------------------------------------


class Memory:
    """The management room's state in the findings database. Blocking: the bot calls it
    through asyncio.to_thread, never on the event loop."""

    def __init__(self, database: str) -> None:
        self.database = database
        self._migrated = False

    @contextlib.contextmanager
    def _writing(self) -> Iterator[Connection]:
        """One transaction; the schema brought up to date on the first only (the bot
        writes every round: a migration's lock and checks each time are for nothing)."""
        with writing(self.database, migrate=not self._migrated) as db:
            self._migrated = True
            yield db

    def lead(self, holder: str, now: float, ttl: float = LEASE_SECONDS) -> bool:
        """Take or renew the leader lease; whether `holder` holds it."""
        with self._writing() as db:
            db.execute(
                "INSERT INTO management_cursors (name, holder, expires) VALUES ('leader', ?, ?) "
                "ON CONFLICT (name) DO UPDATE SET holder = excluded.holder, "
                "expires = excluded.expires WHERE management_cursors.holder = excluded.holder "
                "OR management_cursors.expires < ?",
                (holder, now + ttl, now),
            )
            row = db.one("SELECT holder FROM management_cursors WHERE name = 'leader'")
        return row is not None and row[0] == holder

    def release(self, holder: str) -> None:
        with self._writing() as db:
            db.execute(
                "UPDATE management_cursors SET expires = 0 WHERE name = 'leader' AND holder = ?",
                (holder,),
            )

    def cursor(self, name: str) -> str | None:
        with reading(self.database) as conn:
            row = conn.one("SELECT value FROM management_cursors WHERE name = ?", (name,))
        return None if row is None else row[0]

    def set_cursor(self, name: str, value: str) -> None:
        with self._writing() as db:
            _set_cursor(db, name, value)

    def latest_finding(self) -> int:
        with reading(self.database) as conn:
            row = conn.one("SELECT COALESCE(MAX(id), 0) FROM findings")
        return int(row[0]) if row else 0

    def unsent(self) -> list[Post]:
        with reading(self.database) as conn:
            rows = conn.tuples(
                "SELECT txn_id, kind, item, content FROM management_outbox "
                "WHERE event_id IS NULL ORDER BY created, txn_id"
            )
        return [Post(t, k, i, json.loads(c)) for t, k, i, c in rows]

    def mark_sent(self, txn_id: str, event_id: str, now: float) -> None:
        with self._writing() as db:
            db.execute(
                "UPDATE management_outbox SET event_id = ?, sent_at = ? WHERE txn_id = ?",
                (event_id, now, txn_id),
            )

    def about(self, event_id: str) -> tuple[str, str] | None:
        """What a message the bot sent is about: (kind, item)."""
        with reading(self.database) as conn:
            row = conn.one(
                "SELECT kind, item FROM management_outbox WHERE event_id = ?", (event_id,)
            )
        return None if row is None else (row[0], row[1])

    def message_of(self, kind: str, item: str) -> str | None:
        """The event ID of the message sent about `item`, once it is sent."""
        with reading(self.database) as conn:
            row = conn.one(
                "SELECT event_id FROM management_outbox WHERE kind = ? AND item = ? "
                "AND event_id IS NOT NULL ORDER BY created LIMIT 1",
                (kind, item),
            )
        return None if row is None else row[0]

    def group_message(self, group_key: str) -> str | None:
        """The event ID of a leak group's (latest) message, once it is sent."""
        with reading(self.database) as conn:
            row = conn.one(
                "SELECT o.event_id FROM management_groups g JOIN management_outbox o "
                "ON o.txn_id = g.first_txn WHERE g.group_key = ?",
                (group_key,),
            )
        return None if row is None else row[0]

    def new_knocks(self) -> list[dict[str, Any]]:
        """Pending knocks with no message yet."""
        with reading(self.database) as conn:
            keys = conn.tuples(
                "SELECT k.room_id, k.server FROM knocks k WHERE k.status = 'pending' "
                "AND NOT EXISTS (SELECT 1 FROM management_outbox o WHERE o.kind = 'knock' "
                "AND o.item = k.room_id || ' ' || k.server) ORDER BY k.first_seen"
            )
        if not keys:
            return []
        wanted = set(keys)
        pending = query_knocks(self.database, status="pending")
        new = [k for k in pending if (k["room_id"], k["server"]) in wanted]
        return sorted(new, key=lambda k: k["first_seen"])  # the oldest posted first

    def leak_findings(self, after: int, limit: int = LEAK_BATCH) -> list[dict[str, Any]]:
        with reading(self.database) as conn:
            return conn.dicts(_LEAK_FINDINGS, (after, *LEAK_RULES, limit))

    def groups(self) -> dict[str, LeakGroup]:
        with reading(self.database) as conn:
            rows = conn.tuples(
                "SELECT group_key, room_id, blamed, rule, first_txn, last_posted, unposted, "
                "total FROM management_groups"
            )
        return {
            key: LeakGroup(
                key, room, blamed, rule, txn, float(last or 0), int(unposted), int(total)
            )
            for key, room, blamed, rule, txn, last, unposted, total in rows
        }

    def record(
        self,
        posts: Sequence[Post],
        now: float,
        *,
        cursors: Mapping[str, str] | None = None,
        groups: Sequence[LeakGroup] = (),
        acted: str | None = None,
    ) -> None:
        """In one transaction: messages into the outbox, cursors moved, leak groups
        updated (group_key, room_id, blamed, rule, first_txn, last_posted, unposted,
        total), a command or reaction marked done."""
        with self._writing() as db:
            for post in posts:
                db.execute(
                    "INSERT INTO management_outbox (txn_id, kind, item, content, created) "
                    "VALUES (?, ?, ?, ?, ?) ON CONFLICT (txn_id) DO NOTHING",
                    (post.txn_id, post.kind, post.item, json.dumps(post.content), now),
                )
            for name, value in (cursors or {}).items():
                _set_cursor(db, name, value)
            for group in groups:
                db.execute(
                    "INSERT INTO management_groups (group_key, room_id, blamed, rule, "
                    "first_txn, last_posted, unposted, total) VALUES (?, ?, ?, ?, ?, ?, ?, ?) "
                    "ON CONFLICT (group_key) DO UPDATE SET first_txn = excluded.first_txn, "
                    "last_posted = excluded.last_posted, unposted = excluded.unposted, "
                    "total = excluded.total",
                    group.row(),
                )
            if acted is not None:
                db.execute("UPDATE management_acted SET done = 1 WHERE event_id = ?", (acted,))

    def begin(self, event_id: str, kind: str, sender: str, now: float) -> bool:
        """Whether a command or reaction is still to be acted on (not done before)."""
        with self._writing() as db:
            db.execute(
                "INSERT INTO management_acted (event_id, kind, sender, ts, done) "
                "VALUES (?, ?, ?, ?, 0) ON CONFLICT (event_id) DO NOTHING",
                (event_id, kind, sender, now),
            )
            row = db.one("SELECT done FROM management_acted WHERE event_id = ?", (event_id,))
        return row is not None and not row[0]


def _set_cursor(db: Connection, name: str, value: str) -> None:
    db.execute(
        "INSERT INTO management_cursors (name, value) VALUES (?, ?) "
        "ON CONFLICT (name) DO UPDATE SET value = excluded.value",
        (name, value),
    )


# -- decisions shared with the CLI ---------------------------------------------------------------


def decide(config: Config, room_id: str, server: str, approve: bool, reason: str | None) -> str:
    """Approve or deny a knock: m.server.participation written into the room as the room
    admin, and the queue updated. Returns the event ID; raises ParticipationError. Blocking
    (urllib): `modgud approve|deny` and the bot (through a thread) both call it."""
    if not config.room_admin_token:
        raise ParticipationError(
            f"{config.path}: homeserver.room_admin_token_file is not set (a room admin's "
            "access token is needed to write m.server.participation)"
        )
    event_id = write_participation(
        config.client_api,
        config.room_admin_token,
        room_id,
        server,
        "permitted" if approve else "deny",
        reason,
    )
    decide_knock(config.database, room_id, server, "approved" if approve else "denied", reason)
    return event_id


# -- the bot -----------------------------------------------------------------------------------


class ManagementBot:
    def __init__(
        self,
        config: Config,
        *,
        registry: CollectorRegistry | None = None,
        on_policy_change: Callable[[], None] | None = None,
        clock: Callable[[], float] = time.time,
        holder: str | None = None,
    ) -> None:
        assert config.management is not None
        self.config = config
        self.settings: Management = config.management
        self.room_id = self.settings.room_id
        self.memory = Memory(config.database)
        self.registry = registry
        self.on_policy_change = on_policy_change
        self.clock = clock
        self.holder = holder or f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(4)}"
        self.where = f"{socket.gethostname()} ({config.inbound})"
        self.user_id = ""
        self._session: aiohttp.ClientSession | None = None
        self._client: ClientAPI | None = None
        self._admin: ClientAPI | None = None
        self._room_admin: ClientAPI | None = None
        # The registry's counters start at zero with the process: what fails before the
        # bot's first look (at start-up, say) counts in its first window.
        self._alarm_counters = alarms.Counters()
        self._alarm_at = clock()
        self._active_alarms: set[alarms.Alarm] = set()
        self.leading = False
        self.started_ms = int(clock() * 1000)

    # Clients made on first use, inside the running loop.
    def _api(self, base_url: str, token: str | None) -> ClientAPI:
        if self._session is None:
            self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60))
        return ClientAPI(
            api=HTTPAPI(base_url=base_url, token=token or "", client_session=self._session)
        )

    @property
    def client(self) -> ClientAPI:
        if self._client is None:
            self._client = self._api(self.settings.client_api, self.settings.token)
        return self._client

    @property
    def admin(self) -> ClientAPI:
        if self._admin is None:
            self._admin = self._api(self.config.admin_api, self.config.admin_token)
        return self._admin

    @property
    def room_admin(self) -> ClientAPI:
        if self._room_admin is None:
            self._room_admin = self._api(self.config.client_api, self.config.room_admin_token)
        return self._room_admin

    async def close(self) -> None:
        if self.leading:
            with contextlib.suppress(DatabaseError):
                await asyncio.to_thread(self.memory.release, self.holder)
        if self._session is not None:
            await self._session.close()

    # -- the loop

    async def run(self) -> None:
        """Until cancelled: join the room, then lead (sync, post, act) or follow, and
        watch the alarms; any failure is logged and retried with a growing pause."""
        pause = 1.0
        joined = False
        while True:
            try:
                if not joined:
                    await self.start()
                    joined = True
                await self.step()
                pause = 1.0
            except asyncio.CancelledError:
                raise
            except (MatrixError, aiohttp.ClientError, TimeoutError, DatabaseError, OSError) as e:
                logger.warning("management room: %s; again in %.0f s", _say(e), pause)
                await asyncio.sleep(pause)
                pause = min(pause * 2, RETRY_MAX_SECONDS)
            except Exception:  # noqa: BLE001 - the bot must never die, nor take modgud down
                logger.exception("management room: unexpected error; again in %.0f s", pause)
                await asyncio.sleep(pause)
                pause = min(pause * 2, RETRY_MAX_SECONDS)

    async def start(self) -> None:
        whoami = await self.client.whoami()
        self.user_id = str(whoami.user_id)
        await self.client.join_room_by_id(RoomID(self.room_id))  # already joined: a no-op
        logger.info("management room %s joined as %s", self.room_id, self.user_id)

    async def step(self) -> None:
        self.leading = await asyncio.to_thread(self.memory.lead, self.holder, self.clock())
        if self.leading:
            await self.sync()
            await self.notify()
            await self.flush()
        else:
            await asyncio.sleep(IDLE_SECONDS)
        await self.watch_alarms()

    # -- reading the room

    async def sync(self) -> None:
        token = await asyncio.to_thread(self.memory.cursor, "sync_token")
        answer = await self.client.sync(
            since=SyncToken(token) if token else None,
            timeout=SYNC_TIMEOUT_MS if token else 0,
            filter_id=FilterID(json.dumps(SYNC_FILTER)),  # Synapse takes a filter inline
        )
        next_batch = answer.get("next_batch")
        joined = answer.get("rooms", {}).get("join", {})
        timeline = joined.get(self.room_id, {}).get("timeline", {})
        events = list(timeline.get("events", []))
        if token is None:
            # The very first start acts on nothing from before modgud started (an old
            # room's history of commands), only on what was said since.
            events = [e for e in events if _ts(e) >= self.started_ms]
        elif timeline.get("limited") and timeline.get("prev_batch"):
            events = await self.catch_up(str(timeline["prev_batch"])) + events
        for event in events:
            await self.handle(event)
        if isinstance(next_batch, str):
            await asyncio.to_thread(self.memory.set_cursor, "sync_token", next_batch)

    async def catch_up(self, prev_batch: str) -> list[dict[str, Any]]:
        """A gap in the timeline (modgud was down a while): page back to what was handled
        before (the newest event's time, `last_ts`), at most CATCH_UP_EVENTS events."""
        last_ts = await asyncio.to_thread(self.memory.cursor, "last_ts")
        since = float(last_ts or 0)
        found: list[dict[str, Any]] = []
        token: str | None = prev_batch
        while token and len(found) < CATCH_UP_EVENTS:
            page = await self.client.api.request(
                Method.GET,
                _messages_path(self.room_id),
                query_params={
                    "from": token,
                    "dir": PaginationDirection.BACKWARD.value,
                    "limit": "100",
                },
            )
            chunk = page.get("chunk", [])
            older = [
                e for e in chunk if isinstance(e, dict) and e.get("origin_server_ts", 0) >= since
            ]
            found.extend(older)
            if len(older) < len(chunk) or not chunk:
                break
            token = page.get("end")
        if len(found) >= CATCH_UP_EVENTS:
            logger.warning(
                "management room: more than %d events missed; older ones skipped", CATCH_UP_EVENTS
            )
        return list(reversed(found))

    async def handle(self, event: Mapping[str, Any]) -> None:
        sender, event_id = event.get("sender"), event.get("event_id")
        if not isinstance(sender, str) or not isinstance(event_id, str) or sender == self.user_id:
            return
        content = event.get("content")
        if not isinstance(content, dict):
            return
        if event.get("type") == "m.room.message" and notices.is_command(content.get("body")):
            if await asyncio.to_thread(
                self.memory.begin, event_id, "command", sender, self.clock()
            ):
                await self.command(event_id, sender, str(content["body"]))
        elif event.get("type") == "m.reaction":
            relates = content.get("m.relates_to")
            if not isinstance(relates, dict) or relates.get("rel_type") != "m.annotation":
                return
            target = relates.get("event_id")
            approve = notices.reaction_decision(relates.get("key"))
            if approve is None or not isinstance(target, str):
                return
            about = await asyncio.to_thread(self.memory.about, target)
            if about is None or about[0] != "knock":
                return
            if await asyncio.to_thread(
                self.memory.begin, event_id, "reaction", sender, self.clock()
            ):
                room_id, _, server = about[1].partition(" ")
                await self.react(
                    event_id, sender, target, room_id, server, approve, relates.get("key")
                )
        ts = event.get("origin_server_ts")
        if isinstance(ts, int):
            await asyncio.to_thread(self.memory.set_cursor, "last_ts", str(ts))

    async def power_of(self, user_id: str) -> float:
        state = await self.client.api.request(Method.GET, _state_path(self.room_id))
        return room_policy_from_state(
            self.room_id, state if isinstance(state, list) else []
        ).power.of(user_id)

    async def refused(self, sender: str, what: str) -> Message | None:
        """None when the sender may do this; else the refusal to answer with."""
        level = await self.power_of(sender)
        need = self.settings.moderator_level
        if level >= need:
            return None
        return notices.text_message(
            f"{sender}: only members with power level {need} or more in this room may "
            f"{what} (you have {level:g}). Nothing was done."
        )

    # -- commands and reactions

    async def command(self, event_id: str, sender: str, body: str) -> None:
        answer = await self.refused(sender, "give modgud commands")
        if answer is None:
            try:
                command = notices.parse_command(body)
            except CommandError as e:
                answer = notices.text_message(f"{e}")
            else:
                logger.info("management room: %s from %s", command.verb, sender)
                answer = await self.guarded(self.run_command(command, sender), command.verb)
        post = Post(txn_for("answer", event_id), "answer", event_id, answer.content(event_id))
        await asyncio.to_thread(self.memory.record, [post], self.clock(), acted=event_id)
        await self.flush()

    async def react(
        self,
        event_id: str,
        sender: str,
        knock_message: str,
        room_id: str,
        server: str,
        approve: bool,
        key: object,
    ) -> None:
        verb = "approve" if approve else "deny"
        refusal = await self.refused(sender, f"{verb} knocks")
        answer = refusal or await self.guarded(
            self.decide(room_id, server, approve, f"{sender} reacted {key}", sender), verb
        )
        post = Post(txn_for("answer", event_id), "answer", event_id, answer.content(knock_message))
        await asyncio.to_thread(self.memory.record, [post], self.clock(), acted=event_id)
        await self.flush()

    async def guarded(self, work: Awaitable[Message], what: str) -> Message:
        """The answer of `work`, or — when it failed in a way nobody foresaw — an answer
        saying so: a command that fails for good must be answered and marked done, or
        every later command would wait behind it for ever."""
        try:
            return await work
        except asyncio.CancelledError:
            raise
        except Exception as e:  # noqa: BLE001 - answered, and logged with its traceback
            logger.exception("management room: %s failed", what)
            return notices.text_message(
                f"{what} failed: {_say(e)}. It may have been done in part; modgud's log has "
                "the details."
            )

    async def decide(
        self, room_id: str, server: str, approve: bool, how: str, sender: str
    ) -> Message:
        try:
            written = await asyncio.to_thread(
                decide, self.config, room_id, server, approve, f"by {sender} in the management room"
            )
        except (ParticipationError, DatabaseError) as e:
            return notices.text_message(
                f"Could not {'approve' if approve else 'deny'} {server} in {room_id}: {e}"
            )
        status = "Approved" if approve else "Denied"
        participation = "permitted" if approve else "deny"
        return notices.text_message(
            f"{status} {server} in {room_id} ({how}): m.server.participation {participation} "
            f"written ({written}); modgud applies it once the homeserver has it."
        )

    async def run_command(self, command: Command, sender: str) -> Message:
        verb = command.verb
        if verb == "help":
            return notices.help_message()
        if verb == "knocks":
            rows = await asyncio.to_thread(query_knocks, self.config.database, status="pending")
            return notices.knocks_message(rows)
        if verb in ("approve", "deny"):
            assert command.room and command.server
            answer = await self.decide(
                command.room,
                command.server,
                verb == "approve",
                f"{notices.COMMAND_PREFIX} {verb}",
                sender,
            )
            knock = await asyncio.to_thread(
                self.memory.message_of, "knock", f"{command.room} {command.server}"
            )
            if knock is not None:  # the knock's own thread says so too
                note = Post(fresh_txn("note"), "note", knock, answer.content(knock))
                await asyncio.to_thread(self.memory.record, [note], self.clock())
            return answer
        if verb == "leaks":
            groups = await asyncio.to_thread(query_leaks, [self.config.database], room=command.room)
            return notices.leaks_message(groups)
        if verb == "findings":
            return await self.findings(command)
        if verb in ("ban", "unban"):
            return await self.ban(command, sender)
        if verb == "history":
            return await self.history(str(command.room))
        return await self.space(command)

    async def history(self, room_id: str) -> Message:
        """The history audit of a room (`modgud history ROOM`), in a thread of its own
        with its own event loop: it reads and writes the database as it goes."""
        from proxy_addons.history import HistoryError, audit_room, history_findings, history_policy

        try:
            run = await asyncio.to_thread(
                asyncio.run, audit_room(self.config, room_id, history_policy(self.config))
            )
            recorded = await asyncio.to_thread(history_findings, self.config.database, room_id)
        except HistoryError as e:
            return notices.text_message(f"The history of {room_id} could not be read: {e}")
        return notices.history_message(run.room_id, run.judged, run.position, recorded)

    async def findings(self, command: Command) -> Message:
        from proxy_addons.cli import parse_since  # the CLI's own reading of "1h", ISO times

        options = command.options
        try:
            since = parse_since(options["since"]) if "since" in options else None
        except Exception as e:  # noqa: BLE001 - argparse's error type: its text is the answer
            return notices.text_message(str(e))
        limit = int(options.get("limit", "10"))
        rows = await asyncio.to_thread(
            lambda: list(
                query_findings(
                    [self.config.database],
                    room=options.get("room"),
                    rule=options.get("rule"),
                    since=since,
                    limit=min(limit, 50),
                )
            )
        )
        return notices.findings_message(rows)

    async def ban(self, command: Command, sender: str) -> Message:
        policy_list = self.settings.policy_list
        if policy_list is None:
            return notices.text_message(
                "No policy list to write to: set management.policy_list or policy.policy_lists. "
                "Nothing was done."
            )
        if not self.config.room_admin_token:
            return notices.text_message(
                "homeserver.room_admin_token_file is not set: modgud cannot write the policy "
                "list. Nothing was done."
            )
        entity = str(command.server)
        content: dict[str, Any] = {}
        if command.verb == "ban":
            content = {
                "entity": entity,
                "recommendation": "m.ban",
                "reason": command.reason or f"banned by {sender} in the management room",
            }
        try:
            written = await self.room_admin.send_state_event(
                RoomID(policy_list),
                EventType.find(POLICY_RULE_TYPE, EventType.Class.STATE),
                cast(Any, content),
                state_key=f"rule:{entity}",
            )
        except MatrixError as e:
            return notices.text_message(
                f"The policy list {policy_list} refused the rule: {_say(e)}. Nothing was done."
            )
        if self.on_policy_change is not None:
            self.on_policy_change()
        if command.verb == "ban":
            return notices.text_message(
                f"Banned {entity}: {POLICY_RULE_TYPE} m.ban in {policy_list} ({written}); "
                "modgud enforces it at its next policy refresh."
            )
        return notices.text_message(
            f"Unbanned {entity}: the rule in {policy_list} is removed ({written})."
        )

    async def space(self, command: Command) -> Message:
        from proxy_addons import spaces

        kind, action = command.words
        allowed = tuple(filter(None, command.options.get("allow_fail", "").split(" ")))
        lines = await spaces.run_for_bot(self.config, str(command.room), kind, action, allowed)
        return notices.text_message("\n".join(lines), code=True)

    # -- notifications

    async def notify(self) -> None:
        now = self.clock()
        posts: list[Post] = []
        for knock in await asyncio.to_thread(self.memory.new_knocks):
            name, is_space = await self.room_name(str(knock["room_id"]))
            item = f"{knock['room_id']} {knock['server']}"
            message = notices.knock_message(knock, name, is_space)
            posts.append(Post(txn_for("knock", item), "knock", item, message.content()))
        if posts:
            await asyncio.to_thread(self.memory.record, posts, now)
        await self.notify_leaks(now)

    async def notify_leaks(self, now: float) -> None:
        cursor = await asyncio.to_thread(self.memory.cursor, "findings")
        if cursor is None:  # the first start: only leaks from now on
            latest = await asyncio.to_thread(self.memory.latest_finding)
            await asyncio.to_thread(self.memory.set_cursor, "findings", str(latest))
            return
        rows = await asyncio.to_thread(self.memory.leak_findings, int(cursor))
        # A judge's finding (the module's, the hook's) is replaced by the edge's for the
        # same event, which names the server that delivered it: read once both had time.
        rows = list(itertools.takewhile(lambda r: r["ts"] < now - SETTLE_SECONDS, rows))
        groups = await asyncio.to_thread(self.memory.groups)
        posts, changed = plan_leak_posts(rows, groups, now, self.settings.leak_interval_seconds)
        if posts or changed or rows:
            last = str(rows[-1]["id"]) if rows else cursor
            await asyncio.to_thread(
                self.memory.record, posts, now, cursors={"findings": last}, groups=changed
            )

    async def room_name(self, room_id: str) -> tuple[str | None, bool]:
        """The room's name and whether it is a space, from the admin API (best effort)."""
        try:
            answer = await self.admin.api.request(
                Method.GET, SynapseAdminPath.v1.rooms[room_id].state
            )
        except (MatrixError, aiohttp.ClientError, TimeoutError) as e:
            logger.debug("no name for %s: %s", room_id, _say(e))
            return None, False
        name, is_space = None, False
        for event in answer.get("state", []) if isinstance(answer, dict) else []:
            if not isinstance(event, dict) or event.get("state_key") != "":
                continue
            content = event.get("content")
            if not isinstance(content, dict):
                continue
            if event.get("type") == "m.room.name" and isinstance(content.get("name"), str):
                name = content["name"][:200]
            elif event.get("type") == "m.room.create":
                is_space = content.get("type") == "m.space"
        return name, is_space

    async def flush(self) -> None:
        """Send what the outbox holds, oldest first; what fails stays for the next round."""
        for post in await asyncio.to_thread(self.memory.unsent):
            content = dict(post.content)
            if post.kind == "count":
                parent = await asyncio.to_thread(self.memory.group_message, post.item)
                if parent is None:
                    continue  # the group's own message is not sent yet
                content = notices.in_thread(content, parent)
            event_id = await self.send(content, post.txn_id)
            await asyncio.to_thread(self.memory.mark_sent, post.txn_id, str(event_id), self.clock())

    async def send(self, content: Mapping[str, Any], txn_id: str) -> str:
        event_id = await self.client.send_message_event(
            RoomID(self.room_id), EventType.ROOM_MESSAGE, cast(Any, dict(content)), txn_id=txn_id
        )
        return str(event_id)

    # -- alarms

    async def watch_alarms(self) -> None:
        if not self.settings.alarms or self.registry is None:
            return
        now = self.clock()
        window = self.settings.alarm_window_seconds
        if now - self._alarm_at < window:
            return
        counters = alarms.read_counters(self.registry)
        changes, active = alarms.evaluate(self._alarm_counters, counters, self._active_alarms)
        for change in changes:
            message = notices.alarm_message(
                alarms.TITLES[change.alarm],
                change.detail,
                alarms.WHAT_TO_DO[change.alarm],
                self.where,
                change.raised,
            )
            logger.warning("management room alarm: %s", message.lines[0])
            await self.send(message.content(), fresh_txn("alarm"))
        # Only once all is posted: a change that could not be posted (the homeserver
        # down) is evaluated, and posted, again in the next round.
        self._alarm_counters, self._alarm_at, self._active_alarms = counters, now, active


@dataclass(frozen=True, slots=True)
class LeakGroup:
    """A leak group's rate limit: its latest message, when it was posted, and the events
    counted since."""

    key: str
    room_id: str | None
    blamed: str | None
    rule: str
    first_txn: str
    last_posted: float
    unposted: int = 0
    total: int = 0

    def row(self) -> tuple[object, ...]:
        return (
            self.key,
            self.room_id,
            self.blamed,
            self.rule,
            self.first_txn,
            self.last_posted,
            self.unposted,
            self.total,
        )


def group_key(finding: Mapping[str, Any]) -> str:
    return "\x1f".join(
        (str(finding["room_id"] or ""), str(finding["attributed_to"] or ""), str(finding["rule"]))
    )


def plan_leak_posts(
    rows: Sequence[Mapping[str, Any]],
    groups: Mapping[str, LeakGroup],
    now: float,
    interval: float,
) -> tuple[list[Post], list[LeakGroup]]:
    """What to post for new leak findings, per (room, blamed server, rule): a message for
    a group not seen before (or quiet for a day), a count for the others; then, for every
    group with events counted and its last message `interval` old, a follow-up in its
    thread. Returns the posts and the groups changed."""
    found: dict[str, list[Mapping[str, Any]]] = {}
    for row in rows:
        found.setdefault(group_key(row), []).append(row)
    posts: list[Post] = []
    changed: dict[str, LeakGroup] = {}
    for key, findings in found.items():
        events = len({f["event_id"] for f in findings if f["event_id"]}) or len(findings)
        old = groups.get(key)
        if old is None or now - old.last_posted > LEAK_REOPEN_SECONDS:
            first = findings[0]
            txn = fresh_txn("leak")
            message = notices.leak_message(
                str(first["room_id"]),
                first["attributed_to"],
                str(first["rule"]),
                findings,
                interval,
            )
            posts.append(Post(txn, "leak", key, message.content()))
            changed[key] = LeakGroup(
                key,
                first["room_id"],
                first["attributed_to"],
                str(first["rule"]),
                txn,
                now,
                0,
                events + (old.total if old else 0),
            )
        else:
            changed[key] = replace(old, unposted=old.unposted + events, total=old.total + events)
    for key in {*groups, *changed}:
        group = changed.get(key) or groups[key]
        if group.unposted <= 0 or now - group.last_posted < interval:
            continue
        followup = notices.leak_followup(group.unposted, group.last_posted, group.total)
        # Sent in the thread of the group's message (`flush` finds it).
        posts.append(Post(fresh_txn("count"), "count", key, followup.content()))
        changed[key] = replace(group, last_posted=now, unposted=0)
    return posts, list(changed.values())


def _ts(event: Mapping[str, Any]) -> int:
    ts = event.get("origin_server_ts")
    return ts if isinstance(ts, int) else 0


def _say(error: BaseException) -> str:
    """An error in words, never a token."""
    if isinstance(error, MatrixError):
        return str(error) or type(error).__name__
    return f"{type(error).__name__}: {error}"


def _state_path(room_id: str) -> Any:
    from mautrix.api import Path

    return Path.v3.rooms[room_id].state


def _messages_path(room_id: str) -> Any:
    from mautrix.api import Path

    return Path.v3.rooms[room_id].messages


class ManagementRoom:
    """The addon: runs the bot while modgud runs, when `management:` is configured."""

    def __init__(self, holder: Any) -> None:
        self.holder = holder
        self.bot: ManagementBot | None = None
        self._task: asyncio.Task[None] | None = None

    def running(self) -> None:
        runtime = self.holder.runtime
        if runtime is None or runtime.config.management is None:
            return
        self.bot = ManagementBot(
            runtime.config,
            registry=runtime.metrics.registry,
            on_policy_change=runtime.policy.mark_stale,
        )
        self._task = asyncio.get_running_loop().create_task(self.bot.run())

    async def done(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self.bot is not None:
            await self.bot.close()
