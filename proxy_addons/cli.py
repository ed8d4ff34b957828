"""The `modgud` command: run, findings, check-config."""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import os
import re
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from proxy_addons.config import Config, ConfigError, Listen, exposure_warnings, load_config
from proxy_addons.database import DatabaseError, is_postgres, open_db
from proxy_addons.leaks import query_leaks
from proxy_addons.participation import ParticipationError
from proxy_addons.replay import ReplayError, replay_capture
from proxy_addons.spaces import KINDS, format_drift, format_sync, plan_space, sync_space
from proxy_addons.store import (
    FINDING_COLUMNS,
    copy_records,
    query_findings,
    query_knocks,
)
from proxy_addons.synapseconfig import homeserver_modules, module_snippet
from rules.policy import CHECKS

__all__ = ["main"]


def proxy_settings(config: Config, certs_file: str | None) -> list[str]:
    """The mitmproxy option settings (`KEY=VALUE`) that run modgud for `config`."""
    host = config.inbound.host
    listen = f"[{host}]" if ":" in host else host
    settings = [
        f"mode=reverse:{config.upstream}@{listen}:{config.inbound.port}",
        f"modgud_config={config.path}",
        # Lazy: the homeserver is connected to when a request is to be forwarded, not when
        # a client connects. A request modgud answers itself never opens a connection, and
        # with the homeserver down the sender gets a 502 it retries, not a torn-down TLS.
        "connection_strategy=lazy",
    ]
    if certs_file:
        settings.append(f"certs=*={certs_file}")
    if config.outbound is not None:
        settings += _outbound_settings(config, config.outbound)
    return settings


def _outbound_settings(config: Config, listen: Listen) -> list[str]:
    """The homeserver's https_proxy: it sends CONNECT, then TLS that modgud terminates with
    a certificate from its own CA (the homeserver trusts it via federation_custom_ca_list).
    Connections are lazy (set for every mode): a request is seen before any connection to
    the remote server is opened, so a refused one never reaches it."""
    host = f"[{listen.host}]" if ":" in listen.host else listen.host
    settings = [f"mode=regular@{host}:{listen.port}", f"confdir={config.outbound_ca_dir}"]
    if not config.outbound_verify_tls:
        settings.append("ssl_insecure=true")
    elif config.outbound_ca_file:
        settings.append(f"ssl_verify_upstream_trusted_ca={config.outbound_ca_file}")
    return settings


def _combined_certs(config: Config) -> str | None:
    """mitmproxy wants key and chain in one PEM: write it where only we can read it."""
    if not config.tls_certificate or not config.tls_key:
        return None
    fd, path = tempfile.mkstemp(prefix="modgud-tls-", suffix=".pem")
    with os.fdopen(fd, "w") as out:
        out.write(Path(config.tls_key).read_text())
        out.write("\n")
        out.write(Path(config.tls_certificate).read_text())
    return path


def cmd_run(args: argparse.Namespace) -> int:
    config = load_config(args.config)
    from proxy_addons.addonset import modgud_addons
    from proxy_addons.master import MasterError, parse_extra_args, run_master

    certs = _combined_certs(config)
    try:
        extra, quiet = parse_extra_args(args.mitmproxy_args)
        run_master(modgud_addons, proxy_settings(config, certs) + extra, quiet)
    except MasterError as e:
        print(f"modgud run: {e}", file=sys.stderr)
        return 2
    finally:
        if certs:
            os.unlink(certs)
    return 0


def parse_since(text: str, now: float | None = None) -> float:
    """`30m`, `2h`, `7d`, a Unix time, or an ISO 8601 time (UTC if no zone)."""
    now = time.time() if now is None else now
    m = re.fullmatch(r"(\d+(?:\.\d+)?)([smhd])", text.strip())
    if m:
        return now - float(m.group(1)) * {"s": 1, "m": 60, "h": 3600, "d": 86400}[m.group(2)]
    try:
        return float(text)
    except ValueError:
        pass
    try:
        when = dt.datetime.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"--since: expected 30m, 2h, 7d, a Unix time or an ISO time, got {text!r}"
        ) from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=dt.UTC)
    return when.timestamp()


