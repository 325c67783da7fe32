"""A postprocess value converted to its run column's Arrow type, only where that keeps it exactly
(`convert`), the type a column's first values give it (`infer_type`), and the type an inferred column widens
to when it meets other values (`widened_type`). columns.py fixes one type per column for a run and turns a
value that does not convert into an error row.

The widening lattice of inferred columns, over the values Python gives (bool, int, float, str):

    bool  --------------.
    int64 --> double --> string

A column's values give it the least type in it that holds all of them exactly: bools bool, ints int64, ints
and floats double, any other mix of these string (ints beyond 2**63 are string alone: no Arrow integer
type holds them; ints beyond 2**53 mixed with floats are string: a double does not hold them exactly).
`infer_type` gives that type for one shard's values and `widened_type` the type a run's column has once a
later shard's values join it, so the type of a run's column is that of all its values, whichever shard
committed first. Everything else (lists, structs, dates, bytes, decimals) has no place in the lattice: it is
Arrow's type of the first values, and a value that does not convert to it is an error row.
"""

from __future__ import annotations

import datetime as dt
from decimal import Decimal
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

CONVERT_ERRORS = (pa.ArrowException, OverflowError, TypeError, ValueError)
INT64_RANGE = (-(2**63), 2**63 - 1)
DOUBLE_INTS = 2**53  # every int up to this magnitude is a double exactly, not every one beyond


def _kind(value: Any) -> str | None:
    """A value's place in the widening lattice: bool, int, bigint (beyond 2**53, within int64), double,
    string (also an int beyond int64); None for anything else."""
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, int):
        if not INT64_RANGE[0] <= value <= INT64_RANGE[1]:
            return "string"
        return "int" if -DOUBLE_INTS <= value <= DOUBLE_INTS else "bigint"
    if isinstance(value, float):
        return "double"
    if isinstance(value, str):
        return "string"
    return None


# The kinds a column of each lattice type may already hold (what a widening must also hold).
_TYPE_KINDS = {pa.bool_(): {"bool"}, pa.int64(): {"int"}, pa.float64(): {"double"}, pa.string(): {"string"}}


def _join(kinds: set[str]) -> pa.DataType:
    """The least lattice type that holds every value of `kinds` exactly."""
    if kinds <= {"bool"}:
        return pa.bool_()
    if kinds <= {"int", "bigint"}:
        return pa.int64()
    if kinds <= {"int", "double"}:
        return pa.float64()
    return pa.string()


def widened_type(type_: pa.DataType, values: list[Any]) -> pa.DataType | None:
    """The type an inferred column of type `type_` widens to when it meets `values` (non-null), or None
    where it stays: it holds them, or `type_` or a value has no place in the lattice (see the module's
    docstring). An int64 column widens to double on any float (2.0 too: the run's type does not depend on
    whether a shard of ints or one with 2.0 came first) and a bool column to string on a number."""
    if type_ not in _TYPE_KINDS:
        return None
    kinds = {k for k in map(_kind, values) if k is not None}
    target = _join(_TYPE_KINDS[type_] | kinds)
    return None if target == type_ else target


def infer_type(values: list[Any]) -> pa.DataType:
    """The Arrow type of a column's non-null values: where each is a bool, int, float or str, the lattice's
    (see the module's docstring: ints and floats give double, ints and strings string); else Arrow's
    inference over all of them, else the first value's."""
    kinds = {_kind(v) for v in values}
    if values and None not in kinds:
        return _join(kinds)
    try:
        return pa.array(values).type
    except CONVERT_ERRORS:
        return pa.array(values[:1]).type


def convert(value: Any, type_: pa.DataType) -> Any:
    """`value` as a Python value of Arrow type `type_`, only where that keeps the value exactly; raises
    ValueError saying why not.

    Arrow's safe casts check for truncation and overflow but not for every loss: a number cast to bool is
    True unless 0 (2, 0.5, NaN), a list of strings is parsed into numbers, a struct drops the fields its type
    lacks, an int becomes a timestamp. So the pair of types must be one of the conversions below (`_refusal`,
    also inside lists and structs), and the converted value must equal the value (`_exact`):

    - a number (int, float, decimal) into another number type: an int into a double column, a float that is
      integral into an int64 column (2.0, not 0.5 or NaN), an int beyond 2**53 not into double;
    - 0 and 1 (or 0.0 and 1.0) into a bool column, no other number; a bool into no number type;
    - an int, float, decimal, bool, timestamp, date or time into a string column, as Arrow writes it ("1",
      "0.5", "1e+16", "nan", "true", "2020-01-01 12:00:00.000000+0100"), except that a float that is a whole
      number up to 2**53 is written as that int ("1" for 1.0, "1000000000000000" for 1e15, where Arrow
      writes "1e+15": `double_text`); an int beyond int64 (which Arrow cannot hold) in decimal, and UTF-8
      bytes; not a duration ("1000000": the unit is lost); a string into nothing else (strings are not
      parsed);
    - a list into a list type, element by element by these rules;
    - a struct into a struct type holding all its fields (missing ones are null), by field name;
    - a timestamp, date, time or duration into its own kind (a naive datetime not into a zoned column; a
      zoned one into another zone's column is the same instant).
    """
    if value is None:
        return None
    if _is_text(type_) and _beyond_int64(value):
        return str(value)  # its decimal digits are exact
    try:
        array = pa.array([value])
        source = array.type
        if source == type_:
            return array[0].as_py()
        why = _refusal(source, type_)
        if why is not None:
            raise ValueError(why)
        if source == pa.float64() and _is_text(type_):
            result = double_text(array).cast(type_)[0].as_py()
        else:
            result = array.cast(type_, safe=True)[0].as_py()
    except CONVERT_ERRORS as e:
        raise ValueError(str(e).splitlines()[0][:200]) from None
    if not _exact(value, result, source, type_):
        raise ValueError(f"{short(value)} is not exactly a {type_} value: it would be {short(result)}")
    return result


