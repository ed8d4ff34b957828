"""`modgud history`: has a room already leaked? An audit of the history the homeserver
stored, from before modgud was installed too.

The room's events are read oldest first through Synapse's admin API (`GET
/_synapse/admin/v1/rooms/{room}/messages?dir=f&raw`: every event the homeserver keeps for
the room, in topological order, in federation format — prev_events, depth and all) a
page at a time, and judged by rules/history.py against the state in force at each event.
Findings go into the findings database with the rules `history.*` (endpoint `history`,
action `flagged`: the homeserver accepted them long ago), where `modgud findings` and
`modgud leaks` show them.

Large rooms: memory stays bounded (the audit keeps the relevant state, the joined members
and a bounded set of refused events, never the history), and after every page the
findings and a cursor — the page's pagination token and the audit's state there — are
committed together, so an audit stopped at any point resumes where it was and records
nothing twice; a finished audit run again goes on with the events stored since.

`--redact` removes the leaked events (those written by servers refused at their point,
not the events built on them, which their own permitted authors wrote) by redacting them
as the room admin of `homeserver.room_admin_token_file`: a dry run unless confirmed.
"""

from __future__ import annotations

import json
import logging
import secrets
import time
from collections.abc import AsyncIterator, Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

import aiohttp

from proxy_addons.config import Config
from proxy_addons.database import open_db, reading, writing
from proxy_addons.operatorpolicy import MAX_SPACE_ROOMS, RULE_TYPES
from proxy_addons.store import FINDING_COLUMNS, insert_findings
from rules.findings import Finding
from rules.history import AuditedEvent, HistoryAudit, PolicyTimeline
from rules.policy import OperatorPolicy
from rules.roomstate import SPACE_STATE_TYPES, room_policy_from_state

__all__ = [
    "HistoryError",
    "HistoryRun",
    "PolicyHistory",
    "audit_room",
    "history_findings",
    "list_rooms",
    "read_policy_history",
    "redact_events",
]

logger = logging.getLogger(__name__)

PAGE_EVENTS = 500
ENDPOINT = "history"
# How `modgud history --json` names an event's place in the history.
POSITION = "position"


class HistoryError(Exception):
    """Why the history could not be read, in words for the operator."""


@dataclass
class HistoryRun:
    """What one run of the audit of one room did."""

    room_id: str
    judged: int = 0  # events judged in this run
    position: int = 0  # the last event's position in the history
    resumed_at: int = 0  # where this run began (0: the start)
    found: int = 0  # findings recorded in this run (the room's are in the database)
    seconds: float = 0.0
    total: int = 0  # events the walk back saw: the history's length, for progress

    def progress(self, width: int = 30) -> str:
        """A progress line for a terminal: a bar, events, findings, rate."""
        share = min(1.0, self.position / self.total) if self.total else 0.0
        done = round(share * width)
        rate = self.judged / self.seconds if self.seconds else 0.0
        return (
            f"[{'#' * done}{'.' * (width - done)}] {share:4.0%} "
            f"{self.position:,}/{self.total:,} events, {self.found} findings, {rate:,.0f}/s"
        )


async def _get(session: aiohttp.ClientSession, url: str, token: str | None) -> Any:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    try:
        async with session.get(url, headers=headers) as resp:
            if resp.status == 404:
                raise HistoryError(f"unknown room: the homeserver has no room at {url}")
            if resp.status in (401, 403):
                raise HistoryError(
                    f"the admin token was refused ({resp.status}): homeserver.access_token_file "
                    "must hold a server admin's token"
                )
            if resp.status != 200:
                raise HistoryError(f"{url} answered {resp.status}: {(await resp.text())[:200]}")
            return await resp.json(content_type=None)
    except aiohttp.ClientError as e:
        raise HistoryError(f"homeserver unreachable: {e}") from None
    except TimeoutError:
        raise HistoryError(f"homeserver did not answer in time: {url}") from None


