"""Canonical JSON (spec: Appendices, "Canonical JSON")."""

from __future__ import annotations

import canonicaljson

__all__ = ["MAX_DEPTH", "check_canonical_json", "encode_canonical_json"]

MAX_SAFE_INTEGER = 2**53 - 1
MAX_DEPTH = 100


def encode_canonical_json(value: object) -> bytes:
    """UTF-8, no insignificant whitespace, keys sorted by code point.

    Raises ValueError/TypeError for values JSON cannot hold (NaN, sets, …) and
    RecursionError for absurd nesting; callers on hostile input catch these.
    """
    return canonicaljson.encode_canonical_json(value)


def check_canonical_json(value: object) -> str | None:
    """None if `value` is strict canonical-JSON data (room v6+), else why not.

    Strict means: only objects with string keys, arrays, strings, booleans, null and
    integers within ±(2^53−1) (spec: "Canonical JSON"; rooms v6). Iterative, so hostile
    nesting cannot exhaust the stack; nesting beyond MAX_DEPTH is itself a reason.
    """
    stack: list[tuple[object, int]] = [(value, 0)]
    while stack:
        item, depth = stack.pop()
        if depth > MAX_DEPTH:
            return f"nested deeper than {MAX_DEPTH}"
        if item is None or isinstance(item, bool | str):
            continue
        if isinstance(item, int):
            if not -MAX_SAFE_INTEGER <= item <= MAX_SAFE_INTEGER:
                return f"integer {item} is outside ±(2^53−1)"
        elif isinstance(item, float):
            return "floats are not allowed"
        elif isinstance(item, dict):
            for key, child in item.items():
                if not isinstance(key, str):
                    return "object keys must be strings"
                stack.append((child, depth + 1))
        elif isinstance(item, list | tuple):
            stack.extend((child, depth + 1) for child in item)
        else:
            return f"{type(item).__name__} is not a JSON value"
    return None