def _format_ts(ts: float) -> str:
    return dt.datetime.fromtimestamp(ts, dt.UTC).strftime("%Y-%m-%d %H:%M:%S")


def cmd_findings(args: argparse.Namespace) -> int:
    rows = _query(
        "findings",
        args,
        lambda paths: list(
            query_findings(
                paths, room=args.room, rule=args.rule, since=args.since, limit=args.limit
            )
        ),
    )
    if rows is None:
        return 2
    if args.json or not rows:
        return 0
    header = ("time (UTC)", "action", "rule", "blamed", "room", "event", "detail")
    table = [header] + [
        (
            _format_ts(r["ts"]),
            r["action"],
            r["rule"],
            r["attributed_to"] or "-",
            r["room_id"] or "-",
            r["event_id"] or "-",
            r["detail"],
        )
        for r in rows
    ]
    _print_table(table)
    return 0


def _print_table(table: Sequence[Sequence[object]]) -> None:
    """Columns padded to their widest cell; the last column (free text) is not padded."""
    widths = [max(len(str(line[i])) for line in table) for i in range(len(table[0]) - 1)]
    for line in table:
        cells = [str(c).ljust(w) for c, w in zip(line[:-1], widths, strict=True)]
        print("  ".join(cells + [str(line[-1])]))


def cmd_check_config(args: argparse.Namespace) -> int:
    config = load_config(args.config)
    print(f"{config.path}: OK")
    print(f"  server_name  {config.server_name}")
    print(f"  mode         {config.mode.value} (on_error: {config.on_error})")
    print(f"  inbound      {config.inbound} -> {config.upstream}")
    print(f"  event hook   {config.hook or 'off'}")
    homeserver = (
        homeserver_modules(args.homeserver_config, config) if args.homeserver_config else None
    )
    if homeserver is not None:
        print(f"  in Synapse   {homeserver.describe()}")
    print(f"  metrics      {config.metrics or 'off'}")
    if config.outbound is not None:
        remote = "not verified" if not config.outbound_verify_tls else "verified"
        print(
            f"  outbound     {config.outbound} (https_proxy; CA in {config.outbound_ca_dir};"
            f" remote certificates {remote};"
            f" re-signing {'on' if config.outbound_signing_key else 'off'})"
        )
    else:
        print("  outbound     off")
    print(
        f"  state from   {config.admin_api} (admin token {'set' if config.admin_token else 'MISSING'})"
    )
    try:
        print(f"  database     {open_db(config.database).check()}")
    except DatabaseError as e:
        print(f"{config.path}: database: {e}", file=sys.stderr)
        return 1
    management = config.management
    if management is not None:
        print(
            f"  management   {management.room_id} (commands from power level"
            f" {management.moderator_level}; a leak group every"
            f" {management.leak_interval_seconds:g} s; bans into {management.policy_list or '-'};"
            f" alarms {'on' if management.alarms else 'off'})"
        )
    else:
        print("  management   off")
    print(f"  key servers  {', '.join(k.server_name for k in config.trusted_key_servers) or '-'}")
    print(f"  policy lists {', '.join(config.policy_lists) or '-'}")
    print(f"  spaces       {', '.join(config.spaces) or '-'}")
    print(f"  participation rooms {', '.join(config.participation_rooms) or '-'}")
    actions = config.check_actions
    for check in CHECKS:
        setting = actions.setting(check, None, ())
        scoped = sum(check in c for c in (*actions.spaces.values(), *actions.rooms.values()))
        print(
            f"  check {check:<18} {setting.action}"
            + (f" (severity {setting.severity})" if setting.severity else "")
            + (f"; {scoped} room/space override(s)" if scoped else "")
        )
    if not config.room_admin_token:
        print(
            "  note: without homeserver.room_admin_token_file, approve/deny/spaces sync (and the"
            " management room's) cannot write"
        )
    if not config.admin_token:
        print("  warning: without homeserver.access_token_file modgud cannot read room state")
    for warning in exposure_warnings(config):
        print(f"  warning: {warning}")
    for warning in homeserver.warnings(config) if homeserver is not None else ():
        print(f"  warning: {warning}")
    return 0


