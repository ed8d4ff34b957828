"""What the management room says, and what it understands: messages (a plain and an HTML
body each) and `!modgud` commands, as pure functions of plain data (the bot in
proxy_addons/management.py does the I/O)."""

from __future__ import annotations

import datetime as dt
import html
import shlex
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from rules.servername import parse_server_name

__all__ = [
    "APPROVE_KEYS",
    "COMMAND_PREFIX",
    "Command",
    "CommandError",
    "DENY_KEYS",
    "Message",
    "alarm_message",
    "findings_message",
    "history_message",
    "in_thread",
    "knocks_message",
    "leaks_message",
    "knock_message",
    "leak_followup",
    "leak_message",
    "parse_command",
    "reaction_decision",
]

COMMAND_PREFIX = "!modgud"
# Deliberate marks only: a thumbs-up is agreement, not a decision.
APPROVE_KEYS = frozenset({"✅", "✔"})
DENY_KEYS = frozenset({"❌", "✖"})
# Emoji keys arrive with and without the variation selector (U+FE0F) and skin tones.
_IGNORED_IN_KEYS = "\ufe0f\ufe0e\U0001f3fb\U0001f3fc\U0001f3fd\U0001f3fe\U0001f3ff"


@dataclass(frozen=True, slots=True)
class Message:
    """An m.notice with both bodies; `lines` are plain text, `html_lines` their HTML."""

    lines: tuple[str, ...]
    html_lines: tuple[str, ...]

    @property
    def plain(self) -> str:
        return "\n".join(self.lines)

    @property
    def html(self) -> str:
        return "<br>\n".join(self.html_lines)

    def content(self, thread_of: str | None = None) -> dict[str, Any]:
        """The event content; in the thread of `thread_of` when given (a reply for clients
        without threads: is_falling_back). Cut to fit well within an event's 64 KiB."""
        content: dict[str, Any] = {
            "msgtype": "m.notice",
            "body": _cut(self.plain),
            "format": "org.matrix.custom.html",
            "formatted_body": _cut(self.html),
        }
        return in_thread(content, thread_of) if thread_of else content


def in_thread(content: Mapping[str, Any], thread_of: str) -> dict[str, Any]:
    """The content as a message in the thread of `thread_of` (a reply, for clients
    without threads: is_falling_back)."""
    return {
        **content,
        "m.relates_to": {
            "rel_type": "m.thread",
            "event_id": thread_of,
            "is_falling_back": True,
            "m.in_reply_to": {"event_id": thread_of},
        },
    }


MAX_BODY_CHARS = 7_000  # two bodies of up to 4 bytes (UTF-8) a character: under 64 KiB


def _cut(text: str) -> str:
    if len(text) <= MAX_BODY_CHARS:
        return text
    return text[: MAX_BODY_CHARS - 40] + "\n… (cut; the CLI shows everything)"


class _Builder:
    def __init__(self) -> None:
        self.lines: list[str] = []
        self.html: list[str] = []

    def add(self, plain: str, markup: str | None = None) -> None:
        self.lines.append(plain)
        self.html.append(markup if markup is not None else html.escape(plain))

    def message(self) -> Message:
        return Message(tuple(self.lines), tuple(self.html))


def _e(text: object) -> str:
    return html.escape(str(text))


def _code(text: object) -> str:
    return f"<code>{_e(text)}</code>"


def _time(ts: float) -> str:
    return dt.datetime.fromtimestamp(ts, dt.UTC).strftime("%Y-%m-%d %H:%M UTC")


def text_message(text: str, *, code: bool = False) -> Message:
    """Plain text as a message; `code` keeps columns aligned in HTML."""
    lines = tuple(text.split("\n"))
    if code:
        return Message(lines, (f"<pre><code>{_e(text)}</code></pre>",))
    return Message(lines, tuple(_e(line) for line in lines))


