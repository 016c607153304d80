"""Billing periods: calendar months (and days) in an org's time zone.

Counters are keyed by period, so a new month needs no job: the first request
of the month simply finds empty counters.
"""

from __future__ import annotations

import datetime as dt
from zoneinfo import ZoneInfo

__all__ = ["day_key", "month_bounds", "parse_period", "period_key"]


def period_key(when: dt.datetime, tz: ZoneInfo) -> str:
    """``"2026-11"``: the month ``when`` falls in, in time zone ``tz``."""
    local = when.astimezone(tz)
    return f"{local.year:04d}-{local.month:02d}"


def day_key(when: dt.datetime, tz: ZoneInfo) -> str:
    """``"2026-11-28"``: the local day of ``when`` in ``tz``."""
    local = when.astimezone(tz)
    return f"{local.year:04d}-{local.month:02d}-{local.day:02d}"


def parse_period(period: str) -> tuple[int, int]:
    """``"2026-11"`` to ``(2026, 11)``; ValueError if it is not a month."""
    try:
        year_text, month_text = period.split("-")
        year, month = int(year_text), int(month_text)
    except ValueError:
        raise ValueError(f"period must look like 2026-11, not {period!r}") from None
    if not (1970 <= year <= 9999 and 1 <= month <= 12) or len(month_text) != 2:
        raise ValueError(f"period must look like 2026-11, not {period!r}")
    return year, month


def month_bounds(period: str, tz: ZoneInfo) -> tuple[dt.datetime, dt.datetime]:
    """The UTC start and end (exclusive) of a month in ``tz``."""
    year, month = parse_period(period)
    start = dt.datetime(year, month, 1, tzinfo=tz)
    end = dt.datetime(year + month // 12, month % 12 + 1, 1, tzinfo=tz)
    return start.astimezone(dt.UTC), end.astimezone(dt.UTC)
