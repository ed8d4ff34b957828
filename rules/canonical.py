"""Canonical JSON (spec: Appendices, "Canonical JSON")."""

from __future__ import annotations

import gc

import canonicaljson
import msgspec

__all__ = ["MAX_DEPTH", "canonical_json_size", "check_canonical_json", "encode_canonical_json"]

MAX_SAFE_INTEGER = 2**53 - 1
MAX_DEPTH = 100

# The fast path: msgspec, four to five times faster than the stdlib encoder behind
# canonicaljson on a 32 KB /send body and twice as fast on a 1 KB event, type scan
# included, gives byte-identical output for exactly these types (each one exactly,
# not a subclass): UTF-8, the same escapes (`"`, `\`, \b \t \n \f \r, other C0 controls
# as \u00xx; nothing else, not DEL, U+2028 or U+2029), keys sorted by a bytewise
# comparison of their UTF-8, which is code-point order, and integers as int's repr.
# Everything else goes to canonicaljson, which decides:
# - floats: msgspec writes 1e16 and 1e-05 as `1e16` and `0.00001` where Python's repr,
#   and so canonicaljson, writes `1e+16` and `1e-05`; NaN and infinity are `null` to
#   msgspec and a ValueError to canonicaljson;
# - sets, bytes, bytearray, memoryview, msgspec.Raw, enums, dataclasses, datetimes, …:
#   msgspec encodes them, canonicaljson raises TypeError;
# - subclasses of dict, list, tuple, str and int: canonicaljson goes through their
#   items(), __iter__ or comparisons, which a subclass may override, msgspec does not;
# - keys that are not str: canonicaljson sorts int (or bool, None, float) keys by value
#   and then writes them as strings, or raises TypeError on mixed types; msgspec with
#   `order` refuses them with TypeError, so they fall back even without the type scan;
# - nesting deeper than MAX_DEPTH, and reference cycles (canonicaljson: ValueError).
#   Both encoders spend one level of the interpreter's C recursion budget per nested
#   container (both stop at 1,497 levels from a fresh stack on CPython 3.12), far
#   beyond MAX_DEPTH, so any value the fast path takes canonicaljson would encode too;
# - anything msgspec itself refuses: lone surrogates (UnicodeEncodeError from either),
#   integers over the 4,300-digit limit (ValueError from either), RecursionError.
_PLAIN_TYPES = frozenset({dict, list, tuple, str, int, bool, type(None)})
_ENCODER = msgspec.json.Encoder(order="sorted")
# For a length only: the order of keys does not change it, and not sorting is cheaper.
_SIZE_ENCODER = msgspec.json.Encoder()


def _referents_cover_items() -> bool:
    """Whether gc.get_referents returns every item of a list or tuple, every value of a
    dict, and the keys of a dict whose keys are not all exactly str, as CPython's
    tp_traverse of these types does; the type scan depends on it. Checked once at import:
    should a Python version ever skip some, the fast path stays off."""

    class _Str(str):
        pass

    key, untracked_value = _Str("k"), 3.5
    leaves = [1.5, b"b", {1}, _Str("v"), [2.5], (4.5,), {"f": untracked_value}]
    probes = ([*leaves], (*leaves,), dict(zip("abcdefg", leaves, strict=True)), {key: 0})
    expected = (*leaves, key, untracked_value)
    found = {id(item) for item in gc.get_referents(*probes, leaves[-1])}
    return all(id(item) in found for item in expected)


_FAST_PATH = _referents_cover_items()


def _only_plain_types(value: object) -> bool:
    """True if `value` holds only exact dicts, lists, tuples, strs, ints, bools and None,
    nested at most MAX_DEPTH deep.

    Breadth-first, one nesting level per step, with the per-object work in C:
    gc.get_referents lists the items, values (and non-str keys) of a whole level at once.
    A Python loop over every object costs four times as much. (The gc documentation warns
    that referents may be objects still under construction; here they are the contents of
    the caller's finished containers, and only their types are read.) A cycle never ends,
    so the depth limit cuts it off.
    """
    level: list[object] = [value]
    for _ in range(MAX_DEPTH + 1):
        if not _PLAIN_TYPES.issuperset(map(type, level)):
            return False
        level = gc.get_referents(*level)
        if not level:
            return True
    return False


def encode_canonical_json(value: object) -> bytes:
    """UTF-8, no insignificant whitespace, keys sorted by code point.

    Byte for byte what canonicaljson (the stdlib encoder) gives, and the same errors:
    msgspec encodes the values it is known to encode identically (exact JSON types, no
    floats, nesting at most MAX_DEPTH); canonicaljson encodes, or refuses, the rest.

    Raises ValueError/TypeError for values JSON cannot hold (NaN, sets, …) and
    RecursionError for absurd nesting; callers on hostile input catch these.
    """
    if _FAST_PATH and _only_plain_types(value):
        try:
            return _ENCODER.encode(value)
        except Exception:  # canonicaljson decides what msgspec refuses
            pass
    return canonicaljson.encode_canonical_json(value)


def canonical_json_size(value: object, *, exact_from: int) -> int:
    """The length of `value`'s canonical JSON, exact from `exact_from` bytes on.

    Below that, the length of msgspec's encoding (unsorted: the order does not change the
    length) without the per-object type check (a third of the cost for a small event).
    For plain JSON data (what a decoded body or Synapse's events hold) that is canonical
    JSON's length; other values are measured as
    msgspec writes them (a float's spelling, a set as an array, NaN as null) where
    canonicaljson would spell them otherwise or refuse: this measures, it does not
    validate. Near or over `exact_from`, or when msgspec cannot encode the value, the
    exact length, with encode_canonical_json's errors.
    """
    if _FAST_PATH:
        try:
            size = len(_SIZE_ENCODER.encode(value))
        except Exception:  # noqa: BLE001 - the exact path decides, and raises what it raises
            size = exact_from
        if size < exact_from:
            return size
    return len(encode_canonical_json(value))


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
