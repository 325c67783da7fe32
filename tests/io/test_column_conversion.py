"""A postprocess value is converted to its column's run type only where that keeps the value exactly
(pipeline/io/columns.py, `convert`); every other pair is an error row. Arrow's safe casts alone let some losses
through: a number cast to bool is True unless 0, strings inside a list were parsed into numbers, a struct
dropped the fields its type lacks, an int became a timestamp, a decimal was rounded to a double."""

from __future__ import annotations

import datetime as dt
import math
from decimal import Decimal

import numpy as np
import pyarrow as pa
import pytest

from pipeline.io.columns import RunColumn, conform_rows
from pipeline.io.convert import convert

ERROR = object()
UTC = dt.timezone.utc
PLUS1 = dt.timezone(dt.timedelta(hours=1))
BOOL, INT, DOUBLE, STRING, BINARY = pa.bool_(), pa.int64(), pa.float64(), pa.string(), pa.binary()
STRUCT_AB = pa.struct([("a", pa.int64()), ("b", pa.int64())])

# (value, run type, the converted value or ERROR); the ones marked "lossy" were converted before the fix.
PAIRS = [
    # into bool: bools, and the numbers equal to a bool (0 and 1) only
    (True, BOOL, True),
    (0, BOOL, False),
    (1, BOOL, True),
    (0.0, BOOL, False),
    (1.0, BOOL, True),
    (np.int64(1), BOOL, True),
    (2, BOOL, ERROR),  # lossy: was True
    (-1, BOOL, ERROR),  # lossy: was True
    (0.5, BOOL, ERROR),  # lossy: was True
    (math.nan, BOOL, ERROR),  # lossy: was True
    (math.inf, BOOL, ERROR),  # lossy: was True
    (2**53 + 1, BOOL, ERROR),  # lossy: was True
    (np.int64(2), BOOL, ERROR),  # lossy: was True
    ("true", BOOL, ERROR),
    # into int64: ints, and floats that are integral
    (7, INT, 7),
    (2.0, INT, 2),
    (-0.0, INT, 0),
    (1e16, INT, 10**16),
    (Decimal("2"), INT, 2),
    (0.5, INT, ERROR),
    (math.nan, INT, ERROR),
    (1e30, INT, ERROR),
    (2**70, INT, ERROR),
    (True, INT, ERROR),
    ("1", INT, ERROR),
    (dt.datetime(2020, 1, 1), INT, ERROR),  # lossy: was its microseconds since 1970
    (dt.timedelta(seconds=1), INT, ERROR),  # lossy: was 1000000
    # into double: numbers a double holds exactly
    (1, DOUBLE, 1.0),
    (-1, DOUBLE, -1.0),
    (2**53, DOUBLE, float(2**53)),
    (0.1, DOUBLE, 0.1),
    (np.float32(0.5), DOUBLE, 0.5),
    (Decimal("2.5"), DOUBLE, 2.5),
    (2**53 + 1, DOUBLE, ERROR),
    (Decimal("0.1"), DOUBLE, ERROR),  # lossy: was 0.1, which is not 1/10
    (False, DOUBLE, ERROR),
    ("0.5", DOUBLE, ERROR),
    # into string: ints, floats, decimals and bools as Arrow writes them, UTF-8 bytes; nothing is parsed
    ("x", STRING, "x"),
    (1, STRING, "1"),
    (2**53 + 1, STRING, "9007199254740993"),
    (2**63 - 1, STRING, "9223372036854775807"),
    (2**63, STRING, "9223372036854775808"),  # was an error row: Arrow holds no int beyond int64
    (-(2**63) - 1, STRING, "-9223372036854775809"),
    (2**70, STRING, "1180591620717411303424"),
    (0.1, STRING, "0.1"),
    (1.0, STRING, "1"),
    (-0.0, STRING, "-0"),
    (1e16, STRING, "1e+16"),
    (1e15, STRING, "1000000000000000"),  # was "1e+15": a whole double up to 2**53 reads as the int would
    (float(2**53), STRING, "9007199254740992"),
    (-123456789012345.0, STRING, "-123456789012345"),
    (1e-7, STRING, "1e-7"),
    (5e-324, STRING, "5e-324"),
    (1.7976931348623157e308, STRING, "1.7976931348623157e+308"),
    (0.30000000000000004, STRING, "0.30000000000000004"),
    (math.nan, STRING, "nan"),
    (-math.inf, STRING, "-inf"),
    (Decimal("0.10"), STRING, "0.10"),
    (True, STRING, "true"),
    (False, STRING, "false"),
    (b"ab", STRING, "ab"),
    (b"\xff", STRING, ERROR),
    (dt.timedelta(seconds=1), STRING, ERROR),  # lossy: was "1000000", the unit gone
    (dt.datetime(2020, 1, 1, 12, tzinfo=PLUS1), STRING, "2020-01-01 12:00:00.000000+0100"),
    (dt.datetime(2020, 1, 1, 12, 0, 0, 5), STRING, "2020-01-01 12:00:00.000005"),
    (dt.date(2020, 1, 1), STRING, "2020-01-01"),
    (dt.time(12, 1), STRING, "12:01:00.000000"),
    ([1], STRING, ERROR),
    ({"a": 1}, STRING, ERROR),
    # into binary: bytes only
    (b"ab", BINARY, b"ab"),
    ("ab", BINARY, ERROR),
    # lists: element by element, by the same rules
    ([1, None, 2], pa.list_(DOUBLE), [1.0, None, 2.0]),
    ([], pa.list_(INT), []),
    ([1, 0], pa.list_(BOOL), [True, False]),
    ([1, 2.5], pa.list_(STRING), ["1", "2.5"]),
    ([True], pa.list_(STRING), ["true"]),
    (np.array([1, 2]), pa.list_(DOUBLE), [1.0, 2.0]),
    ([[1], []], pa.list_(pa.list_(DOUBLE)), [[1.0], []]),
    ([2, 0], pa.list_(BOOL), ERROR),  # lossy: was [True, False]
    ([0.5], pa.list_(BOOL), ERROR),  # lossy: was [True]
    (["1"], pa.list_(INT), ERROR),  # lossy: the string was parsed, was [1]
    (["01"], pa.list_(DOUBLE), ERROR),  # lossy: was [1.0]
    (["yes"], pa.list_(BOOL), ERROR),
    ([True], pa.list_(INT), ERROR),  # lossy: was [1]; a bool is no number, as outside a list
    ([0.5], pa.list_(INT), ERROR),
    ([[2]], pa.list_(pa.list_(BOOL)), ERROR),  # lossy: was [[True]]
    (1, pa.list_(INT), ERROR),
    # structs: by field name, whatever the dict's key order; a missing field is null, an extra one an error
    ({"a": 1, "b": 2}, STRUCT_AB, {"a": 1, "b": 2}),
    ({"b": 2, "a": 1}, STRUCT_AB, {"a": 1, "b": 2}),
    ({"a": 1}, STRUCT_AB, {"a": 1, "b": None}),
    ({}, STRUCT_AB, {"a": None, "b": None}),
    ({"a": 1}, pa.struct([("a", DOUBLE)]), {"a": 1.0}),
    ({"a": 1, "c": 3}, STRUCT_AB, ERROR),  # lossy: c was dropped
    ({"a": 2}, pa.struct([("a", BOOL)]), ERROR),  # lossy: was {"a": True}
    ({"a": "1"}, STRUCT_AB, ERROR),  # lossy: was {"a": 1, "b": None}
    ([{"a": 1}, {"c": 3}], pa.list_(STRUCT_AB), ERROR),  # lossy: c was dropped
    # timestamps, dates, durations: only into their own kind, the same instant
    (dt.datetime(2020, 1, 1, 12), pa.timestamp("us"), dt.datetime(2020, 1, 1, 12)),
    (
        dt.datetime(2020, 1, 1, 12, tzinfo=PLUS1),
        pa.timestamp("us", tz="UTC"),
        dt.datetime(2020, 1, 1, 11, tzinfo=UTC),
    ),
    (dt.datetime(2020, 1, 1, 12), pa.timestamp("us", tz="UTC"), ERROR),  # lossy: a naive time read as UTC
    (dt.datetime(2020, 1, 1, 12, tzinfo=PLUS1), pa.timestamp("us"), ERROR),  # lossy: was 11:00, no zone
    (dt.datetime(2020, 1, 1, 12), pa.date32(), ERROR),  # lossy: the time of day was dropped
    (dt.date(2020, 1, 1), pa.timestamp("us"), ERROR),  # was midnight
    (5, pa.timestamp("us"), ERROR),  # lossy: was 1970-01-01 00:00:00.000005
    (5, pa.duration("us"), ERROR),  # lossy: was 5 microseconds
    (0.1, pa.decimal128(1, 1), ERROR),  # lossy: was Decimal("0.1")
    (0.5, pa.decimal128(1, 1), Decimal("0.5")),
]


