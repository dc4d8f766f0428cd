"""Hypothesis strategies derived from protobuf descriptors: any request message of the API,
with hostile values in every field, and raw wire bytes (random, or a valid message with extra
fields appended at the wire level, which is how out-of-range int32 and enum values arrive)."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal

from google.protobuf import message_factory
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import Message
from hypothesis import strategies as st

F = FieldDescriptor

INT_RANGES: dict[int, tuple[int, int]] = {
    F.TYPE_INT32: (-(2**31), 2**31 - 1),
    F.TYPE_SINT32: (-(2**31), 2**31 - 1),
    F.TYPE_SFIXED32: (-(2**31), 2**31 - 1),
    F.TYPE_UINT32: (0, 2**32 - 1),
    F.TYPE_FIXED32: (0, 2**32 - 1),
    F.TYPE_INT64: (-(2**63), 2**63 - 1),
    F.TYPE_SINT64: (-(2**63), 2**63 - 1),
    F.TYPE_SFIXED64: (-(2**63), 2**63 - 1),
    F.TYPE_UINT64: (0, 2**64 - 1),
    F.TYPE_FIXED64: (0, 2**64 - 1),
}
# Limits and their neighbours, powers of two, and the ends of every integer type.
INT_EDGES = sorted(
    {
        *(v + d for v in (0, 8, 64, 100, 128, 150, 1000, 1024, 2048) for d in (-1, 0, 1)),
        *(s * 2**k + d for k in (15, 16, 31, 32, 53, 62, 63, 64) for s in (1, -1) for d in (-1, 0)),
        4 * 1024 * 1024,
        2048 * 2048,
    }
)
FLOAT_EDGES = (
    0.0,
    -0.0,
    0.5,
    1.0,
    -1.0,
    4.0,
    -4.0,
    4.000001,
    30.0,
    30.000001,
    1e-300,
    5e-324,
    1.7976931348623157e308,
    -1.7976931348623157e308,
    math.inf,
    -math.inf,
    math.nan,
)
# Text that means something to some handler: paths, A1111 syntax, control characters.
HOSTILE_TEXT = (
    "",
    " ",
    "\x00",
    "a\x00b",
    "..",
    "../../etc/passwd",
    "/etc/passwd",
    "/",
    ".",
    "a/../b.safetensors",
    "C:\\Windows\\system32",
    "<lora:x:1e999>",
    "<lora::>",
    "<lora:" + "a" * 300 + ":nan>",
    "(((((((((((word:1e308))))))))))",
    "[word:other:0.5]",
    "\u202e\u0644\u0639\u0631\u0628\u064a\u0629",
    "\U0001f600" * 10,
    "e\u0301" * 20,
    "\u2028\u2029\ufeff",
    "%s%n%x{0}{}",
    "' OR 1=1 --",
    "1",
    "0",
    "-1",
    "99999999999999999999999",
    "NaN",
    "SD 1.5",
    "SDXL",
    "Pony",
    "sd1",
)
HUGE_TEXT_MAX = 1_000_000
# Field name -> plausible string values; "" holds the values for any other string field.
Pools = Mapping[str, Sequence[str]]


def huge_text() -> st.SearchStrategy[str]:
    """10 KB to 1 MB (UTF-8) of text, built from a short piece (Hypothesis would not draw
    1 MB itself)."""
    return st.builds(
        lambda piece, n: ((piece * (n // len(piece) + 1)).encode()[:n]).decode("utf-8", "ignore"),
        st.text(min_size=1, max_size=8),
        st.integers(10_000, HUGE_TEXT_MAX),
    )


def mostly(common: st.SearchStrategy[Any], rare: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """`common` seven times in ten: a request gets past validation only when every field is
    plausible, and the handlers behind validation are what fuzzing is for."""
    return st.integers(0, 9).flatmap(lambda k: common if k < 7 else rare)


# Each kind of field has plausible values (what a client would send) and hostile ones.
Choices = tuple[st.SearchStrategy[Any], st.SearchStrategy[Any]]
WORDS = ("a", "watercolor", "painting", "city", "night", "portrait", "cat", "neon", "style")


def text(pool: Sequence[str], words: bool = True) -> Choices:
    """Plausible: a value from `pool` (what the server knows: ids, names, paths) or, with
    `words`, a few words."""
    plausible: st.SearchStrategy[str] = st.sampled_from(tuple(pool) or ("",))
    if words:
        phrases = st.lists(st.sampled_from(WORDS), min_size=1, max_size=6).map(" ".join)
        plausible = st.one_of(plausible, phrases)
    hostile = st.one_of(
        st.text(max_size=40),
        st.sampled_from(HOSTILE_TEXT),
        st.builds(lambda a, b: f"{a}\x00{b}", st.text(max_size=10), st.text(max_size=10)),
        st.text(st.characters(codec="utf-8"), max_size=200),
        huge_text(),
    )
    return plausible, hostile


def integers(lo: int, hi: int) -> Choices:
    edges = tuple(v for v in INT_EDGES if lo <= v <= hi)
    plausible = st.one_of(
        st.integers(max(lo, 0), min(hi, 10)),
        st.sampled_from(tuple(v for v in (0, 1, 2, 8, 64, 72, 128, 1024) if lo <= v <= hi)),
    )
    return plausible, st.one_of(st.sampled_from(edges), st.integers(lo, hi))


def doubles(width: Literal[32, 64] = 64) -> Choices:
    hostile = st.one_of(st.sampled_from(FLOAT_EDGES), st.floats(width=width))
    return st.floats(0.0, 1.0, width=width), hostile


def binaries() -> Choices:
    huge = st.integers(10_000, HUGE_TEXT_MAX).map(lambda n: b"\xff\x00" * (n // 2))
    return st.binary(max_size=64), huge


def scalar(field: FieldDescriptor, pools: Pools) -> Choices:
    kind = field.type
    if kind in INT_RANGES:
        return integers(*INT_RANGES[kind])
    if kind == F.TYPE_DOUBLE:
        return doubles()
    if kind == F.TYPE_FLOAT:
        return doubles(32)
    if kind == F.TYPE_BOOL:
        return st.booleans(), st.booleans()
    if kind == F.TYPE_STRING:
        if field.name in pools:  # the field's own values: ids, tokens, paths
            return text(pools[field.name], words=False)
        return text(pools.get("", ()))
    if kind == F.TYPE_BYTES:
        return binaries()
    if kind == F.TYPE_ENUM:
        assert field.enum_type is not None
        known = tuple(v.number for v in field.enum_type.values)
        # proto3 enums are open: any int32 is a legal value on the wire.
        return st.sampled_from(known), st.integers(-(2**31), 2**31 - 1)
    raise AssertionError(f"no strategy for field type {kind} ({field.full_name})")


# Field full name (or just name) -> its values' strategy, given whether only plausible ones.
FieldOverrides = Mapping[str, Callable[[bool], st.SearchStrategy[Any]]]


def requests(
    descriptor: Descriptor, pools: Pools, overrides: FieldOverrides | None = None
) -> st.SearchStrategy[Message]:
    """Half hostile messages (each field plausible seven times in ten), half plausible ones
    (every field plausible, to reach the handlers behind validation)."""
    return st.one_of(
        messages(descriptor, pools, overrides), messages(descriptor, pools, overrides, True)
    )


def messages(
    descriptor: Descriptor,
    pools: Pools,
    overrides: FieldOverrides | None = None,
    plausible: bool = False,
    depth: int = 0,
    max_depth: int = 4,
) -> st.SearchStrategy[Message]:
    """Messages of `descriptor`, each field present or absent (present when `plausible`)."""
    cls = message_factory.GetMessageClass(descriptor)
    if depth >= max_depth:
        return st.just(cls())
    optional: dict[str, st.SearchStrategy[Any]] = {}
    for field in descriptor.fields:
        override = overrides and (overrides.get(field.full_name) or overrides.get(field.name))
        value: st.SearchStrategy[Any]
        if override:
            value = override(plausible)
        elif field.type == F.TYPE_MESSAGE:
            assert field.message_type is not None
            value = messages(field.message_type, pools, overrides, plausible, depth + 1, max_depth)
        else:
            common, rare = scalar(field, pools)
            value = common if plausible else mostly(common, rare)
        optional[field.name] = st.lists(value, max_size=5) if field.is_repeated else value
    # Plausible messages set every field (an unset prompt is as invalid as a hostile one).
    fields = (
        st.fixed_dictionaries(optional)
        if plausible
        else st.fixed_dictionaries({}, optional=optional)
    )
    return fields.map(lambda values: build(cls, values))


def build(cls: type[Message], values: Mapping[str, Any]) -> Message:
    msg = cls()
    for name, value in values.items():
        field = cls.DESCRIPTOR.fields_by_name[name]
        target = getattr(msg, name)
        if field.is_repeated and field.type == F.TYPE_MESSAGE:
            for item in value:
                target.add().CopyFrom(item)
        elif field.is_repeated:
            target.extend(value)
        elif field.type == F.TYPE_MESSAGE:
            target.CopyFrom(value)
        else:
            setattr(msg, name, value)
    return msg


# --- the wire ---------------------------------------------------------------------------------


def varint(value: int) -> bytes:
    value &= 2**64 - 1  # negative numbers go on the wire as 64-bit two's complement
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def wire_field(number: int, wire_type: int, payload: bytes) -> bytes:
    key = varint((number << 3) | wire_type)
    if wire_type == 2:
        return key + varint(len(payload)) + payload
    return key + payload


# The varint-encoded kinds (fixed-width ones cannot carry out-of-range values).
WIRE_INTEGER_TYPES = frozenset(
    {*INT_RANGES, F.TYPE_ENUM, F.TYPE_BOOL}
    - {F.TYPE_SFIXED32, F.TYPE_FIXED32, F.TYPE_SFIXED64, F.TYPE_FIXED64}
)


def wire_extras(descriptor: Descriptor) -> st.SearchStrategy[bytes]:
    """Fields appended after a valid message: any 64-bit varint for a known number (int32 and
    enum fields then hold out-of-range values), unknown field numbers, and length-delimited
    junk. The last value of a scalar field wins, so these override the valid ones."""
    numbers = [f.number for f in descriptor.fields] or [1]
    number = st.one_of(st.sampled_from(numbers), st.integers(1, 2**29 - 1))
    one = st.one_of(
        st.builds(
            lambda n, v: wire_field(n, 0, varint(v)),
            number,
            st.one_of(st.sampled_from(INT_EDGES), st.integers(-(2**63), 2**64 - 1)),
        ),
        st.builds(lambda n, b: wire_field(n, 2, b), number, st.binary(max_size=32)),
        st.builds(lambda n, b: wire_field(n, 1, b), number, st.binary(min_size=8, max_size=8)),
        st.builds(lambda n, b: wire_field(n, 5, b), number, st.binary(min_size=4, max_size=4)),
    )
    return st.lists(one, min_size=1, max_size=4).map(b"".join)


def raw_requests(
    descriptor: Descriptor, pools: Pools, overrides: FieldOverrides | None = None
) -> st.SearchStrategy[bytes]:
    """Bytes sent as a request: random (mostly undecodable), or a valid message with fields
    appended at the wire level (mostly decodable)."""
    valid = requests(descriptor, pools, overrides).map(lambda m: m.SerializeToString())
    return st.one_of(
        st.binary(max_size=256),
        st.builds(lambda head, tail: head + tail, valid, wire_extras(descriptor)),
    )