async def read_history(
    session: aiohttp.ClientSession,
    config: Config,
    room_id: str,
    token: str | None,
    page_events: int = PAGE_EVENTS,
) -> AsyncIterator[tuple[list[dict[str, Any]], str | None]]:
    """Pages of the room's events, oldest first, from `token` (None: the start), each
    with the token after it."""
    base = (
        f"{config.admin_api}/_synapse/admin/v1/rooms/{quote(room_id, safe='')}/messages"
        f"?dir=f&limit={page_events}&raw=true"
    )
    # From the start as a topological token, not the default (a stream token, "s0"): the
    # first page from a stream token leaves out events with negative stream orderings —
    # those Synapse got by backfill, out of order — measured: 117 of 194 events of a
    # room the relay's transactions forked, against all 194 from "t0-0".
    token = token or "t0-0"
    while True:
        url = base + f"&from={quote(token, safe='')}"
        answer = await _get(session, url, config.admin_token)
        chunk = answer.get("chunk") if isinstance(answer, dict) else None
        if not isinstance(chunk, list):
            raise HistoryError(f"unexpected answer from {url}: no chunk")
        end = answer.get("end")
        events = [e for e in chunk if isinstance(e, dict)]
        if not events:
            return
        token = end if isinstance(end, str) else None
        yield events, token
        if token is None:
            return


async def walk_back(
    session: aiohttp.ClientSession, config: Config, room_id: str, page_events: int = PAGE_EVENTS
) -> int:
    """Page through the room from its newest event back to its first, as a client
    scrolling up does, and return how many events that saw. Synapse keeps out of the
    forward timeline the parts of a room it has not backfilled yet, and fills them when
    a backward read reaches them: measured, a forward read of a room whose transactions
    forked saw 116 of 209 events before this walk and all 209 after it."""
    base = (
        f"{config.admin_api}/_synapse/admin/v1/rooms/{quote(room_id, safe='')}/messages"
        f"?dir=b&limit={page_events}"
    )
    seen, token = 0, None
    while True:
        url = base + (f"&from={quote(token, safe='')}" if token else "")
        answer = await _get(session, url, config.admin_token)
        chunk = answer.get("chunk") if isinstance(answer, dict) else None
        end = answer.get("end") if isinstance(answer, dict) else None
        if not isinstance(chunk, list) or not chunk or not isinstance(end, str) or end == token:
            return seen
        seen += len(chunk)
        token = end


async def list_rooms(session: aiohttp.ClientSession, config: Config) -> list[str]:
    """Every room the homeserver knows (admin API), for `--all`."""
    rooms: list[str] = []
    start = 0
    while True:
        url = f"{config.admin_api}/_synapse/admin/v1/rooms?from={start}&limit=500"
        answer = await _get(session, url, config.admin_token)
        page = answer.get("rooms", []) if isinstance(answer, dict) else []
        rooms += [r["room_id"] for r in page if isinstance(r, dict) and "room_id" in r]
        following = answer.get("next_batch") if isinstance(answer, dict) else None
        if not page or following is None:
            return rooms
        start = int(following)


@dataclass(frozen=True, slots=True)
class PolicyHistory:
    """How the operator's policy changed, read once for any number of audited rooms: the
    policy lists' rule events and the configured spaces' state events (theirs and their
    subspaces'), from those rooms' own histories."""

    rule_events: list[dict[str, Any]]
    space_events: list[dict[str, Any]]
    spaces: tuple[str, ...]

    def timeline(self) -> PolicyTimeline:
        """A fresh timeline for one room's audit."""
        return PolicyTimeline(self.rule_events, self.space_events, self.spaces)


async def _state_history(
    session: aiohttp.ClientSession, config: Config, room_id: str, types: frozenset[str]
) -> list[dict[str, Any]]:
    """The room's state events of `types`, oldest first, from its whole history."""
    await walk_back(session, config, room_id)
    out: list[dict[str, Any]] = []
    async for page, _ in read_history(session, config, room_id, None):
        out.extend(e for e in page if "state_key" in e and e.get("type") in types)
    return out


async def _has_children(session: aiohttp.ClientSession, config: Config, room_id: str) -> bool:
    """The room is a space today (its current state links children): its history is read
    too. A room the homeserver does not know is not."""
    url = f"{config.admin_api}/_synapse/admin/v1/rooms/{quote(room_id, safe='')}/state"
    try:
        answer = await _get(session, url, config.admin_token)
    except HistoryError as e:
        logger.warning("space child %s unreadable, not followed: %s", room_id, e)
        return False
    state = answer.get("state") if isinstance(answer, dict) else None
    return (
        room_policy_from_state(room_id, state if isinstance(state, list) else []).space_children
        != ()
    )


