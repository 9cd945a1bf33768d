"""Durations ("5m", "72h", "1h30m") and sending limits ("100/hour", "50/5m") in bulksend.toml.

Both parsers raise ValueError whose message says what was expected, so the config reader can
prefix it with the file and key.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

_UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
_DURATION = re.compile(r"(?:\d+\s*[smhd]\s*)+")
_DURATION_PART = re.compile(r"(\d+)\s*([smhd])")
_DURATION_EXPECTED = ('expected a positive duration like "30s", "5m", "72h", "30d", "1h30m" '
                      "or seconds as an integer")

# Spelled-out periods; anything else after the slash is read as a duration ("5m", "24h").
_PERIOD_NAMES = {
    **dict.fromkeys(("s", "sec", "second", "seconds"), 1),
    **dict.fromkeys(("m", "min", "mins", "minute", "minutes"), 60),
    **dict.fromkeys(("h", "hr", "hour", "hours"), 3600),
    **dict.fromkeys(("d", "day", "days"), 86400),
}
_CALENDAR_UNITS = {60: "minute", 3600: "hour", 86400: "day"}
_LIMIT = re.compile(r"\s*(\d+)\s*/\s*(\S.*?)\s*")
_LIMIT_EXPECTED = 'expected a limit like "100/hour", "500/day" or "50/5m" (count >= 1 per period)'


@dataclass(frozen=True)
class Limit:
    """At most `count` messages per `seconds`; `text` is the limit as the user wrote it."""

    count: int
    seconds: int
    text: str

    @property
    def unit(self) -> str | None:
        """"minute", "hour" or "day" when the period is exactly one; calendar windows need one."""
        return _CALENDAR_UNITS.get(self.seconds)


def parse_duration(value: object) -> int:
    """Seconds in a positive duration: an integer of seconds, "300", "5m", "72h", "1h30m"."""
    if isinstance(value, int) and not isinstance(value, bool):
        seconds = value
    elif isinstance(value, str) and value.strip().isdigit():
        seconds = int(value)
    elif isinstance(value, str) and _DURATION.fullmatch(value.strip()):
        seconds = sum(int(n) * _UNIT_SECONDS[u] for n, u in _DURATION_PART.findall(value))
    else:
        raise ValueError(_DURATION_EXPECTED)
    if seconds <= 0:
        raise ValueError(_DURATION_EXPECTED)
    return seconds


def parse_limit(value: object) -> Limit:
    """A limit written "N/unit" (second, minute, hour, day) or "N/<duration>" ("50/5m")."""
    match = _LIMIT.fullmatch(value) if isinstance(value, str) else None
    if match is None or int(match[1]) < 1:
        raise ValueError(_LIMIT_EXPECTED)
    period = match[2].lower()
    seconds = _PERIOD_NAMES.get(period)
    if seconds is None:
        try:
            seconds = parse_duration(period)
        except ValueError:
            raise ValueError(_LIMIT_EXPECTED) from None
    return Limit(count=int(match[1]), seconds=seconds, text=value.strip())
