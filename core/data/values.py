"""Parsing the values of a table, shared by every loader: titles cleaned onto one line, source ids
and finite numbers from text or typed (Parquet, JSON) values, timestamps from numbers or ISO-8601,
and the column-at-a-time forms of the id and number parsers.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from datetime import date, datetime, timezone
from typing import Any

# Everything that would break a title across lines or columns when it is written back out.
_TITLE_BREAKS = re.compile(r"[\t\n\r\v\f\x1c\x1d\x1e\x85\u2028\u2029]+")


def clean_title(raw: str) -> str:
    """A title on one line: tabs and line breaks become spaces (prompts and TSV exports stay intact),
    outer whitespace is dropped; other spacing is kept as written."""
    return _TITLE_BREAKS.sub(" ", raw).strip()


def as_id(value: Any) -> str | None:
    """A source id as a string ("12" whether the file held the text "12" or the number 12), or None."""
    if isinstance(value, str):
        return value.strip() or None
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float) and value.is_integer():  # an int column that took a NaN went float
        return str(int(value))
    return None


def as_number(value: Any) -> float | None:
    """A finite number from a number or numeric text, else None."""
    if isinstance(value, bool) or value is None:
        return None
    try:
        number = float(value.strip() if isinstance(value, str) else value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def parse_timestamp(value: Any) -> float | None:
    """Seconds since the epoch from a number, numeric text, an ISO-8601 string or a date/datetime
    (naive ones read as UTC, so that one log mixing forms still orders consistently); else None."""
    number = as_number(value)
    if number is not None:
        return number
    if isinstance(value, str):
        text = value.strip()
        if text[-1:] in ("Z", "z"):  # fromisoformat accepts "Z" only from Python 3.11 on
            text = text[:-1] + "+00:00"
        try:
            value = datetime.fromisoformat(text)
        except ValueError:
            return None
    if isinstance(value, datetime):
        return (value if value.tzinfo else value.replace(tzinfo=timezone.utc)).timestamp()
    if isinstance(value, date):
        return datetime(value.year, value.month, value.day, tzinfo=timezone.utc).timestamp()
    return None


def ids_of(values: list[Any]) -> list[str | None]:
    """`as_id` over a column; text columns (every CSV/TSV one) in one pass."""
    if set(map(type, values)) == {str}:
        return [value.strip() or None for value in values]
    return list(map(as_id, values))


def numbers_of(values: list[Any], parse: Callable[[Any], float | None]) -> list[float | None]:
    """`parse` over a column, after one try at converting the whole column with float() (all finite,
    no booleans); `parse` then runs only on columns holding something else, such as ISO times."""
    if not any(isinstance(value, bool) for value in values):
        try:
            numbers = list(map(float, values))
        except (TypeError, ValueError):
            pass
        else:
            if all(map(math.isfinite, numbers)):
                return numbers  # type: ignore[return-value]
    return list(map(parse, values))