async def read_policy_history(
    session: aiohttp.ClientSession, config: Config
) -> PolicyHistory | None:
    """The histories of the operator's policy lists (`policy.policy_lists`) and spaces
    (`policy.spaces`, and every room linked from them that is a space today: a room that
    was a subspace only in the past is not followed). None when neither is configured."""
    if not (config.policy_lists or config.spaces):
        return None
    rules: list[dict[str, Any]] = []
    for room_id in config.policy_lists:
        rules += await _state_history(session, config, room_id, RULE_TYPES)
    space_events: list[dict[str, Any]] = []
    seen: set[str] = set()
    frontier = list(config.spaces)
    while frontier and len(seen) < MAX_SPACE_ROOMS:
        space_id = frontier.pop(0)
        if space_id in seen:
            continue
        seen.add(space_id)
        events = await _state_history(session, config, space_id, SPACE_STATE_TYPES)
        space_events += events
        children = {str(e["state_key"]) for e in events if e.get("type") == "m.space.child"}
        for child in sorted(children - seen):
            if await _has_children(session, config, child):
                frontier.append(child)
    return PolicyHistory(rules, space_events, tuple(config.spaces))


# -- the cursor --------------------------------------------------------------------------------


def _load_cursor(database: str, room_id: str) -> tuple[str | None, dict[str, Any] | None]:
    with reading(database) as conn:
        row = conn.one("SELECT token, snapshot FROM history_cursors WHERE room_id = ?", (room_id,))
    if row is None or row[1] is None:
        return None, None
    return row[0], json.loads(row[1])


def _checkpoint(
    database: str,
    room_id: str,
    token: str | None,
    audit: HistoryAudit,
    findings: list[tuple[object, ...]],
    finished: bool,
) -> None:
    """The page's findings and the cursor after it, committed together."""
    with writing(database) as db:
        insert_findings(db, findings)
        db.execute(
            "INSERT INTO history_cursors (room_id, token, position, snapshot, updated, finished) "
            "VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (room_id) DO UPDATE SET "
            "token = excluded.token, position = excluded.position, "
            "snapshot = excluded.snapshot, updated = excluded.updated, "
            "finished = excluded.finished",
            (
                room_id,
                token,
                audit.position,
                json.dumps(audit.snapshot()),
                time.time(),
                int(finished),
            ),
        )


def forget_history(database: str, room_id: str) -> None:
    """Start the room's audit over: its cursor and the history findings it recorded go
    together (else a run from the start would record each of them a second time)."""
    with writing(database) as db:
        db.execute("DELETE FROM history_cursors WHERE room_id = ?", (room_id,))
        db.execute("DELETE FROM findings WHERE room_id = ? AND endpoint = ?", (room_id, ENDPOINT))


def _delivered_by(database: str, event_ids: list[str]) -> dict[str, str]:
    """The servers the event index saw deliver these events (modgud was in the path),
    in one query for the page."""
    if not event_ids:
        return {}
    marks = ", ".join("?" for _ in event_ids)
    sql = (
        "SELECT event_id, delivered_by FROM events "  # noqa: S608 - marks only
        f"WHERE event_id IN ({marks}) AND delivered_by IS NOT NULL ORDER BY first_seen DESC"
    )
    with reading(database) as conn:
        # Oldest last: the first delivery wins the dict.
        return {str(e): str(d) for e, d in conn.tuples(sql, event_ids)}


def _row(finding: Finding, event: Mapping[str, Any], now: float) -> tuple[object, ...]:
    origin = event.get("origin")
    values = {
        "ts": now,
        "rule": finding.rule.value,
        "action": "flagged",
        "severity": finding.severity.value,
        "direction": "inbound",
        "room_id": finding.room_id,
        "event_id": finding.event_id,
        "event_type": finding.event_type,
        "sender": finding.sender,
        "sender_server": finding.sender_server,
        "origin": origin if isinstance(origin, str) else None,
        "attributed_to": finding.attributed_to,
        "confidence": finding.confidence.value,
        "endpoint": ENDPOINT,
        "txn_id": None,
        "detail": finding.detail,
    }
    return tuple(values[c] for c in FINDING_COLUMNS)


def as_json(position: int, finding: Finding, event: Mapping[str, Any], now: float) -> str:
    """A `--json` line: the fields of `modgud findings`, and the event's position."""
    row = dict(zip(FINDING_COLUMNS, _row(finding, event, now), strict=True))
    row[POSITION] = position
    return json.dumps(row, ensure_ascii=False)


# -- the audit ---------------------------------------------------------------------------------


