"""Exact pricing of a usage record under a rate table.

Token costs are integer atto-USD (1e-18): unit prices are whole atto-USD per
token by construction (the checker refuses others), so a request's cost is a
sum of integer products. The enforcement cost is that total rounded **up** to
the nano-USD. Invoices use each line's exact ``Decimal`` unit price instead.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping
from dataclasses import dataclass
from decimal import Decimal

from policy.model import (
    ATTO_PER_NANO,
    ATTO_PER_USD,
    METERS,
    ModelRates,
    PriceSheet,
    RateTable,
    atto_to_usd,
)

__all__ = [
    "SERVICE_TIERS", "SPEEDS", "TOOL_FIELDS", "Cost", "Line", "Usage", "modifiers_for",
    "price", "resolve_model",
]

SERVICE_TIERS = ("standard", "batch", "priority")
SPEEDS = ("standard", "fast")
#: Tool name in a rate table -> the usage field that counts it.
TOOL_FIELDS = {"web_search": "web_search_requests", "web_fetch": "web_fetch_requests",
               "code_execution": "code_execution_seconds"}
_TOKENS_PER_MTOK = 10**6


@dataclass(slots=True)  # not frozen: built per request, frozen init is 4x slower
class Usage:
    """What one request used (or, for Authorize, is estimated to use)."""

    input_tokens: int = 0
    output_tokens: int = 0
    cache_write_5m_tokens: int = 0
    cache_write_1h_tokens: int = 0
    cache_read_tokens: int = 0
    web_search_requests: int = 0
    web_fetch_requests: int = 0
    code_execution_seconds: int = 0

    def tokens(self) -> tuple[int, int, int, int, int]:
        """Token counts in :data:`~policy.model.METERS` order."""
        return (self.input_tokens, self.output_tokens, self.cache_write_5m_tokens,
                self.cache_write_1h_tokens, self.cache_read_tokens)

    @property
    def prompt_tokens(self) -> int:
        """The prompt as prompt-length tiers measure it: input, cache reads and writes."""
        return (self.input_tokens + self.cache_read_tokens + self.cache_write_5m_tokens
                + self.cache_write_1h_tokens)


@dataclass(slots=True)  # not frozen: built per request, frozen init is 4x slower
class Line:
    """One priced meter of a request: ``quantity`` at ``unit_usd`` per ``per`` units."""

    meter: str  # a token meter, or "tool:web_search"
    quantity: int
    unit_usd: Decimal
    per: int
    atto: int  # cost in atto-USD (tokens exact; time-priced tools rounded up)
    free: int = 0  # part of quantity covered by a free allowance

    @property
    def usd(self) -> Decimal:
        """The exact cost of this line in USD."""
        return atto_to_usd(self.atto)


@dataclass(slots=True)  # not frozen: built per request, frozen init is 4x slower
class Cost:
    """The price of a request: its lines, exact total and enforcement nanos."""

    model: str  # canonical model name (the fallback's name when priced by fallback)
    priced: bool
    lines: tuple[Line, ...]
    atto: int
    nanos: int  # atto rounded up to the nano-USD
    tier: int  # the prompt-length tier threshold used (0: base prices)
    modifiers: tuple[str, ...]  # e.g. ("batch 50% off", "geo us 1.1x")
    fallback: bool = False

    @property
    def usd(self) -> Decimal:
        """The exact cost in USD (a decimal shift: exact at any size)."""
        return atto_to_usd(self.atto)

    @property
    def label(self) -> str:
        """A stable description of the price line's conditions."""
        parts = list(self.modifiers)
        if self.tier:
            parts.append(f"prompt > {self.tier:,}")
        return ", ".join(parts) or "standard"


def resolve_model(table: RateTable, name: str) -> tuple[ModelRates | None, bool]:
    """The model ``name`` (or alias) means, and whether the fallback stood in."""
    model = table.models.get(name)
    if model is not None:
        return model, False
    if table.fallback is not None:
        return table.models[table.fallback], True
    return None, False


def modifiers_for(table: RateTable, model: ModelRates, service_tier: str, speed: str,
                  geo: str) -> tuple[Decimal, tuple[str, ...]]:
    """The combined multiplier for a request's tier, speed and region, and its parts."""
    factor = Decimal(1)
    applied: list[str] = []
    mods = []
    if service_tier == "batch":
        mods.append(table.batch)
    elif service_tier == "priority":
        mods.append(table.speeds.get("priority"))
    if speed == "fast":
        mods.append(table.speeds.get("fast"))
    if geo:
        mods.append(table.geos.get(geo))
    for mod in mods:
        if mod is not None and mod.applies_to(model):
            factor *= mod.factor
            region = f" {mod.region}" if mod.region else ""
            applied.append(f"{mod.kind}{region} {mod.text}")
    return factor, tuple(applied)


