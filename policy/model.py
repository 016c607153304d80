"""The compiled policy: immutable, validated, ready for the hot path.

:mod:`policy.compile` builds these from syntax trees after every check has
passed. Money is exact: limits are integer nano-USD, unit prices are exact
``Decimal`` USD with an integer atto-USD (1e-18) per-unit twin that the hot
path multiplies, so pricing never touches a float.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field
from decimal import Decimal
from zoneinfo import ZoneInfo

from policy.syntax import TestNode

__all__ = [
    "ATTO_PER_NANO", "ATTO_PER_USD", "METERS", "NANOS_PER_USD", "AddonDef", "MemberDef",
    "ModelRates", "Multiplier", "OrgPolicy", "Plan", "Policy", "PricePeriod", "PriceSheet",
    "RateTable", "ToolRate", "UserTypeDef", "atto_to_usd", "format_usd", "nanos_to_usd",
    "usd_text", "usd_to_nanos",
]

#: The five token meters, in the order price tuples use.
METERS: tuple[str, ...] = ("input", "output", "cache_write_5m", "cache_write_1h", "cache_read")
NANOS_PER_USD = 10**9
ATTO_PER_USD = 10**18
ATTO_PER_NANO = 10**9
TOKENS_PER_MTOK = 10**6


def atto_to_usd(atto: int) -> Decimal:
    """Integer atto-USD as exact USD, without trailing zeros (a decimal shift, any size)."""
    text = format(Decimal(atto).scaleb(-18).normalize(), "f")
    return Decimal(text)


def nanos_to_usd(nanos: int) -> Decimal:
    """Integer nano-USD as exact USD, without trailing zeros."""
    return Decimal(format(Decimal(nanos).scaleb(-9).normalize(), "f"))


def format_usd(nanos: int) -> str:
    """Nano-USD as exact dollars for people, at least two decimals: ``$0.105``, ``$1,234.50``."""
    sign = "-" if nanos < 0 else ""
    whole, frac = divmod(abs(nanos), NANOS_PER_USD)
    digits = f"{frac:09d}".rstrip("0").ljust(2, "0")
    return f"{sign}${whole:,}.{digits}"


def usd_text(nanos: int) -> str:
    """Nano-USD as an exact plain decimal string for machines: ``"0.8"``, ``"0.000000001"``."""
    return format(nanos_to_usd(nanos), "f")


def usd_to_nanos(usd: Decimal) -> int:
    """Exact USD to integer nano-USD (callers have checked it is whole)."""
    return int(usd * NANOS_PER_USD)


@dataclass(frozen=True, slots=True)
class PriceSheet:
    """One set of token prices: USD per MTok (display) and atto-USD per token."""

    usd_per_mtok: tuple[Decimal, ...]  # indexed like METERS
    atto_per_token: tuple[int, ...]  # indexed like METERS


@dataclass(frozen=True, slots=True)
class PricePeriod:
    """The prices of a model from ``start`` (UTC) until the next period."""

    start: dt.datetime | None
    base: PriceSheet
    #: (threshold, sheet), ascending: a prompt over ``threshold`` tokens uses ``sheet``.
    tiers: tuple[tuple[int, PriceSheet], ...]

    def sheet_for(self, prompt_tokens: int) -> tuple[int, PriceSheet]:
        """The tier threshold (0 for base) and the sheet for a prompt of this size."""
        chosen: tuple[int, PriceSheet] = (0, self.base)
        for threshold, sheet in self.tiers:
            if prompt_tokens > threshold:
                chosen = (threshold, sheet)
        return chosen


@dataclass(frozen=True, slots=True)
class ModelRates:
    """A model's prices over time, its aliases and lifecycle dates."""

    name: str
    aliases: tuple[str, ...]
    released: dt.date | None
    retires: dt.datetime | None  # UTC; from this instant the model is not allowed
    periods: tuple[PricePeriod, ...]  # ascending by start; the first starts at None

    def period_at(self, when: dt.datetime) -> PricePeriod:
        """The price period in force at ``when`` (aware datetime)."""
        current = self.periods[0]
        for period in self.periods[1:]:
            if period.start is not None and when >= period.start:
                current = period
            else:
                break
        return current