async def audit_room(
    config: Config,
    room_id: str,
    policy: OperatorPolicy,
    *,
    since: float | None = None,
    restart: bool = False,
    on_event: Callable[[AuditedEvent, Mapping[str, Any]], None] | None = None,
    on_page: Callable[[HistoryRun], None] | None = None,
    stop_after: int | None = None,
    page_events: int = PAGE_EVENTS,
    policy_history: PolicyHistory | None = None,
) -> HistoryRun:
    """Audit one room's history from its cursor (or the start), recording findings.
    `since` (a Unix time): events older are followed (the state moves on) but not
    reported. `stop_after`: stop after that many pages (tests: a run cut short).
    `policy_history`: how the policy lists and spaces changed (`read_policy_history`),
    when the caller audits several rooms; read here otherwise."""
    open_db(config.database).migrate()  # a first audit may make the database
    if restart:
        forget_history(config.database, room_id)
    token, snapshot = _load_cursor(config.database, room_id)
    started = time.monotonic()
    timeout = aiohttp.ClientTimeout(total=max(30.0, config.state_timeout_seconds * 6))
    pages = 0
    async with aiohttp.ClientSession(timeout=timeout) as session:
        total = await walk_back(session, config, room_id, page_events)
        if policy_history is None:
            policy_history = await read_policy_history(session, config)
        timeline = policy_history.timeline() if policy_history is not None else None
        audit = (
            HistoryAudit.restore(snapshot, room_id, config.server_name, policy, timeline=timeline)
            if snapshot is not None
            else HistoryAudit(room_id, config.server_name, policy, timeline=timeline)
        )
        run = HistoryRun(room_id, position=audit.position, resumed_at=audit.position, total=total)
        pages_read = read_history(session, config, room_id, token, page_events)
        async for events, next_token in pages_read:
            ids = [e["event_id"] for e in events if isinstance(e.get("event_id"), str)]
            delivered = _delivered_by(config.database, ids)
            now = time.time()
            rows: list[tuple[object, ...]] = []
            for event in events:
                event_id = event.get("event_id")
                audited = audit.judge(
                    event, delivered.get(event_id) if isinstance(event_id, str) else None
                )
                ts = event.get("origin_server_ts")
                reported = since is None or (isinstance(ts, int) and ts / 1000 >= since)
                if reported and audited.findings:
                    for finding in audited.findings:
                        rows.append(_row(finding, event, now))
                        run.found += 1
                    if on_event is not None:
                        on_event(audited, event)
                run.judged += 1
            run.position = audit.position
            _checkpoint(config.database, room_id, next_token or token, audit, rows, False)
            if next_token is not None:
                token = next_token
            pages += 1
            run.seconds = time.monotonic() - started
            if on_page is not None:
                on_page(run)
            if stop_after is not None and pages >= stop_after:
                return run
    _checkpoint(config.database, room_id, token, audit, [], True)
    run.seconds = time.monotonic() - started
    return run


def history_policy(config: Config) -> OperatorPolicy:
    """The operator's settings the audit applies (the policy lists' bans and the spaces'
    state come from their own histories, event by event: see PolicyTimeline)."""
    return OperatorPolicy(
        local_server=config.server_name, participation_rooms=frozenset(config.participation_rooms)
    )


def history_findings(database: str, room_id: str) -> list[dict[str, Any]]:
    """The room's history findings recorded so far (this run's and earlier runs')."""
    columns = ", ".join(FINDING_COLUMNS)
    with reading(database) as conn:
        return conn.dicts(
            f"SELECT {columns} FROM findings WHERE room_id = ? AND endpoint = ? "  # noqa: S608
            "ORDER BY id",
            (room_id, ENDPOINT),
        )


# -- redacting ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Redaction:
    event_id: str
    sender: str | None
    done: bool
    problem: str | None = None


async def redact_events(
    config: Config, room_id: str, event_ids: Iterable[str], reason: str
) -> list[Redaction]:
    """Redact the events as the room admin (Client-Server API), one by one; an event the
    room admin may not redact is reported, the others still redacted."""
    if not config.room_admin_token:
        raise HistoryError(
            "homeserver.room_admin_token_file is not set: a room admin's token is needed to redact"
        )
    out: list[Redaction] = []
    headers = {"Authorization": f"Bearer {config.room_admin_token}"}
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as session:
        for event_id in event_ids:
            url = (
                f"{config.client_api}/_matrix/client/v3/rooms/{quote(room_id, safe='')}"
                f"/redact/{quote(event_id, safe='')}/modgud-history-{secrets.token_hex(8)}"
            )
            try:
                async with session.put(url, json={"reason": reason}, headers=headers) as resp:
                    if resp.status == 200:
                        out.append(Redaction(event_id, None, True))
                    else:
                        text = (await resp.text())[:200]
                        out.append(Redaction(event_id, None, False, f"{resp.status} {text}"))
            except (aiohttp.ClientError, TimeoutError) as e:
                raise HistoryError(f"homeserver unreachable: {e}") from None
    return out