def knock_message(knock: Mapping[str, Any], room_name: str | None, is_space: bool) -> Message:
    """A new knock: who, where, since when, what modgud knows of the server, and how to
    answer it. `knock` is a row of store.query_knocks."""
    server, room = str(knock["server"]), str(knock["room_id"])
    where = "space" if is_space else "room"
    named = f" ({room_name})" if room_name else ""
    b = _Builder()
    b.add(
        f"Knock: {server} asks to take part in the {where} {room}{named}",
        f"<b>Knock</b>: {_code(server)} asks to take part in the {where} {_code(room)}{_e(named)}",
    )
    b.add(f"First seen {_time(knock['first_seen'])}, {knock['count']} knock(s)")
    known = []
    if knock.get("findings"):
        known.append(f"{knock['findings']} earlier finding(s) blame it ({knock['finding_rules']})")
    if knock.get("policy_match"):
        known.append(f"policy list: {knock['policy_match']}")
    b.add("modgud knows: " + ("; ".join(known) or "nothing against it"))
    approve = f"{COMMAND_PREFIX} approve {server} {room}"
    deny = f"{COMMAND_PREFIX} deny {server} {room}"
    b.add(f"Approve: react ✅ or send {approve}", f"Approve: react ✅ or send {_code(approve)}")
    b.add(f"Deny: react ❌ or send {deny}", f"Deny: react ❌ or send {_code(deny)}")
    return b.message()


def leak_message(
    room_id: str,
    blamed: str | None,
    rule: str,
    findings: Sequence[Mapping[str, Any]],
    interval_seconds: float,
) -> Message:
    """The first message of a leak group (room, blamed server, rule): the events so far,
    their authors, confidence and evidence."""
    events = _distinct(f.get("event_id") for f in findings)
    authors = _distinct(f.get("sender_server") for f in findings)
    confidence = _strongest(f.get("confidence") for f in findings)
    b = _Builder()
    who = blamed or "no server (unattributed)"
    b.add(
        f"Leak in {room_id}: blamed {who}, rule {rule}",
        f"<b>Leak</b> in {_code(room_id)}: blamed {_code(who)}, rule {_code(rule)}",
    )
    b.add(f"{len(events)} event(s) by {', '.join(authors) or '-'}; confidence {confidence or '-'}")
    detail = next((str(f["detail"]) for f in findings if f.get("detail")), "")
    if detail:
        b.add(f"Evidence: {detail}")
    for event_id in events[:5]:
        b.add(f"  {event_id}", f"&nbsp;&nbsp;{_code(event_id)}")
    if len(events) > 5:
        b.add(f"  … and {len(events) - 5} more")
    minutes = max(1, round(interval_seconds / 60))
    b.add(
        f"More events of this leak are counted and posted in this thread at most every "
        f"{minutes} min. Details: modgud leaks --room {room_id}"
    )
    return b.message()


def leak_followup(count: int, since: float, total: int) -> Message:
    b = _Builder()
    b.add(f"{count} more event(s) of this leak since {_time(since)} ({total} in all)")
    return b.message()


def knocks_message(rows: Sequence[Mapping[str, Any]]) -> Message:
    """The `knocks` command: the pending queue."""
    if not rows:
        return text_message("No knocks are waiting.")
    b = _Builder()
    b.add(f"{len(rows)} knock(s) waiting:")
    for r in rows[:30]:
        known = f"{r['findings']} finding(s)" if r.get("findings") else "nothing against it"
        if r.get("policy_match"):
            known += f"; {r['policy_match']}"
        line = f"{r['server']} in {r['room_id']}: {r['count']} knock(s) since {_time(r['first_seen'])}; {known}"
        b.add(f"  {line}", f"&nbsp;&nbsp;{_e(line)}")
    if len(rows) > 30:
        b.add(f"  … and {len(rows) - 30} more (modgud knocks)")
    b.add(
        f"Answer with {COMMAND_PREFIX} approve|deny SERVER ROOM, or react on the knock's message."
    )
    return b.message()


def leaks_message(groups: Sequence[Mapping[str, Any]]) -> Message:
    """The `leaks` command: per room and blamed server (rows of leaks.query_leaks)."""
    if not groups:
        return text_message("No leaks recorded.")
    b = _Builder()
    for g in groups[:20]:
        line = (
            f"{g['room_id']}: blamed {g['blamed']}: {len(g['events'])} event(s) by "
            f"{', '.join(g['authors']) or '-'}; evidence {g['evidence']} "
            f"({', '.join(g['rules'])}); confidence {g['confidence']}; last {_time(g['last_seen'])}"
        )
        b.add(line)
    if len(groups) > 20:
        b.add(f"… and {len(groups) - 20} more (modgud leaks)")
    return b.message()