_scaled: dict[tuple[int, Decimal], tuple[PriceSheet, tuple[int, ...], tuple[Decimal, ...]]] = {}


def _scale(sheet: PriceSheet, factor: Decimal) -> tuple[tuple[int, ...], tuple[Decimal, ...]]:
    """Atto-per-token and USD-per-MTok prices of ``sheet`` times ``factor`` (cached)."""
    if factor == 1:
        return sheet.atto_per_token, sheet.usd_per_mtok
    key = (id(sheet), factor)
    hit = _scaled.get(key)
    if hit is not None and hit[0] is sheet:
        return hit[1], hit[2]
    atto = tuple(int(a * factor) for a in sheet.atto_per_token)
    usd = tuple(u * factor for u in sheet.usd_per_mtok)
    if len(_scaled) > 65536:
        _scaled.clear()
    _scaled[key] = (sheet, atto, usd)
    return atto, usd


_mods: dict[tuple[int, str, str, str, str],
            tuple[RateTable, Decimal, tuple[str, ...]]] = {}


def _modifiers_cached(table: RateTable, model: ModelRates, service_tier: str, speed: str,
                      geo: str) -> tuple[Decimal, tuple[str, ...]]:
    """:func:`modifiers_for`, memoised per table object (the hot path prices often)."""
    key = (id(table), model.name, service_tier, speed, geo)
    hit = _mods.get(key)
    if hit is not None and hit[0] is table:
        return hit[1], hit[2]
    factor, applied = modifiers_for(table, model, service_tier, speed, geo)
    if len(_mods) > 65536:
        _mods.clear()
    _mods[key] = (table, factor, applied)
    return factor, applied


def price(table: RateTable, model_name: str, usage: Usage, at: dt.datetime, *,
          service_tier: str = "standard", speed: str = "standard", geo: str = "",
          free_remaining: Mapping[str, int] | None = None, detail: bool = True) -> Cost:
    """The exact cost of ``usage`` on ``model_name`` at time ``at``.

    A model the table does not know (and no fallback) gives an unpriced cost of
    zero: usage that happened is still recorded by the ledger. ``free_remaining``
    is each tool's unused free allowance for the org this month. With
    ``detail=False`` the token lines are left out (the totals are the same):
    that is what the Authorize hot path needs.
    """
    model, fallback = resolve_model(table, model_name)
    if model is None:
        return Cost(model_name, False, (), 0, 0, 0, ())
    factor, applied = _modifiers_cached(table, model, service_tier, speed, geo)
    tier, sheet = model.period_at(at).sheet_for(usage.prompt_tokens)
    atto_prices, usd_prices = _scale(sheet, factor)
    lines: list[Line] = []
    tokens = usage.tokens()
    if not detail:
        total = (tokens[0] * atto_prices[0] + tokens[1] * atto_prices[1]
                 + tokens[2] * atto_prices[2] + tokens[3] * atto_prices[3]
                 + tokens[4] * atto_prices[4])
    else:
        total = 0
        for meter, quantity, atto, usd in zip(METERS, tokens, atto_prices, usd_prices,
                                              strict=True):
            if quantity:
                cost = quantity * atto
                total += cost
                lines.append(Line(meter, quantity, usd, _TOKENS_PER_MTOK, cost))
    if usage.web_search_requests or usage.web_fetch_requests or usage.code_execution_seconds:
        for tool_line in _tool_lines(table, usage, free_remaining or {}):
            total += tool_line.atto
            if detail:
                lines.append(tool_line)
    nanos = -(-total // ATTO_PER_NANO)
    return Cost(model.name, True, tuple(lines), total, nanos, tier, applied, fallback)


def _tool_lines(table: RateTable, usage: Usage, free_remaining: Mapping[str, int]) -> list[Line]:
    lines = []
    for tool, field in TOOL_FIELDS.items():
        quantity = getattr(usage, field)
        if not quantity:
            continue
        rate = table.tools.get(tool)
        if rate is None:
            lines.append(Line(f"tool:{tool}", quantity, Decimal(0), 1, 0))
            continue
        free = min(quantity, max(free_remaining.get(tool, 0), 0)) if rate.free_per_month else 0
        units = rate.usage_units_per_price
        numerator = (quantity - free) * int(rate.usd * ATTO_PER_USD)
        atto = -(-numerator // units)
        lines.append(Line(f"tool:{tool}", quantity, rate.usd, units, atto, free))
    return lines
