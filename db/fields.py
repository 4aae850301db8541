"""What a stored value may be, derived from its table column: one rule for what `kernelhub import`
accepts, what the store writes, and what the readers trust.

A column's type gives the bounds (Integer is 32-bit signed, BigInteger 64-bit, String(n) at most n
characters of printable text, Float finite), its nullability whether None is allowed, and the
field's meaning the sign (`POSITIVE`, `NON_NEGATIVE`). A row read back that breaks a rule is
marked invalid with the reason (`kernelhub show` lists it), never used.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from datetime import datetime, timezone

from sqlalchemy import BigInteger, Column, Float, Integer, String, Text

from kernelhub.db.models import UTCDateTime

# Times are strictly positive (a speedup divides by them); counts and throughputs are not negative.
POSITIVE = frozenset({"median_ms", "p20_ms", "p80_ms", "default_median_ms"})
NON_NEGATIVE = frozenset({"trials", "number", "throughput", "sm_count", "memory_bytes", "shared_memory_bytes"})

_INT_BITS = {BigInteger: 64, Integer: 32}  # BigInteger first: it is a subclass of Integer
_BRIEF = 40  # characters of a bad value quoted in a message
_NULL = "expected a value, not null"


def brief(value: object) -> str:
    """`value` quoted for a one-line message: escaped, and cut short when long."""
    text = ascii(value)
    if len(text) <= _BRIEF:
        return text
    size = f" ({len(value)} characters)" if isinstance(value, str | bytes) else ""
    return f"{text[:_BRIEF]}...{size}"


def normalize(column: Column, value: object) -> object:
    """`value` as `column` stores it (an int for a Float column becomes a float; a datetime, or ISO 8601
    text, becomes an aware UTC datetime); ValueError saying what was expected if it cannot be stored."""
    return rule(column)(value)


@functools.cache
def rule(column: Column) -> Callable[[object], object]:
    """`normalize` for one column, made once (a 60,000-entry import checks a million values)."""
    check = _check(column)
    if not column.nullable:
        return check

    def nullable(value: object) -> object:
        return None if value is None else check(value)

    return nullable


def _check(column: Column) -> Callable[[object], object]:
    kind, name = column.type, column.key
    if isinstance(kind, UTCDateTime):
        return _utc_datetime
    bits = next((b for t, b in _INT_BITS.items() if isinstance(kind, t)), None)
    if bits is not None:
        low, high = (0 if name in NON_NEGATIVE else -(1 << (bits - 1))), (1 << (bits - 1)) - 1

        def integer(value: object) -> int:
            if isinstance(value, bool) or not isinstance(value, int):  # JSON true is no count
                raise ValueError("expected an integer" if value is not None else _NULL)
            if not low <= value <= high:
                raise ValueError(f"expected an integer from {low} to {high}")
            return value

        return integer
    if isinstance(kind, Float):
        positive, non_negative = name in POSITIVE, name in NON_NEGATIVE
        expected = f"expected a finite number{' > 0' if positive else ' >= 0' if non_negative else ''}"

        def number(value: object) -> float:
            if isinstance(value, float):
                result = value
            elif isinstance(value, int) and not isinstance(value, bool):
                try:
                    result = float(value)
                except OverflowError:  # an int too large for a float
                    result = math.inf
            else:
                raise ValueError(expected if value is not None else _NULL)
            if not math.isfinite(result) or (positive and result <= 0) or (non_negative and result < 0):
                raise ValueError(expected)
            return result

        return number
    if isinstance(kind, String):  # Text too: a String without a length
        length = None if isinstance(kind, Text) else kind.length

        def text(value: object) -> str:
            if not isinstance(value, str):
                raise ValueError("expected text" if value is not None else _NULL)
            if length is not None:  # a name or a version; free text (JSON, a failure's reason) is any text
                if len(value) > length:
                    raise ValueError(f"expected at most {length} characters")
                if not value.isprintable():
                    raise ValueError("expected printable text (no control characters)")
            return value

        return text
    raise TypeError(f"no rule for column {name} of type {kind!r}")  # a model change this module missed


def _utc_datetime(value: object) -> datetime:
    """A datetime (the driver's, or ISO 8601 text as SQLite keeps it) as an aware UTC one; naive is UTC."""
    if value is None:
        raise ValueError(_NULL)
    try:
        when = datetime.fromisoformat(value) if isinstance(value, str) else value
        if not isinstance(when, datetime):
            raise TypeError
        return when.replace(tzinfo=timezone.utc) if when.tzinfo is None else when.astimezone(timezone.utc)
    except (TypeError, ValueError, OverflowError):  # OverflowError: a year-1 time east of UTC
        raise ValueError("expected an ISO 8601 time") from None