def findings_message(rows: Sequence[Mapping[str, Any]]) -> Message:
    """The `findings` command: the newest findings, one line each."""
    if not rows:
        return text_message("No findings match.")
    b = _Builder()
    for r in rows:
        line = (
            f"{_time(r['ts'])} {r['action']} {r['rule']} blamed {r['attributed_to'] or '-'} "
            f"{r['room_id'] or '-'} {r['event_id'] or '-'}: {r['detail']}"
        )
        b.add(line)
    return b.message()


def history_message(
    room_id: str, judged: int, position: int, recorded: Sequence[Mapping[str, Any]]
) -> Message:
    """The `history` command: what the audit of a room's stored history found."""
    b = _Builder()
    b.add(
        f"History of {room_id}: {judged} event(s) judged now, {position} in its history; "
        f"{len(recorded)} history finding(s)" + (":" if recorded else ": it has not leaked.")
    )
    for r in recorded[:10]:
        line = (
            f"{r['rule']} {r['event_id']} by {r['sender'] or '-'}, blamed "
            f"{r['attributed_to'] or '-'} ({r['confidence']})"
        )
        b.add(f"  {line}", f"&nbsp;&nbsp;{_e(line)}")
    if len(recorded) > 10:
        b.add(f"  … and {len(recorded) - 10} more")
    if recorded:
        b.add(f"All of them: modgud history {room_id} --json; to redact: --redact")
    return b.message()


def alarm_message(title: str, detail: str, what_to_do: str, where: str, raised: bool) -> Message:
    b = _Builder()
    if raised:
        b.add(
            f"⚠ Alarm on {where}: {title} — {detail}",
            f"⚠ <b>Alarm</b> on {_e(where)}: {_e(title)} — {_e(detail)}",
        )
        b.add(what_to_do[:1].upper() + what_to_do[1:] + ".")
    else:
        b.add(
            f"✔ Cleared on {where}: {title}",
            f"✔ <b>Cleared</b> on {_e(where)}: {_e(title)}",
        )
    return b.message()


def _distinct(values: Any) -> list[str]:
    out: list[str] = []
    for v in values:
        if isinstance(v, str) and v and v not in out:
            out.append(v)
    return out


_CONFIDENCE_ORDER = ("low", "medium", "high")


def _strongest(values: Any) -> str | None:
    seen = [v for v in values if v in _CONFIDENCE_ORDER]
    return max(seen, key=_CONFIDENCE_ORDER.index) if seen else None


def reaction_decision(key: object) -> bool | None:
    """True for an approving reaction (✅), False for a denying one (❌), None otherwise."""
    if not isinstance(key, str):
        return None
    bare = "".join(ch for ch in key if ch not in _IGNORED_IN_KEYS)
    if bare in APPROVE_KEYS:
        return True
    if bare in DENY_KEYS:
        return False
    return None


# -- commands ----------------------------------------------------------------------------------


class CommandError(ValueError):
    """A command that cannot be run as given; the text says what is wrong and how to say it."""


@dataclass(frozen=True, slots=True)
class Command:
    verb: str
    room: str | None = None
    server: str | None = None
    reason: str | None = None
    options: Mapping[str, str] = field(default_factory=dict)
    words: tuple[str, ...] = ()  # the space command's kind and action


USAGE = {
    "help": "help",
    "knocks": "knocks",
    "approve": "approve SERVER ROOM|SPACE [reason]",
    "deny": "deny SERVER ROOM|SPACE [reason]",
    "leaks": "leaks [ROOM]",
    "findings": "findings [room=ROOM] [rule=RULE] [since=1h] [limit=N]",
    "ban": "ban SERVER [reason]",
    "unban": "unban SERVER",
    "history": "history ROOM",
    "space": "space powerlevels|bans|policy sync|drift SPACE [allow-fail=ROOM ...]",
}
FINDING_OPTIONS = ("room", "rule", "since", "limit")
SPACE_KINDS = ("powerlevels", "bans", "policy")


def help_message() -> Message:
    b = _Builder()
    b.add("modgud commands (answered in a thread; moderators only):")
    for usage in USAGE.values():
        line = f"{COMMAND_PREFIX} {usage}"
        b.add(f"  {line}", f"&nbsp;&nbsp;{_code(line)}")
    b.add("A ✅ or ❌ reaction on a knock message approves or denies that knock.")
    return b.message()


