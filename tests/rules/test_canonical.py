"""Canonical JSON encoding (spec: Appendices, "Canonical JSON"): the msgspec fast path must
give exactly canonicaljson's bytes, or exactly its kind of error, for every input."""

from __future__ import annotations

import collections
import dataclasses
import enum
import sys

import canonicaljson
import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import rules.canonical as canonical
from rules.canonical import MAX_DEPTH, encode_canonical_json


def reference(value: object) -> bytes | type[BaseException]:
    """canonicaljson's bytes for `value`, or the type of the exception it raises."""
    try:
        return canonicaljson.encode_canonical_json(value)
    except Exception as e:
        return type(e)


def ours(value: object) -> bytes | type[BaseException]:
    """encode_canonical_json's bytes for `value`, or the type of the exception it raises."""
    try:
        return encode_canonical_json(value)
    except Exception as e:
        return type(e)


def nested(depth: int, leaf: object = 1) -> object:
    """`leaf` inside `depth` lists and dicts, alternately."""
    value = leaf
    for i in range(depth):
        value = [value] if i % 2 else {"k": value}
    return value


SPECIAL_CHARACTERS = st.sampled_from(
    ["\x00", "\x1f", "\x7f", '"', "\\", "/", "\u2028", "\u2029", "\ud800", "\udfff", "\ufeff"]
    + ["\uffff", "\ue000", "\U00010000", "\U0001f600", "\U0010ffff", "é", "\b", "\n", "\t"]
)
# All of Unicode, lone surrogates included (st.text() leaves them out by default), and
# the characters whose escaping or ordering could differ, often.
ANY_TEXT = st.text(st.characters(exclude_categories=()) | SPECIAL_CHARACTERS, max_size=6)
# Over the 4,300-digit limit: built lazily, as hypothesis cannot repr such an int.
HUGE_INTS = st.sampled_from([4299, 4300]).map(lambda digits: 10**digits)
INTS = (
    st.integers()
    | st.sampled_from(
        [2**53 - 1, 2**53, 2**63 - 1, 2**63, -(2**63), -(2**63) - 1, 2**64 - 1, 2**64, -(2**64)]
    )
    | HUGE_INTS
)
FLOATS = st.floats() | st.sampled_from(
    [0.0, -0.0, 1e16, 1e-5, 5e-324, 1.7976931348623157e308, 1e22, 0.1, float("nan")]
)
JSON_SHAPED = st.recursive(
    st.none() | st.booleans() | INTS | FLOATS | ANY_TEXT,
    lambda children: (
        st.lists(children, max_size=4)
        | st.lists(children, max_size=3).map(tuple)
        | st.dictionaries(ANY_TEXT, children, max_size=4)
    ),
    max_leaves=12,
)
# Mostly what events hold, so that most examples take the fast path, floats only rarely.
EVENT_SHAPED = st.recursive(
    st.none() | st.booleans() | INTS | ANY_TEXT,
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(ANY_TEXT, children, max_size=5)
    ),
    max_leaves=20,
)


def test_the_fast_path_is_on():
    """On this interpreter gc.get_referents covers list items and dict values, so msgspec
    encodes plain values; otherwise the tests below would only compare canonicaljson with
    itself."""
    assert canonical._FAST_PATH


@settings(max_examples=400, deadline=None)
@given(st.one_of(JSON_SHAPED, EVENT_SHAPED))
def test_same_bytes_or_same_error_as_canonicaljson(value):
    """Spec "Canonical JSON": for arbitrary JSON-shaped values (huge and boundary ints,
    every kind of float, control characters, lone surrogates, non-BMP text, tuples) the
    result is canonicaljson's, byte for byte, or the same type of exception."""
    assert ours(value) == reference(value)


@settings(max_examples=200, deadline=None)
@given(st.one_of(JSON_SHAPED, EVENT_SHAPED))
def test_the_size_is_exact_from_the_threshold_on(value):
    """canonical_json_size at or over `exact_from` is the canonical encoding's length, or
    the same error."""
    expected = reference(value)
    try:
        size = canonical.canonical_json_size(value, exact_from=0)
    except Exception as e:
        assert isinstance(expected, type) and issubclass(type(e), expected)
    else:
        assert size == len(expected)


@settings(max_examples=200, deadline=None)
@given(EVENT_SHAPED)
def test_the_size_of_plain_values_is_exact_below_the_threshold_too(value):
    """Events hold plain JSON data: msgspec's length is canonical JSON's."""
    expected = reference(value)
    if isinstance(expected, bytes):
        assert canonical.canonical_json_size(value, exact_from=10**9) == len(expected)


