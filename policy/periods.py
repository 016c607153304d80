"""Billing periods: calendar months (and days) in an org's time zone.

Counters are keyed by period, so a new month needs no job: the first request
of the month simply finds empty counters.
"""

from __future__ import annotations

import datetime as dt
import re
from dataclasses import dataclass
from zoneinfo import ZoneInfo

__all__ = ["Calendar", "calendar", "day_key", "month_bounds", "parse_period", "period_key"]


def period_key(when: dt.datetime, tz: ZoneInfo) -> str:
    """``"2026-11"``: the month ``when`` falls in, in time zone ``tz``."""
    local = when.astimezone(tz)
    return f"{local.year:04d}-{local.month:02d}"


def day_key(when: dt.datetime, tz: ZoneInfo) -> str:
    """``"2026-11-28"``: the local day of ``when`` in ``tz``."""
    local = when.astimezone(tz)
    return f"{local.year:04d}-{local.month:02d}-{local.day:02d}"


_PERIOD = re.compile(r"[0-9]{4}-[0-9]{2}")


def parse_period(period: str) -> tuple[int, int]:
    """``"2026-11"`` to ``(2026, 11)``; ValueError unless exactly that canonical form."""
    if not _PERIOD.fullmatch(period):
        raise ValueError(f"period must look like 2026-11, not {period!r}")
    year, month = int(period[:4]), int(period[5:])
    if not (1970 <= year <= 9999 and 1 <= month <= 12):
        raise ValueError(f"period must look like 2026-11, not {period!r}")
    return year, month


def month_bounds(period: str, tz: ZoneInfo) -> tuple[dt.datetime, dt.datetime]:
    """The UTC start and end (exclusive) of a month in ``tz``."""
    year, month = parse_period(period)
    start = dt.datetime(year, month, 1, tzinfo=tz)
    end = dt.datetime(year + month // 12, month % 12 + 1, 1, tzinfo=tz)
    return start.astimezone(dt.UTC), end.astimezone(dt.UTC)


@dataclass(frozen=True, slots=True)
class Calendar:
    """The month and day an instant falls in, for one time zone, and when they end."""

    period: str  # "2026-11"
    day: str  # "2026-11-28"
    resets_at: dt.datetime  # end of the month (UTC)
    day_start: dt.datetime  # this local day, in UTC: [day_start, day_end)
    day_end: dt.datetime


_calendars: dict[str, Calendar] = {}


def calendar(when: dt.datetime, tz: ZoneInfo) -> Calendar:
    """The :class:`Calendar` of ``when`` in ``tz``, reused while the local day lasts.

    Time-zone arithmetic costs microseconds; the hot path asks many times a
    day for the same answer, so the last day per zone is kept.
    """
    key = str(tz.key)
    hit = _calendars.get(key)
    if hit is not None and hit.day_start <= when < hit.day_end:
        return hit
    local = when.astimezone(tz)
    start_local = dt.datetime(local.year, local.month, local.day, tzinfo=tz)
    next_day = start_local.date() + dt.timedelta(days=1)
    end_local = dt.datetime(next_day.year, next_day.month, next_day.day, tzinfo=tz)
    period = f"{local.year:04d}-{local.month:02d}"
    found = Calendar(period, f"{period}-{local.day:02d}", month_bounds(period, tz)[1],
                     start_local.astimezone(dt.UTC), end_local.astimezone(dt.UTC))
    _calendars[key] = found
    return found