@dataclass(frozen=True, slots=True)
class Multiplier:
    """A modifier on every token meter: batch discount, fast/priority, geo."""

    kind: str  # "batch", "fast", "priority", "geo"
    factor: Decimal  # 0.5 for "batch 50% off"
    text: str
    region: str | None = None
    models: frozenset[str] | None = None  # canonical names; None: all models
    released_since: dt.date | None = None

    def applies_to(self, model: ModelRates) -> bool:
        """Whether this modifier prices ``model``."""
        if self.models is not None and model.name not in self.models:
            return False
        if self.released_since is not None:
            return model.released is not None and model.released >= self.released_since
        return True


@dataclass(frozen=True, slots=True)
class ToolRate:
    """A tool fee: ``usd`` per ``per`` units; usage is counted in ``usage_unit``."""

    name: str
    usd: Decimal
    per: int  # price is for this many units (1000 requests, 1 hour)
    unit: str  # "request" or "hour" (as written, singular)
    seconds_per_unit: int  # usage of time-priced tools comes in seconds; 1 for counts
    free_per_month: int  # free usage per org per month, in usage units (0: none)

    @property
    def usage_units_per_price(self) -> int:
        """How many usage units (requests or seconds) the price covers."""
        return self.per * self.seconds_per_unit


@dataclass(frozen=True, slots=True)
class RateTable:
    """A named rate table: models (by name and alias), modifiers and tools."""

    name: str
    models: dict[str, ModelRates]  # every name and alias -> model
    canonical: tuple[str, ...]  # model names in source order
    batch: Multiplier | None
    speeds: dict[str, Multiplier]  # "fast", "priority"
    geos: dict[str, Multiplier]  # region -> multiplier
    tools: dict[str, ToolRate]
    fallback: str | None


@dataclass(frozen=True, slots=True)
class UserTypeDef:
    """A user type of a plan: its seat fee and the products it may use."""

    name: str
    seat_usd: Decimal
    products: frozenset[str]


@dataclass(frozen=True, slots=True)
class AddonDef:
    """An add-on seat (HIPAA): its fee and the user types it attaches to."""

    name: str
    seat_usd: Decimal
    for_types: frozenset[str]


@dataclass(frozen=True, slots=True)
class Plan:
    """A plan: its user types and add-ons."""

    name: str
    user_types: dict[str, UserTypeDef]
    addons: dict[str, AddonDef]


@dataclass(frozen=True, slots=True)
class MemberDef:
    """A user as the policy sees them, limits resolved (None: unlimited)."""

    user: str
    user_type: str
    addons: tuple[str, ...]
    month_limit: int | None  # nano-USD
    day_limit: int | None  # nano-USD
    listed: bool  # False for users covered by ``default user_type``


@dataclass(frozen=True, slots=True)
class OrgPolicy:
    """An organisation's compiled policy."""

    name: str
    plan: Plan
    rates: RateTable
    timezone: str
    tz: ZoneInfo
    limit: int | None  # nano-USD per month
    type_limits: dict[str, int | None]  # user type -> nano-USD per month (absent: unlimited)
    default_user_limit: int | None
    default_user_type: str | None
    members: dict[str, MemberDef]
    thresholds: tuple[Decimal, ...]  # percents, ascending
    webhook: str | None
    shadow: bool
    per_user_metrics: bool
    grace_days: int

    def member(self, user: str) -> MemberDef | None:
        """The member entry for ``user``, or the default for unlisted users."""
        found = self.members.get(user)
        if found is not None:
            return found
        if self.default_user_type is None:
            return None
        return MemberDef(user, self.default_user_type, (), self.default_user_limit, None, False)


@dataclass(frozen=True, slots=True)
class Policy:
    """A whole compiled policy set: every org, table and plan, and its tests."""

    orgs: dict[str, OrgPolicy]
    rate_tables: dict[str, RateTable]
    plans: dict[str, Plan]
    version: str  # content hash of every source file
    files: tuple[str, ...]
    tests: tuple[TestNode, ...] = field(default=())  # run by policy.testing