@settings(max_examples=100, deadline=None)
@given(EVENT_SHAPED)
def test_plain_values_take_the_fast_path(value):
    """Values with only exact JSON types and no floats are encoded by msgspec, and that is
    canonicaljson's output (or both refuse: lone surrogates, over-long integers)."""
    expected = reference(value)
    assert canonical._only_plain_types(value)
    try:
        fast = canonical._ENCODER.encode(value)
    except Exception as e:
        assert isinstance(expected, type) and issubclass(type(e), expected)
    else:
        assert fast == expected


def test_every_code_point_is_escaped_as_canonicaljson_does():
    """Spec "Canonical JSON": UTF-8, with only `"`, `\\` and the C0 controls escaped. One
    string of every code point outside the surrogates, and every character that is or could
    be escaped as a key, give the same bytes (DEL, U+2028 and U+2029 stay unescaped)."""
    every = "".join(chr(c) for c in range(0x110000) if not 0xD800 <= c <= 0xDFFF)
    assert encode_canonical_json(every) == canonicaljson.encode_canonical_json(every)
    controls = {chr(c): c for c in [*range(0x21), 0x22, 0x5C, 0x7F, 0x2028, 0x2029]}
    assert encode_canonical_json(controls) == canonicaljson.encode_canonical_json(controls)
    assert encode_canonical_json("\x00\x1f\u2028\x7f") == b'"\\u0000\\u001f\xe2\x80\xa8\x7f"'


def test_non_bmp_keys_sort_by_code_point():
    """Spec "Canonical JSON": keys are sorted by code point. U+E000 < U+FFFF < U+10000,
    although UTF-16 code units (U+10000 is D800 DC00) would put U+10000 first."""
    keys = ["\U00010000", "\uffff", "\ue000", "\U0001f600", "z", "é", "\U0010ffff", ""]
    value = dict.fromkeys(keys, 0)
    expected = b"{" + b",".join(b'"%s":0' % k.encode() for k in sorted(keys)) + b"}"
    assert encode_canonical_json(value) == expected == canonicaljson.encode_canonical_json(value)
    assert expected.index("\ue000".encode()) < expected.index("\U00010000".encode())
    boundaries = [0x7F, 0x80, 0x7FF, 0x800, 0xD7FF, 0xE000, 0xFFFF, 0x10000, 0x10FFFF]
    value = {chr(c): c for c in range(0, 0x110000, 997) if not 0xD800 <= c <= 0xDFFF}
    value.update((chr(c), c) for c in boundaries)
    assert encode_canonical_json(value) == canonicaljson.encode_canonical_json(value)


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (1e16, b"1e+16"),
        (1e-5, b"1e-05"),
        (1e300, b"1e+300"),
        (-0.0, b"-0.0"),
        (5e-324, b"5e-324"),
        (1.0, b"1.0"),
        (0.1, b"0.1"),
        ({"a": [{"b": 1e16}]}, b'{"a":[{"b":1e+16}]}'),
        ((1, 2.5), b"[1,2.5]"),
    ],
)
def test_floats_are_written_as_python_repr(value, expected):
    """Floats (old rooms, EDUs, X-Matrix bodies) are Python's repr, as canonicaljson writes
    them: msgspec would write 1e16 as `1e16` and 1e-5 as `0.00001`, so floats, however
    deep, never take the fast path."""
    assert encode_canonical_json(value) == expected == canonicaljson.encode_canonical_json(value)
    assert not canonical._only_plain_types(value)


@pytest.mark.parametrize(
    "value", [float("nan"), float("inf"), -float("inf"), {"a": [float("nan")]}]
)
def test_nan_and_infinity_are_refused(value):
    """NaN and ±infinity are not JSON: ValueError, as from canonicaljson (msgspec would
    write `null`)."""
    with pytest.raises(ValueError):
        encode_canonical_json(value)
    assert reference(value) is ValueError


@pytest.mark.parametrize(
    "number",
    [2**53, 2**63 - 1, 2**63, -(2**63), -(2**63) - 1, 2**64 - 1, -(2**64 - 1), 2**64, -(2**64)]
    + [2**200, -(2**200), 10**4299],
)
def test_big_integers_are_written_in_full(number):
    """Integers beyond 64 bits are written in full, as int's repr, as canonicaljson does
    (rooms v6+ reject them beyond ±(2^53−1), but older rooms and EDUs may hold them)."""
    for value, expected in ((number, b"%d" % number), ({"n": number}, b'{"n":%d}' % number)):
        assert (
            encode_canonical_json(value) == expected == canonicaljson.encode_canonical_json(value)
        )
        assert canonical._only_plain_types(value)


def test_integers_over_the_digit_limit_are_refused():
    """Python refuses to write integers over 4,300 digits (sys.int_info): ValueError, as
    from canonicaljson."""
    assert sys.get_int_max_str_digits() == 4300
    with pytest.raises(ValueError):
        encode_canonical_json({"a": 10**4300})
    assert reference({"a": 10**4300}) is ValueError


