"""One table of every [performance] figure: each benchmark records its figures here
(`record`, to the JSON-lines file named by BENCH_RESULTS) and `make bench` ends with
`python -m tests.bench.results FILE`, which prints them with their targets."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path


def record(
    target: int,
    figure: str,
    value: float,
    limit: float | None,
    *,
    unit: str = "x",
    higher_is_better: bool = False,
    note: str = "",
) -> None:
    """Add one figure (no-op when BENCH_RESULTS is not set: a benchmark run on its own)."""
    path = os.environ.get("BENCH_RESULTS")
    if not path:
        return
    row = {
        "target": target,
        "figure": figure,
        "value": value,
        "limit": limit,
        "unit": unit,
        "higher_is_better": higher_is_better,
        "note": note,
    }
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(row) + "\n")


def verdict(row: dict[str, object]) -> str:
    value, limit = row["value"], row["limit"]
    if limit is None:
        return "reported"
    assert isinstance(value, float | int) and isinstance(limit, float | int)
    met = value >= limit if row["higher_is_better"] else value <= limit
    return "met" if met else "NOT met"


def table(rows: list[dict[str, object]]) -> str:
    lines = [f"{'#':>2}  {'figure':<58} {'value':>12} {'target':>10}  verdict"]
    for row in sorted(rows, key=lambda r: int(str(r["target"]))):
        unit = str(row["unit"])
        limit = row["limit"]
        bound = "" if limit is None else (">= " if row["higher_is_better"] else "<= ")
        target = f"{bound}{limit:g}{unit}" if limit is not None else "-"
        lines.append(
            f"{row['target']:>2}  {str(row['figure'])[:58]:<58} "
            f"{float(str(row['value'])):>11.2f}{unit:<1} {target:>10}  {verdict(row)}"
        )
        if row["note"]:
            lines.append(f"{'':>4}{row['note']}")
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    path = Path(argv[0])
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    print("\n[performance] targets, this run (docs/BENCHMARKS.md explains each gap)")
    print(table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
