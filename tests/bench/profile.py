"""Where a proxy's CPU goes per transaction, from py-spy profiles of the pipeline benchmark.

`BENCH_PROFILE=DIR python -m tests.bench.run` records each proxy with py-spy (`-f raw`:
one line per distinct stack, `frame;frame;...;frame count`) during its last round; the
benchmark then prints this breakdown. Each sample is put in the first part below whose
frame it holds, so the parts add up to the process's busy time; samples whose innermost
frame is a wait (the event loop's select, a thread's queue) are idle and left out.

py-spy's sampling slows the process it samples (~10-20 % here): the parts are right
relative to each other, not in absolute terms.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

__all__ = ["PARTS", "breakdown", "format_breakdown", "read_breakdown", "start_py_spy"]

# (part, frames that put a sample in it): the first part with a matching frame takes it.
# A frame matches when it starts with one of the prefixes ("function (file").
PARTS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("modgud edge: parse the /send body", ("parse_transaction (",)),
    ("modgud edge: checks (ACL, policy, leaks)", ("check_transaction (", "check_pdu (")),
    ("modgud edge: event signatures", ("Enforcer._check_signatures (",)),
    ("modgud edge: X-Matrix request signature", ("Enforcer._authenticate (",)),
    ("modgud edge: event index", ("EventIndex.see (",)),
    ("modgud edge: the rest (flow state, verdicts, metrics)", ("Enforcer.",)),
    ("modgud outbound watcher", ("OutboundWatcher.",)),
    # its own thread, and what it hands to the main loop (rooms to fetch, findings)
    ("modgud event hook", ("EventHook._serve (", "evaluate_event (", "decide_invite (")),
    ("modgud SQLite writer (its thread)", ("FindingStore._run (",)),
    ("mitmproxy: addon hooks and their dispatch", ("AddonManager.", "HandlerCache.")),
    ("mitmproxy: HTTP, connections, event loop", ("",)),
)

_IDLE = (
    "select (",
    "EpollSelector.select (",
    "_PollLikeSelector.select (",
    "Condition.wait (",
    "Queue.get (",
    "Event.wait (",
    "sleep (",
)


def breakdown(raw: str, transactions: int, rate: int) -> dict[str, float]:
    """Milliseconds of CPU per transaction in each part, from a py-spy raw profile sampled
    at `rate` Hz over a run that passed `transactions` transactions."""
    samples: Counter[str] = Counter()
    for line in raw.splitlines():
        stack, _, count = line.rstrip().rpartition(" ")
        if not stack or not count.isdigit():
            continue
        frames = stack.split(";")
        if frames[-1].startswith(_IDLE):
            continue
        for part, prefixes in PARTS:
            if any(frame.startswith(prefixes) for frame in frames):
                samples[part] += int(count)
                break
    per_sample_ms = 1000 / rate
    return {
        part: samples[part] * per_sample_ms / max(transactions, 1)
        for part, _ in PARTS
        if samples[part]
    }


def format_breakdown(columns: dict[str, dict[str, float]], per: str = "transaction") -> str:
    """A table: one row per part, one column per proxy, ms of CPU per transaction."""
    kinds = list(columns)
    lines = [f"{f'CPU per {per}, ms (py-spy)':<54}" + "".join(f"{k:>12}" for k in kinds)]
    for part, _ in PARTS:
        if any(part in columns[k] for k in kinds):
            values = "".join(f"{columns[k].get(part, 0.0):>12.3f}" for k in kinds)
            lines.append(f"{part:<54}{values}")
    totals = "".join(f"{sum(columns[k].values()):>12.3f}" for k in kinds)
    lines.append(f"{'busy, all parts':<54}{totals}")
    return "\n".join(lines)


def read_breakdown(path: Path, transactions: int, rate: int) -> dict[str, float] | None:
    """The breakdown of a profile file, None if py-spy left none."""
    if not path.exists():
        return None
    return breakdown(path.read_text(errors="replace"), transactions, rate)


def start_py_spy(
    pid: int, output: str, *, seconds: int, rate: int, nonblocking: bool = False
) -> subprocess.Popen[bytes] | None:
    """BENCH_PROFILE=DIR: py-spy records `pid` (raw stacks) into DIR/`output` for `seconds`
    (or until sent SIGINT, when it writes what it has); None when BENCH_PROFILE is unset."""
    out = os.environ.get("BENCH_PROFILE")
    if not out:
        return None
    spy = Path(sys.executable).parent / "py-spy"
    if not spy.exists():
        raise SystemExit(
            f"BENCH_PROFILE needs py-spy: {Path(sys.executable)} -m pip install py-spy"
        )
    Path(out).mkdir(parents=True, exist_ok=True)
    cmd = [str(spy), "record", "-p", str(pid), "-d", str(seconds), "-r", str(rate)]
    cmd += ["-f", "raw", "-o", str(Path(out) / output)]
    if nonblocking:
        cmd.append("--nonblocking")
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
