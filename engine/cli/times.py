"""Times as operators type them: epoch seconds or ISO 8601 with a UTC offset."""

from __future__ import annotations

import datetime
import math

CLEAR_WORDS = frozenset({"none", "null"})


class TimeFormatError(ValueError):
    """The text is neither epoch seconds nor an ISO 8601 time with an offset."""


def parse_time(text: str) -> float:
    """Epoch seconds from `1764563400`, `1764563400.5` or `2026-12-01T04:30:00+05:30` (or `...Z`)."""
    try:
        seconds = float(text)
    except ValueError:
        pass
    else:
        if not math.isfinite(seconds) or seconds < 0:
            raise TimeFormatError(f"{text!r} is not a time: epoch seconds are 0 or more")
        return seconds
    try:
        moment = datetime.datetime.fromisoformat(text.replace("z", "Z"))
    except ValueError:
        raise TimeFormatError(
            f"{text!r} is not a time: give epoch seconds or ISO 8601 such as 2026-12-01T04:30:00+05:30"
        ) from None
    if moment.tzinfo is None:
        raise TimeFormatError(f"{text!r} has no UTC offset: add one, such as +05:30 or Z")
    return moment.timestamp()


def parse_time_or_clear(text: str) -> float | None:
    """As `parse_time`; the words none and null stand for no time (a window end cleared)."""
    if text.strip().lower() in CLEAR_WORDS:
        return None
    return parse_time(text)


def format_time(seconds: float | None) -> str | None:
    """ISO 8601 in UTC, to the second's fraction the time has."""
    if seconds is None:
        return None
    return datetime.datetime.fromtimestamp(seconds, tz=datetime.UTC).isoformat()