def cmd_synapse_config(args: argparse.Namespace) -> int:
    # Loaded as the module will load it (no secrets): what the module cannot load is an
    # error here, before Synapse refuses to start.
    config = load_config(args.config, secrets=False)
    sys.stdout.write(module_snippet(config, mode=args.mode))
    return 0


def cmd_ca(args: argparse.Namespace) -> int:
    """Create modgud's CA for the outbound listener if need be; print its certificate's
    path, for the homeserver's federation_custom_ca_list."""
    config = load_config(args.config)
    if config.outbound is None:
        print(f"modgud ca: {config.path}: listen.outbound is not set", file=sys.stderr)
        return 2
    from proxy_addons.outbound import ensure_ca

    try:
        print(ensure_ca(config.outbound_ca_dir))
    except OSError as e:
        print(f"modgud ca: {config.outbound_ca_dir}: {e.strerror or e}", file=sys.stderr)
        return 2
    return 0


def _paths(args: argparse.Namespace) -> list[str]:
    """The databases to read: --db (repeatable), else the config's, else ./modgud.db."""
    if args.db:
        return list(args.db)
    if getattr(args, "config", None):
        return [load_config(args.config).database]
    return ["modgud.db"]


def _query(
    command: str,
    args: argparse.Namespace,
    query: Callable[[list[str]], list[dict[str, Any]]],
) -> list[dict[str, Any]] | None:
    """Run a read command's query; print JSON lines with --json, or say there is nothing.
    None (after saying why) when a database is missing or unreadable: a typo must not
    read as "nothing found"."""
    paths = _paths(args)
    for path in paths:
        if not is_postgres(path) and not Path(path).is_file():
            print(f"modgud {command}: no database at {path}", file=sys.stderr)
            return None
    try:
        rows = query(paths)
    except ValueError as e:
        print(f"modgud {command}: {e}", file=sys.stderr)
        return None
    if args.json:
        for row in rows:
            print(json.dumps(row, ensure_ascii=False))
    elif not rows:
        print(f"no {command}")
    return rows


def cmd_knocks(args: argparse.Namespace) -> int:
    rows = _query(
        "knocks",
        args,
        lambda paths: [
            r for p in paths for r in query_knocks(p, room=args.room, status=args.status)
        ],
    )
    if rows is None:
        return 2
    if args.json or not rows:
        return 0
    header = ("room", "server", "status", "count", "first seen", "last seen", "modgud knows")
    table: list[Sequence[object]] = [header]
    for r in rows:
        known = []
        if r["findings"]:
            known.append(f"{r['findings']} findings ({r['finding_rules']})")
        if r["policy_match"]:
            known.append(r["policy_match"])
        table.append(
            (
                r["room_id"],
                r["server"],
                r["status"],
                str(r["count"]),
                _format_ts(r["first_seen"]),
                _format_ts(r["last_seen"]),
                "; ".join(known) or "nothing against it",
            )
        )
    _print_table(table)
    return 0


def _decide(args: argparse.Namespace, approve: bool) -> int:
    from proxy_addons.management import decide

    config = load_config(args.config)
    try:
        event_id = decide(config, args.room, args.server, approve, args.reason)
    except ParticipationError as e:
        print(f"modgud {args.command}: {e}", file=sys.stderr)
        return 2 if not config.room_admin_token else 1
    status, participation = ("approved", "permitted") if approve else ("denied", "deny")
    print(
        f"{status} {args.server} in {args.room}: m.server.participation {participation} "
        f"({event_id}); modgud applies it once the homeserver has it"
    )
    return 0


