"""What the ledger answers, and how those answers are stored for idempotent replay.

The result types are built once per request (plain slots dataclasses: a frozen
dataclass's ``__init__`` is several times slower), and the first answer to each
request id is stored in compact form so a retry gets exactly that answer back.
"""

from __future__ import annotations

import datetime as dt
import time
from dataclasses import dataclass
from typing import Any

from policy.decide import Decision, Level
from policy.pricing import Cost

__all__ = [
    "AuthorizeResult", "Clock", "LevelView", "RecordResult", "SystemClock", "auth_from",
    "auth_json", "auth_result", "rec_from", "rec_json",
]


class Clock:
    """Time as the ledger sees it: wall clock for periods, monotonic for TTLs."""

    def now(self) -> dt.datetime:
        """The current UTC time."""
        raise NotImplementedError

    def monotonic_ns(self) -> int:
        """A monotonic reading (CLOCK_MONOTONIC is shared by processes of one boot)."""
        raise NotImplementedError


class SystemClock(Clock):
    """The real clocks."""

    def now(self) -> dt.datetime:
        return dt.datetime.now(dt.UTC)

    def monotonic_ns(self) -> int:
        return time.monotonic_ns()


@dataclass(slots=True)  # not frozen: built per request, frozen init is 4x slower
class LevelView:
    """A level's counters after an operation (nano-USD; limit None = unlimited)."""

    level: str
    scope: str
    limit: int | None
    spent: int
    reserved: int

    @property
    def remaining(self) -> int | None:
        """Headroom left, never negative; None when unlimited."""
        return None if self.limit is None else max(self.limit - self.spent - self.reserved, 0)


@dataclass(slots=True)  # not frozen: built per request, frozen init is 4x slower
class AuthorizeResult:
    """The stored answer to an Authorize."""

    allowed: bool
    reason: str
    message: str
    reserved: int  # nano-USD
    worst_case: int  # nano-USD
    levels: tuple[LevelView, ...]
    max_output_tokens: int | None
    period: str
    resets_at: dt.datetime | None
    expires_at: dt.datetime | None
    policy_version: str
    shadow: bool
    verdict: str
    replayed: bool = False  # True when this is the stored answer to a retry


@dataclass(slots=True)  # not frozen: built per request, frozen init is 4x slower
class RecordResult:
    """The stored answer to a Record."""

    cost: int  # nano-USD charged
    priced: bool
    levels: tuple[LevelView, ...]
    period: str
    late: bool
    policy_version: str
    duplicate: bool = False
    #: The priced cost (lines per meter) of a first settlement; None on replays.
    detail: Cost | None = None
    user_type: str = ""


def _views(levels: tuple[Level, ...], reserve: int) -> tuple[LevelView, ...]:
    return tuple(LevelView(lv.scope.level, lv.scope.name, lv.scope.limit, lv.spent,
                           lv.reserved + reserve) for lv in levels)


def _views_json(views: tuple[LevelView, ...]) -> list[list[Any]]:
    return [[v.level, v.scope, v.limit, v.spent, v.reserved] for v in views]


def _views_from(raw: list[list[Any]]) -> tuple[LevelView, ...]:
    return tuple(LevelView(r[0], r[1], r[2], r[3], r[4]) for r in raw)


def _micros(when: dt.datetime | None) -> int | None:
    if when is None:
        return None
    delta = when - _EPOCH
    return (delta.days * 86_400 + delta.seconds) * 1_000_000 + delta.microseconds


def _from_micros(value: int | None) -> dt.datetime | None:
    return None if value is None else _EPOCH + dt.timedelta(microseconds=value)


_EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)


def auth_result(d: Decision, version: str, expires: dt.datetime | None) -> AuthorizeResult:
    views = _views(d.levels, d.reserve if d.allowed else 0)
    return AuthorizeResult(d.allowed, d.reason, d.message, d.reserve if d.allowed else 0,
                           d.cost.nanos if d.cost is not None else 0, views,
                           d.max_output_tokens, d.period, d.resets_at, expires, version,
                           d.shadow, d.verdict)

def auth_json(r: AuthorizeResult) -> list[Any]:
    """The stored answer as a flat list (times as epoch microseconds: cheap to encode)."""
    return [r.allowed, r.reason, r.message, r.reserved, r.worst_case,
            _views_json(r.levels), r.max_output_tokens, r.period, _micros(r.resets_at),
            _micros(r.expires_at), r.policy_version, r.shadow, r.verdict]

def auth_from(j: list[Any], replayed: bool = False) -> AuthorizeResult:
    return AuthorizeResult(j[0], j[1], j[2], j[3], j[4], _views_from(j[5]), j[6], j[7],
                           _from_micros(j[8]), _from_micros(j[9]), j[10], j[11], j[12],
                           replayed)


def rec_json(r: RecordResult) -> dict[str, Any]:
    return {"c": r.cost, "pr": r.priced, "l": _views_json(r.levels), "p": r.period,
            "late": r.late, "v": r.policy_version}

def rec_from(j: dict[str, Any]) -> RecordResult:
    return RecordResult(j["c"], j["pr"], _views_from(j["l"]), j["p"], j["late"], j["v"])