def _beyond_int64(value: Any) -> bool:
    return (
        isinstance(value, int)
        and not isinstance(value, bool)
        and not INT64_RANGE[0] <= value <= INT64_RANGE[1]
    )


def double_text(values: pa.Array | pa.ChunkedArray) -> pa.Array | pa.ChunkedArray:
    """Doubles as text: as Arrow writes them ("0.5", "1e+16", "nan", "-0"), but a whole number up to 2**53
    as the int it is ("1000000000000000", not "1e+15"), so an int and the same value as a double give the same
    text (an int written into a double part, then widened to string, reads as it would have directly)."""
    whole = pc.and_(
        pc.and_(pc.equal(pc.floor(values), values), pc.less_equal(pc.abs(values), float(DOUBLE_INTS))),
        pc.not_equal(values, 0.0),  # -0.0 stays "-0"; 0.0 is "0" either way
    )
    ints = pc.if_else(whole, values, 0.0).cast(pa.int64()).cast(pa.string())
    return pc.if_else(whole, ints, values.cast(pa.string()))


def _is_list(type_: pa.DataType) -> bool:
    return pa.types.is_list(type_) or pa.types.is_large_list(type_) or pa.types.is_fixed_size_list(type_)


def _is_text(type_: pa.DataType) -> bool:
    return pa.types.is_string(type_) or pa.types.is_large_string(type_)


def _is_number(type_: pa.DataType) -> bool:
    return pa.types.is_integer(type_) or pa.types.is_floating(type_) or pa.types.is_decimal(type_)


def _is_binary(type_: pa.DataType) -> bool:
    return (
        pa.types.is_binary(type_) or pa.types.is_large_binary(type_) or pa.types.is_fixed_size_binary(type_)
    )


def _is_clock(type_: pa.DataType) -> bool:
    return pa.types.is_timestamp(type_) or pa.types.is_date(type_) or pa.types.is_time(type_)


def _is_textual(type_: pa.DataType) -> bool:
    """Written as text exactly: not a duration ("1000000" has no unit), a list or a struct."""
    return (
        _is_text(type_)
        or _is_number(type_)
        or pa.types.is_boolean(type_)
        or _is_binary(type_)
        or _is_clock(type_)
    )


def _refusal(source: pa.DataType, target: pa.DataType) -> str | None:
    """Why a value of Arrow type `source` is not converted to `target` (None: it is, if `_exact`)."""
    if source == target or pa.types.is_null(source):
        return None
    if _is_list(source) and _is_list(target):
        return _refusal(source.value_type, target.value_type)
    if pa.types.is_struct(source) and pa.types.is_struct(target):
        names = {target.field(i).name for i in range(target.num_fields)}
        for i in range(source.num_fields):
            field = source.field(i)
            if field.name not in names:
                return f"a {source} value is not a {target}: it has no field {field.name!r}"
            why = _refusal(field.type, target.field(field.name).type)
            if why is not None:
                return why
        return None
    allowed = (
        (_is_number(target) and _is_number(source))
        or (pa.types.is_boolean(target) and _is_number(source))
        or (_is_text(target) and _is_textual(source))
        or (_is_binary(target) and _is_binary(source))
        or (pa.types.is_timestamp(target) and pa.types.is_timestamp(source))
        or (pa.types.is_date(target) and pa.types.is_date(source))
        or (pa.types.is_time(target) and pa.types.is_time(source))
        or (pa.types.is_duration(target) and pa.types.is_duration(source))
    )
    return None if allowed else f"a {source} value is not a {target}"


def _exact(value: Any, result: Any, source: pa.DataType, target: pa.DataType) -> bool:
    """Whether `result` (`value` cast from `source` to `target`) is the same value; `_refusal` allowed the pair."""
    if value is None or result is None:
        return value is None and result is None
    if source == target:
        return True
    try:
        if _is_list(target):
            items = list(value)
            return len(items) == len(result) and all(
                _exact(v, r, source.value_type, target.value_type) for v, r in zip(items, result, strict=True)
            )
        if pa.types.is_struct(target):
            fields = {source.field(i).name: source.field(i).type for i in range(source.num_fields)}
            return all(
                _exact(value.get(name), result[name], fields.get(name, pa.null()), target.field(name).type)
                for name in result
            )
        if _is_text(target):
            if pa.types.is_boolean(source):
                return result == ("true" if value else "false")
            if _is_binary(source):
                return result.encode("utf-8") == bytes(value)
            if pa.types.is_floating(source):
                parsed = float(result)
                return parsed == value or (parsed != parsed and value != value)
            if pa.types.is_integer(source):
                return int(result) == value
            if pa.types.is_decimal(source):
                return Decimal(result) == value
            if _is_clock(source):  # "2020-01-01 12:00:00.000000+0100", "2020-01-01", "12:00:00.000000"
                if pa.types.is_timestamp(source):
                    return dt.datetime.fromisoformat(result) == value
                kind = dt.date if pa.types.is_date(source) else dt.time
                return kind.fromisoformat(result) == value
            return result == value
        if pa.types.is_floating(target) and result != result:
            return value != value  # NaN is NaN
        return bool(result == value)  # a number into bool: only 0 and 1 are equal to False and True
    except (TypeError, ValueError, ArithmeticError, AttributeError, KeyError):
        return False


def short(value: Any) -> str:
    """repr(value), cut to 80 characters, for messages."""
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."