def cmd_approve(args: argparse.Namespace) -> int:
    return _decide(args, approve=True)


def cmd_deny(args: argparse.Namespace) -> int:
    return _decide(args, approve=False)


def cmd_spaces(args: argparse.Namespace) -> int:
    config = load_config(args.config)
    kinds = args.only or KINDS
    if args.action == "drift":
        plan = asyncio.run(plan_space(config, args.space, None, kinds))
        print("\n".join(format_drift(plan)), file=sys.stderr if plan.error else sys.stdout)
        return 1 if plan.error or plan.drifting else 0
    if not config.room_admin_token:
        print(
            f"modgud spaces sync: {config.path}: homeserver.room_admin_token_file is not set",
            file=sys.stderr,
        )
        return 2
    result = asyncio.run(
        sync_space(config, args.space, kinds=kinds, allow_fail=args.allow_fail or ())
    )
    print("\n".join(format_sync(result)), file=sys.stdout if result.ok else sys.stderr)
    return 0 if result.ok else 1


def cmd_leaks(args: argparse.Namespace) -> int:
    groups = _query(
        "leaks", args, lambda paths: query_leaks(paths, room=args.room, since=args.since)
    )
    if groups is None:
        return 2
    if args.json or not groups:
        return 0
    room = None
    for g in groups:
        if g["room_id"] != room:
            room = g["room_id"]
            print(f"\n{room}")
        print(
            f"  blamed {g['blamed']}: {len(g['events'])} event(s) by {', '.join(g['authors']) or '-'};"
            f" evidence {g['evidence']} ({', '.join(g['rules'])}), {g['refused']} refused;"
            f" confidence {g['confidence']}; {_format_ts(g['first_seen'])} .. {_format_ts(g['last_seen'])}"
        )
        for event_id in g["events"][:5]:
            print(f"      {event_id}")
        if len(g["events"]) > 5:
            print(f"      … and {len(g['events']) - 5} more")
    return 0


def cmd_audit(args: argparse.Namespace) -> int:
    config = load_config(args.config)
    database = args.db or f"{args.capture}.modgud.db"
    if (
        not is_postgres(config.database)
        and Path(database).resolve() == Path(config.database).resolve()
    ):
        print(
            f"modgud audit: {database} is the live findings database; give the replay its own",
            file=sys.stderr,
        )
        return 2
    for suffix in ("", "-wal", "-shm"):
        Path(database + suffix).unlink(missing_ok=True)  # a replay starts from nothing
    try:
        count = asyncio.run(replay_capture(config, args.capture, database, args.since))
    except ReplayError as e:
        print(f"modgud audit: {e}", file=sys.stderr)
        return 2
    rows = list(query_findings([database]))
    leaks = query_leaks([database])
    if args.json:
        for row in rows:
            print(json.dumps(row, ensure_ascii=False))
    else:
        by_rule: dict[str, int] = {}
        for row in rows:
            by_rule[row["rule"]] = by_rule.get(row["rule"], 0) + 1
        print(f"replayed {count} flows from {args.capture}; findings in {database}")
        for rule, n in sorted(by_rule.items()):
            print(f"  {rule:<24} {n}")
        for g in leaks:
            print(
                f"  leak in {g['room_id']}: blamed {g['blamed']}, {len(g['events'])} event(s),"
                f" confidence {g['confidence']}"
            )
    return 1 if leaks else 0