@pytest.mark.parametrize(("value", "type_", "expected"), PAIRS, ids=[f"{v!r}->{t}" for v, t, _ in PAIRS])
def test_a_value_converts_to_a_column_type_only_if_it_keeps_the_value_exactly(value, type_, expected):
    if expected is ERROR:
        with pytest.raises(ValueError):
            convert(value, type_)
        return
    converted = convert(value, type_)
    assert converted == expected or (converted != converted and expected != expected)
    assert type(converted) is type(expected)


def test_none_converts_to_none_in_every_column():
    for type_ in {t for _, t, _ in PAIRS}:
        assert convert(None, type_) is None


def test_a_lossy_value_is_that_rows_error_naming_the_value_and_what_it_would_have_been():
    rows = [
        {"id": str(i), "source_index": i, "prompt": "p", "ok": v}
        for i, v in enumerate([True, 1, 2, 0.5, None])
    ]
    column = {"ok": RunColumn("ok", BOOL, "declared by m.f", 0)}
    kept, bad, proposals = conform_rows(rows, column, shard=0, callable_name="m.f")
    assert not proposals
    assert [(r["id"], r["ok"]) for r in kept] == [("0", True), ("1", True), ("4", None)]
    assert [r["id"] for r, _ in bad] == ["2", "3"]
    reason = bad[0][1]
    assert reason.startswith(
        "m.f returned 2 (int) for column 'ok', which is bool in this run (declared by m.f): "
    )
    assert "2 is not exactly a bool value: it would be True" in reason
    assert "declare the column's type" in reason