@pytest.mark.parametrize(
    "value",
    [
        {1: "a", 10: "b", 9: "c"},
        {True: 1, None: 2},
        {1.5: "x"},
        {1: 2, "1": 3},
        {(1,): 2},
        {"a": {2: "x"}},
    ],
)
def test_non_string_keys_behave_as_in_canonicaljson(value):
    """Non-string keys are not canonical JSON, but canonicaljson accepts int, float, bool
    and None keys (sorted by value, then written as strings: 9 before 10) and refuses
    mixed or other keys with TypeError; the result is the same here."""
    assert ours(value) == reference(value)


def test_int_keys_sort_by_value_as_canonicaljson_does():
    """canonicaljson sorts int keys numerically before writing them as strings."""
    assert encode_canonical_json({10: "b", 9: "c"}) == b'{"9":"c","10":"b"}'


def test_lone_surrogates_are_refused():
    """A lone surrogate cannot be UTF-8: UnicodeEncodeError (a ValueError), as from
    canonicaljson, in a value or in a key."""
    for value in ("\ud800", {"a": ["x\udfffy"]}, {"\udc00": 1}):
        with pytest.raises(UnicodeEncodeError):
            encode_canonical_json(value)
        assert reference(value) is UnicodeEncodeError


class Colour(enum.StrEnum):
    RED = "red"


class Number(enum.IntEnum):
    ONE = 1


class WeirdItems(dict):
    def items(self):
        return [("z", "from items()")]


class ReversedList(list):
    def __iter__(self):
        return reversed(list.__iter__(self))


class Shouting(str):
    def __lt__(self, other):
        return str(other) < str(self)


@dataclasses.dataclass
class Point:
    x: int


@pytest.mark.parametrize(
    "value",
    [
        {1, 2},
        frozenset({1}),
        b"bytes",
        bytearray(b"x"),
        memoryview(b"x"),
        msgspec.Raw(b"1"),
        Point(1),
        {"a": [{1}]},
        {"a": b"x"},
        Colour.RED,
        {"c": Colour.RED, Colour.RED: 1},
        Number.ONE,
        collections.OrderedDict(b=1, a=2),
        WeirdItems(a=1),
        ReversedList([1, 2, 3]),
        {Shouting("a"): 1, Shouting("b"): 2},
        complex(1, 2),
        object(),
    ],
)
def test_other_types_behave_as_in_canonicaljson(value):
    """Types msgspec would encode but canonicaljson refuses (sets, bytes, Raw, dataclasses)
    or encodes its own way (subclasses overriding items(), __iter__ or ordering) never take
    the fast path: the same bytes or the same TypeError as canonicaljson."""
    assert not canonical._only_plain_types(value)
    assert ours(value) == reference(value)


def test_deep_nesting_matches_canonicaljson():
    """Up to MAX_DEPTH levels msgspec encodes; deeper values go to canonicaljson, which
    encodes them or raises RecursionError just as before."""
    for depth in (MAX_DEPTH - 1, MAX_DEPTH, MAX_DEPTH + 1, 1000):
        value = nested(depth)
        assert canonical._only_plain_types(value) is (depth <= MAX_DEPTH)
        assert ours(value) == reference(value)
    assert ours(nested(100_000)) is RecursionError


def test_cycles_are_refused_as_canonicaljson_does():
    """A value containing itself is refused with canonicaljson's ValueError."""
    loop: list[object] = [1]
    loop.append({"again": loop})
    assert not canonical._only_plain_types(loop)
    assert ours(loop) is ValueError is reference(loop)


def test_shared_substructures_are_fine():
    """The same object twice (not a cycle) is encoded twice, as canonicaljson does."""
    shared = {"b": [1, "x"]}
    value = {"a": shared, "c": [shared, shared]}
    assert canonical._only_plain_types(value)
    assert encode_canonical_json(value) == canonicaljson.encode_canonical_json(value)


def test_signed_event_is_encoded_by_msgspec(monkeypatch):
    """A realistic redacted event takes the fast path (canonicaljson is not called) and
    gives the spec's form: sorted keys, no whitespace, UTF-8."""
    event = {
        "type": "m.room.message",
        "sender": "@alice:example.org",
        "room_id": "!room:example.org",
        "content": {},
        "depth": 12,
        "origin_server_ts": 1_700_000_000_000,
        "prev_events": ["$prev"],
        "auth_events": ["$create", "$power", "$member"],
        "hashes": {"sha256": "abc"},
        "signatures": {"example.org": {"ed25519:1": "sig"}},
        "unsigned": {"age_ts": 1, "note": "naïve 😀"},
    }
    expected = canonicaljson.encode_canonical_json(event)

    def refuse(value: object) -> bytes:
        raise AssertionError("canonicaljson called")

    monkeypatch.setattr(canonicaljson, "encode_canonical_json", refuse)
    assert encode_canonical_json(event) == expected
    assert expected.startswith(b'{"auth_events":["$create","$power","$member"],"content":{}')