def cmd_history(args: argparse.Namespace) -> int:
    """Audit rooms' stored history for leaks from before modgud; exit 1 when any."""
    from proxy_addons.history import HistoryError, history_findings, history_policy, redact_events
    from rules.findings import Rule

    config = load_config(args.config)
    if bool(args.room) == bool(args.all):
        print("modgud history: give a room ID or --all", file=sys.stderr)
        return 2
    policy = history_policy(config)
    try:
        rooms, policies = asyncio.run(_rooms_and_policies(config, args.room))
        leaked = 0
        for room_id in rooms:
            run = asyncio.run(_history_of(config, room_id, policy, args, policies))
            recorded = history_findings(config.database, room_id)
            leaked += len(recorded)
            if not args.json:
                _print_history(run, recorded)
            if args.redact:
                events = sorted(
                    {
                        r["event_id"]
                        for r in recorded
                        if r["event_id"] and r["rule"] != Rule.HISTORY_REFERENCE.value
                    }
                )
                if not _confirm_redaction(args, room_id, events):
                    continue
                done = asyncio.run(
                    redact_events(config, room_id, events, "leaked: modgud history audit")
                )
                for r in done:
                    print(
                        f"  {'redacted' if r.done else 'NOT redacted'} {r.event_id}"
                        + (f": {r.problem}" if r.problem else "")
                    )
    except (HistoryError, DatabaseError) as e:
        print(f"modgud history: {e}", file=sys.stderr)
        return 2
    return 1 if leaked else 0


async def _rooms_and_policies(config: Config, room: str | None) -> tuple[list[str], Any]:
    """The rooms to audit (one, or every room the homeserver knows) and how the policy
    lists and spaces changed, read once for them all."""
    import aiohttp

    from proxy_addons.history import list_rooms, read_policy_history

    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as session:
        rooms = [room] if room else await list_rooms(session, config)
        return rooms, await read_policy_history(session, config)


async def _history_of(
    config: Config,
    room_id: str,
    policy: Any,
    args: argparse.Namespace,
    policies: Any,
) -> Any:
    from proxy_addons.history import HistoryRun, as_json, audit_room

    now = time.time()
    terminal = sys.stderr.isatty() and not args.json

    def on_event(audited: Any, event: Any) -> None:
        if args.json:
            for finding in audited.findings:
                print(as_json(audited.position, finding, event, now), flush=True)

    def on_page(run: HistoryRun) -> None:
        if terminal:
            sys.stderr.write(f"\r{room_id}: {run.progress()}")
            sys.stderr.flush()

    run = await audit_room(
        config,
        room_id,
        policy,
        since=args.since,
        restart=args.restart,
        on_event=on_event,
        on_page=on_page,
        policy_history=policies,
    )
    if terminal:
        sys.stderr.write("\n")
    return run


def _print_history(run: Any, recorded: list[dict[str, Any]]) -> None:
    resumed = f", resumed at {run.resumed_at}" if run.resumed_at else ""
    print(
        f"{run.room_id}: {run.judged} events judged in {run.seconds:.1f} s{resumed} "
        f"(history: {run.position} events); {run.found} new findings, "
        f"{len(recorded)} in all"
    )
    for r in recorded:
        print(
            f"  {r['rule']:<22} {r['event_id']}  by {r['sender'] or '-'}  "
            f"blamed {r['attributed_to'] or '-'} ({r['confidence']})"
        )
        print(f"      {r['detail']}")


def _confirm_redaction(args: argparse.Namespace, room_id: str, events: list[str]) -> bool:
    if not events:
        print(f"  nothing to redact in {room_id}")
        return False
    print(f"  {len(events)} leaked event(s) in {room_id} to redact:")
    for event_id in events:
        print(f"    {event_id}")
    if args.yes:
        return True
    if sys.stdin.isatty():
        answer = input("  redact them as the room admin? type the room ID to confirm: ")
        if answer.strip() == room_id:
            return True
    print("  dry run: nothing redacted (confirm, or add --yes)")
    return False