def is_command(body: object) -> bool:
    if not isinstance(body, str):
        return False
    first = body.strip().split(maxsplit=1)
    return bool(first) and first[0].lower() == COMMAND_PREFIX


def parse_command(body: str) -> Command:
    """`!modgud VERB ARGS…` → Command; CommandError says what is wrong."""
    try:
        words = shlex.split(body.strip())
    except ValueError as e:
        raise CommandError(f"cannot read the command: {e}") from None
    if not words or words[0].lower() != COMMAND_PREFIX:
        raise CommandError(f"commands start with {COMMAND_PREFIX}")
    if len(words) == 1:
        return Command("help")
    verb, args = words[1].lower(), words[2:]
    if verb not in USAGE:
        raise CommandError(f"unknown command {verb!r}; try {COMMAND_PREFIX} help")

    def usage(problem: str) -> CommandError:
        return CommandError(f"{problem}; usage: {COMMAND_PREFIX} {USAGE[verb]}")

    if verb in ("help", "knocks"):
        if args:
            raise usage("takes no arguments")
        return Command(verb)
    if verb in ("approve", "deny"):
        if len(args) < 2:
            raise usage("a server and a room are needed")
        # Either order: the room is the one that starts with "!".
        first, second = args[0], args[1]
        room, server = (first, second) if first.startswith("!") else (second, first)
        _check_room(room, usage)
        _check_server(server, usage)
        return Command(verb, room=room, server=server, reason=" ".join(args[2:]) or None)
    if verb == "leaks":
        if len(args) > 1:
            raise usage("at most one room")
        if args:
            _check_room(args[0], usage)
        return Command(verb, room=args[0] if args else None)
    if verb == "findings":
        options: dict[str, str] = {}
        for arg in args:
            key, sep, value = arg.partition("=")
            if not sep or key not in FINDING_OPTIONS or not value:
                raise usage(f"{arg!r} is not one of {', '.join(o + '=…' for o in FINDING_OPTIONS)}")
            options[key] = value
        if "room" in options:
            _check_room(options["room"], usage)
        if "limit" in options and not (options["limit"].isdigit() and int(options["limit"]) > 0):
            raise usage("limit must be a positive number")
        return Command(verb, room=options.get("room"), options=options)
    if verb in ("ban", "unban"):
        if not args:
            raise usage("a server (or server glob) is needed")
        entity = args[0]
        if not entity or any(c.isspace() for c in entity) or entity.startswith(("!", "@", "#")):
            raise usage(f"{entity!r} is not a server name or glob")
        if verb == "unban" and len(args) > 1:
            raise usage("takes only the server")
        return Command(verb, server=entity, reason=" ".join(args[1:]) or None)
    if verb == "history":
        if len(args) != 1:
            raise usage("one room is needed")
        _check_room(args[0], usage)
        return Command(verb, room=args[0])
    # space KIND ACTION SPACE [allow-fail=ROOM ...]
    if len(args) < 3:
        raise usage("a kind, an action and a space are needed")
    kind, action, space = args[0].lower(), args[1].lower(), args[2]
    if kind not in SPACE_KINDS:
        raise usage(f"the kind is one of {', '.join(SPACE_KINDS)}, not {kind!r}")
    if action not in ("sync", "drift"):
        raise usage(f"the action is sync or drift, not {action!r}")
    _check_room(space, usage)
    allowed = []
    for arg in args[3:]:
        key, sep, value = arg.partition("=")
        if key != "allow-fail" or not sep:
            raise usage(f"{arg!r}: only allow-fail=ROOM may follow the space")
        _check_room(value, usage)
        allowed.append(value)
    if allowed and action != "sync":
        raise usage("allow-fail is for sync")
    return Command(
        verb,
        room=space,
        options={"allow_fail": " ".join(allowed)},
        words=(kind, action),
    )


def _check_room(room: str, usage: Any) -> None:
    # Room v12 (MSC4291) IDs have no server part: "!" and an event hash.
    if not room.startswith("!") or len(room) < 2:
        raise usage(f"{room!r} is not a room ID (!…)")


def _check_server(server: str, usage: Any) -> None:
    if parse_server_name(server) is None:
        raise usage(f"{server!r} is not a server name")