def cmd_db_migrate_to(args: argparse.Namespace) -> int:
    """Copy an SQLite database's records into another database (PostgreSQL, for replicas);
    the counts of both, table by table, compared."""
    source = args.db or (load_config(args.config).database if args.config else "modgud.db")
    if is_postgres(source) or not Path(source).is_file():
        print(f"modgud db migrate-to: no SQLite database at {source}", file=sys.stderr)
        return 2
    target = open_db(args.url)
    print(f"copying {open_db(source).describe()} into {target.describe()}")
    try:
        counts = copy_records(source, args.url)
    except DatabaseError as e:
        print(f"modgud db migrate-to: {e}", file=sys.stderr)
        return 2
    for table, copied, there in counts:
        print(
            f"  {table:<14} {copied:>10} copied, {there:>10} there {'ok' if copied == there else 'DIFFERENT'}"
        )
    if any(copied != there for _, copied, there in counts):
        print("modgud db migrate-to: the counts differ; the copy is not complete", file=sys.stderr)
        return 1
    print(f"done: set `database:` in modgud.yaml to the PostgreSQL URL ({target.describe()})")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="modgud", description="Federation firewall and leak detector for Matrix homeservers."
    )
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser(
        "run", help="run the proxy (inbound, outbound if configured) and the event hook"
    )
    run.add_argument("--config", "-c", required=True, help="modgud.yaml")
    run.add_argument(
        "mitmproxy_args",
        nargs=argparse.REMAINDER,
        help="after --: --set KEY=VALUE, -s SCRIPT, -w FILE, -q (mitmproxy options)",
    )
    run.set_defaults(func=cmd_run)

    findings = sub.add_parser("findings", help="print recorded findings")
    findings.add_argument(
        "--db", action="append", help="findings database (repeat for several replicas)"
    )
    findings.add_argument("--config", "-c", help="take the database path from this config")
    findings.add_argument("--room", help="only this room ID")
    findings.add_argument("--rule", help="only this rule (or rule family, e.g. acl)")
    findings.add_argument("--since", type=parse_since, help="30m, 2h, 7d, Unix or ISO time")
    findings.add_argument("--limit", type=int, help="only the newest N")
    findings.add_argument(
        "--json", action="store_true", help="JSON lines: " + ", ".join(FINDING_COLUMNS)
    )
    findings.set_defaults(func=cmd_findings)

    leaks = sub.add_parser("leaks", help="per room: leaked events and the servers blamed")
    leaks.add_argument("--db", action="append", help="findings database (repeat per replica)")
    leaks.add_argument("--config", "-c", help="take the database path from this config")
    leaks.add_argument("--room", help="only this room ID")
    leaks.add_argument("--since", type=parse_since, help="30m, 2h, 7d, Unix or ISO time")
    leaks.add_argument("--json", action="store_true", help="JSON lines, one per room and server")
    leaks.set_defaults(func=cmd_leaks)

    audit = sub.add_parser("audit", help="replay a capture (mitmdump -w) through the checks")
    audit.add_argument("capture", help="mitmproxy flow file")
    audit.add_argument("--config", "-c", required=True, help="modgud.yaml (state source, keys)")
    audit.add_argument(
        "--db", help="findings database for the replay, replaced (default CAPTURE.modgud.db)"
    )
    audit.add_argument("--since", type=parse_since, help="only flows from this time")
    audit.add_argument("--json", action="store_true", help="the findings as JSON lines")
    audit.set_defaults(func=cmd_audit)

    knocks = sub.add_parser("knocks", help="servers waiting for approval (m.server.knock)")
    knocks.add_argument("--db", action="append", help="findings database (repeat per replica)")
    knocks.add_argument("--config", "-c", help="take the database path from this config")
    knocks.add_argument("--room", help="only this room ID")
    knocks.add_argument("--status", choices=["pending", "approved", "denied"])
    knocks.add_argument("--json", action="store_true", help="JSON lines")
    knocks.set_defaults(func=cmd_knocks)
    for name, func, what in (
        ("approve", cmd_approve, "permit SERVER in ROOM (m.server.participation permitted)"),
        ("deny", cmd_deny, "deny SERVER in ROOM (m.server.participation deny)"),
    ):
        decide = sub.add_parser(name, help=what)
        decide.add_argument("room", help="room ID")
        decide.add_argument("server", help="server name")
        decide.add_argument("--reason", help="shown to the server's users")
        decide.add_argument("--config", "-c", required=True, help="modgud.yaml")
        decide.set_defaults(func=func)

    spaces = sub.add_parser("spaces", help="a space's policy across its rooms (MSC3216)")
    spaces.add_argument("action", choices=["drift", "sync"])
    spaces.add_argument("space", help="space room ID")
    spaces.add_argument("--config", "-c", required=True, help="modgud.yaml")
    spaces.add_argument(
        "--allow-fail", action="append", metavar="ROOM", help="sync: this room may fail"
    )
    spaces.add_argument(
        "--only",
        action="append",
        choices=KINDS,
        help="only this kind (repeatable; default all): policy = ACL and participation",
    )
    spaces.set_defaults(func=cmd_spaces)

    ca = sub.add_parser(
        "ca", help="create the outbound listener's CA; print its certificate's path"
    )
    ca.add_argument("--config", "-c", required=True, help="modgud.yaml")
    ca.set_defaults(func=cmd_ca)

    synapse = sub.add_parser(
        "synapse-config", help="print the homeserver.yaml modules: entry for modgud's module"
    )
    synapse.add_argument("--config", "-c", required=True, help="modgud.yaml")
    synapse.add_argument(
        "--mode", choices=["enforce", "audit"], help="the module's own mode (default: the config's)"
    )
    synapse.set_defaults(func=cmd_synapse_config)

    history = sub.add_parser(
        "history", help="audit rooms' stored history for leaks from before modgud"
    )
    history.add_argument("room", nargs="?", help="room ID")
    history.add_argument("--all", action="store_true", help="every room the homeserver knows")
    history.add_argument("--config", "-c", required=True, help="modgud.yaml")
    history.add_argument(
        "--since",
        type=parse_since,
        help="report only events from this time (the state is followed from the start)",
    )
    history.add_argument(
        "--json", action="store_true", help="JSON lines: the fields of findings and position"
    )
    history.add_argument(
        "--restart", action="store_true", help="start from the room's first event again"
    )
    history.add_argument(
        "--redact", action="store_true", help="redact the leaked events (asks first)"
    )
    history.add_argument("--yes", action="store_true", help="with --redact: do not ask")
    history.set_defaults(func=cmd_history)

    db = sub.add_parser("db", help="the findings database")
    db_sub = db.add_subparsers(dest="db_command", required=True)
    migrate_to = db_sub.add_parser(
        "migrate-to",
        help="copy every record of an SQLite database into an empty PostgreSQL database",
    )
    migrate_to.add_argument("url", help="postgresql://user@host:port/dbname (or another path)")
    migrate_to.add_argument("--config", "-c", help="copy the database this config names")
    migrate_to.add_argument("--db", help="copy this SQLite database (default ./modgud.db)")
    migrate_to.set_defaults(func=cmd_db_migrate_to)

    check = sub.add_parser("check-config", help="validate a config file")
    check.add_argument("config", help="modgud.yaml")
    check.add_argument(
        "--homeserver-config",
        metavar="HOMESERVER_YAML",
        help="also check what this homeserver.yaml loads of modgud (module, HTTP hook)",
    )
    check.set_defaults(func=cmd_check_config)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if getattr(args, "mitmproxy_args", None) and args.mitmproxy_args[:1] == ["--"]:
        args.mitmproxy_args = args.mitmproxy_args[1:]
    try:
        return int(args.func(args))
    except ConfigError as e:
        print(f"modgud: config error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
