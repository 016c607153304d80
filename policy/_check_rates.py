"""Semantic checks of rate tables, and the checker's shared plumbing.

:class:`CheckerBase` records diagnostics (with "did you mean" suggestions) and
checks money; :class:`RateChecks` compiles rate tables: models, prices, tiers,
dated changes, modifiers, tools and fallbacks. :mod:`policy._checks` adds plans
and orgs on top.
"""

from __future__ import annotations

import datetime as dt
import itertools
from collections.abc import Callable, Iterable
from decimal import Decimal

from policy import syntax as s
from policy.errors import Diagnostic, Loc, closest
from policy.model import (
    METERS,
    ModelRates,
    Multiplier,
    PricePeriod,
    PriceSheet,
    RateTable,
    ToolRate,
)

__all__ = ["KNOWN_PRODUCTS", "MAX_DIAGNOSTICS", "CheckerBase", "RateChecks", "whole"]

#: Products the provider knows; others are allowed but a near miss is flagged.
KNOWN_PRODUCTS = ("chat", "file_creation", "code_execution", "claude_code")
_ATTO_PER_MTOK_USD = 10**12  # USD per MTok -> atto-USD per token
_UNIT_SECONDS = {"request": 1, "hour": 3600, "minute": 60, "second": 1}
#: Cache meters a model may omit, derived from input as the provider does.
_DERIVED = {"cache_write_5m": Decimal("1.25"), "cache_write_1h": Decimal(2),
            "cache_read": Decimal("0.1")}
_MAX_LIMIT_USD = Decimal(10) ** 9  # a billion dollars a month is a typo
#: The checker stops recording (and searching for suggestions) after this many.
MAX_DIAGNOSTICS = 100


def whole(value: Decimal) -> bool:
    return value == value.to_integral_value()


def _singular(unit: str) -> str:
    return unit[:-1] if unit.endswith("s") else unit



class CheckerBase:
    """Diagnostics and money checks shared by every part of the checker."""

    def __init__(self, trees: Iterable[s.FileNode], line_of: Callable[[Loc], str | None]) -> None:
        self.trees = list(trees)
        self.line_of = line_of
        self.diagnostics: list[Diagnostic] = []
        self._inexact = False  # the model being checked has a price already reported inexact

    def error(self, code: str, message: str, loc: Loc, *notes: str) -> None:
        if len(self.diagnostics) < MAX_DIAGNOSTICS:
            self.diagnostics.append(Diagnostic(code, message, loc, self.line_of(loc),
                                               tuple(notes)))

    def unknown(self, what: str, name: str, loc: Loc, known: Iterable[str]) -> None:
        if len(self.diagnostics) >= MAX_DIAGNOSTICS:
            return  # past the limit: skip the costly "did you mean" search
        known = list(known)
        hint = closest(name, known)
        notes = [f"did you mean {hint}?"] if hint else []
        if not hint and known:
            notes.append("known: " + ", ".join(sorted(known)[:10]))
        self.error(f"unknown-{what.replace(' ', '-')}", f'unknown {what} "{name}"', loc, *notes)

    def _unique(self, kind: str, items: Iterable[tuple[str, Loc]]) -> None:
        seen: dict[str, Loc] = {}
        for name, loc in items:
            if name in seen:
                self.error("duplicate", f'duplicate {kind} "{name}" (first defined at '
                           f"{seen[name]})", loc)
            else:
                seen[name] = loc


    # ------------------------------------------------------------------ money
    def _whole_nanos(self, usd: Decimal, text: str, loc: Loc) -> int:
        scaled = usd * 10**9
        if scaled != scaled.to_integral_value():
            self.error("inexact-amount", f"{text} is not a whole number of nano-USD "
                       "(at most 9 decimal places)", loc)
            return 0
        return int(scaled)

    def limit(self, amount: s.Amount) -> int | None:
        if amount.usd is None:
            return None
        if amount.usd <= 0:
            self.error("limit-not-positive", f"limit {amount.text} must be more than $0",
                       amount.loc)
            return 1
        if amount.usd > _MAX_LIMIT_USD:
            self.error("limit-too-large", f"limit {amount.text} is over $1,000,000,000", amount.loc)
            return 1
        return self._whole_nanos(amount.usd, amount.text, amount.loc) or 1



class RateChecks(CheckerBase):
    """Rate tables: every pricing rule, checked for exactness."""

    # ------------------------------------------------------------------ rate tables
    def _prices(self, prices: Iterable[s.Price], report: bool = True) -> dict[str, s.Price]:
        """Valid prices by meter; each problem reported at its own price."""
        found: dict[str, s.Price] = {}
        for price in prices:
            if price.meter in found:
                if report:
                    self.error("duplicate", f"duplicate price for {price.meter} (first at "
                               f"{found[price.meter].loc})", price.loc)
            elif price.usd < 0:
                if report:
                    self.error("negative-price", f"price {price.text} is negative", price.loc)
            else:
                if not whole(price.usd * _ATTO_PER_MTOK_USD):
                    self._inexact = True
                    if report:
                        self.error("inexact-price", f"{price.meter} price {price.text} / MTok is "
                                   "not a whole number of atto-USD per token (at most 12 decimal "
                                   "places)", price.loc)
                found[price.meter] = price
        return found

    def _sheet(self, usd: dict[str, Decimal], loc: Loc, what: str, report: bool) -> PriceSheet:
        atto = []
        for meter in METERS:
            scaled = usd[meter] * _ATTO_PER_MTOK_USD
            if not whole(scaled):
                if report and not self._inexact:
                    self.error("inexact-price", f"{meter} price of {what}, derived from its input "
                               f"price, is ${format(usd[meter], 'f')} / MTok: not a whole number "
                               f"of atto-USD per token; give {meter} explicitly", loc)
                scaled = scaled.to_integral_value()
            atto.append(int(scaled))
        return PriceSheet(tuple(usd[m] for m in METERS), tuple(atto))

    def _complete(self, given: dict[str, Decimal], base: dict[str, Decimal] | None,
                  explicit: set[str], loc: Loc, what: str, report: bool) -> dict[str, Decimal]:
        """Fill meters not given: from ``base``, or cache meters derived from input."""
        usd = dict(given)
        for meter in ("input", "output"):
            if meter not in usd:
                if base is None:
                    if report:
                        self.error("missing-price", f"{what} has no {meter} price", loc)
                    usd[meter] = Decimal(0)
                else:
                    usd[meter] = base[meter]
        for meter, factor in _DERIVED.items():
            if meter not in usd:
                # Cache prices follow the input price unless written out somewhere.
                usd[meter] = (base[meter] if base is not None and meter in explicit
                              else usd["input"] * factor)
        return usd

    def _tiers(self, nodes: Iterable[s.TierNode], base: dict[str, Decimal], explicit: set[str],
               model: str, report: bool) -> tuple[tuple[int, PriceSheet], ...]:
        tiers: dict[int, tuple[int, PriceSheet]] = {}
        for node in nodes:
            threshold = node.threshold
            if threshold <= 0 or not whole(threshold):
                if report:
                    self.error("bad-threshold", f"tier threshold {node.threshold_text} must be a "
                               "positive whole number of tokens", node.loc)
                continue
            key = int(threshold)
            if key in tiers:
                if report:
                    self.error("duplicate", f"duplicate tier over {node.threshold_text} tokens",
                               node.loc)
                continue
            given = {m: p.usd for m, p in self._prices(node.prices, report).items()}
            tier_explicit = explicit | set(given)
            usd = self._complete(given, base, tier_explicit if "input" not in given else set(given),
                                 node.loc, f'the tier of "{model}"', report)
            what = f'"{model}" over {node.threshold_text} tokens'
            tiers[key] = (key, self._sheet(usd, node.loc, what, report))
        return tuple(tiers[k] for k in sorted(tiers))

    def model(self, node: s.ModelNode) -> ModelRates:
        prices = [b for b in node.body if isinstance(b, s.Price)]
        tier_nodes = [b for b in node.body if isinstance(b, s.TierNode)]
        dated = [b for b in node.body if isinstance(b, s.DatedNode)]
        released = [b for b in node.body if isinstance(b, s.Released)]
        retires = [b for b in node.body if isinstance(b, s.Retires)]
        for kind, group in (("released date", released), ("retirement date", retires)):
            for extra in group[1:]:
                self.error("duplicate", f'duplicate {kind} for model "{node.name}"', extra.loc)
        self._inexact = False
        given = {m: p.usd for m, p in self._prices(prices).items()}
        explicit = set(given)
        what = f'model "{node.name}"'
        base_usd = self._complete(given, None, explicit, node.loc, what, True)
        periods = [PricePeriod(None, self._sheet(base_usd, node.loc, what, True),
                               self._tiers(tier_nodes, base_usd, explicit, node.name, True))]
        current_usd, current_tiers = base_usd, tier_nodes
        tiers_reported = True
        seen_dates: dict[dt.date, Loc] = {}
        for block in sorted(dated, key=lambda d: d.date):
            if block.date in seen_dates:
                self.error("duplicate", f"duplicate price change on {block.date}", block.loc)
                continue
            seen_dates[block.date] = block.loc
            changed = {m: p.usd for m, p in
                       self._prices(p for p in block.body if isinstance(p, s.Price)).items()}
            explicit |= set(changed)
            current_usd = self._complete({**{m: current_usd[m] for m in explicit
                                             if m in current_usd}, **changed},
                                         current_usd, explicit, block.loc, what, False)
            block_tiers = [t for t in block.body if isinstance(t, s.TierNode)]
            if block_tiers:
                current_tiers, tiers_reported = block_tiers, False
            start = dt.datetime(block.date.year, block.date.month, block.date.day, tzinfo=dt.UTC)
            periods.append(PricePeriod(
                start, self._sheet(current_usd, block.loc, what, True),
                self._tiers(current_tiers, current_usd, explicit, node.name, not tiers_reported)))
            tiers_reported = True
        retire_at = None
        if retires:
            day = retires[0].date
            retire_at = dt.datetime(day.year, day.month, day.day, tzinfo=dt.UTC)
        return ModelRates(node.name, tuple(a for a, _ in node.aliases),
                          released[0].date if released else None, retire_at, tuple(periods))

    def _filter(self, flt: s.ForModels | s.ForReleased | None,
                models: dict[str, ModelRates]) -> tuple[frozenset[str] | None, dt.date | None]:
        if flt is None:
            return None, None
        if isinstance(flt, s.ForReleased):
            return None, flt.since
        names: set[str] = set()
        for name, loc in flt.names:
            if name in models:
                names.add(models[name].name)
            else:
                self.unknown("model", name, loc, {m.name for m in models.values()})
        return frozenset(names), None

    def _factor(self, value: Decimal, text: str, loc: Loc) -> Decimal:
        if value <= 0 or value > 100:
            self.error("bad-multiplier", f"multiplier {text} must be more than 0x and at most "
                       "100x", loc)
            return Decimal(1)
        return value

    def rate_table(self, node: s.RatesNode) -> RateTable:
        model_nodes = [b for b in node.body if isinstance(b, s.ModelNode)]
        names = [(m.name, m.loc) for m in model_nodes]
        names += [a for m in model_nodes for a in m.aliases]
        self._unique("model name or alias", names)
        models: dict[str, ModelRates] = {}
        for model_node in model_nodes:
            rates = self.model(model_node)
            for name in (rates.name, *rates.aliases):
                models.setdefault(name, rates)
        batch: Multiplier | None = None
        speeds: dict[str, Multiplier] = {}
        geos: dict[str, Multiplier] = {}
        tools: dict[str, ToolRate] = {}
        fallback: str | None = None
        for stmt in node.body:
            if isinstance(stmt, s.Batch):
                if batch is not None:
                    self.error("duplicate", "duplicate batch discount", stmt.loc)
                if not 0 < stmt.percent < 100:
                    self.error("bad-discount", f"batch discount {stmt.text} must be between 0% "
                               "and 100%", stmt.loc)
                flt = self._filter(stmt.models, models)
                batch = Multiplier("batch", (100 - stmt.percent) / 100, f"{stmt.text} off",
                                   None, *flt)
            elif isinstance(stmt, s.SpeedMod):
                if stmt.kind in speeds:
                    self.error("duplicate", f"duplicate {stmt.kind} modifier", stmt.loc)
                factor = self._factor(stmt.factor, stmt.text, stmt.loc)
                speeds[stmt.kind] = Multiplier(stmt.kind, factor, stmt.text, None,
                                               *self._filter(stmt.models, models))
            elif isinstance(stmt, s.Geo):
                if stmt.region in geos:
                    self.error("duplicate", f'duplicate geo modifier "{stmt.region}"', stmt.loc)
                factor = self._factor(stmt.factor, stmt.text, stmt.loc)
                geos[stmt.region] = Multiplier("geo", factor, stmt.text, stmt.region,
                                               *self._filter(stmt.models, models))
            elif isinstance(stmt, s.Tool):
                if stmt.name in tools:
                    self.error("duplicate", f'duplicate tool "{stmt.name}"', stmt.loc)
                tools[stmt.name] = self.tool(stmt)
            elif isinstance(stmt, s.Fallback):
                if fallback is not None:
                    self.error("duplicate", "duplicate fallback", stmt.loc)
                if stmt.model not in models:
                    self.unknown("model", stmt.model, stmt.loc, {m.name for m in models.values()})
                else:
                    fallback = models[stmt.model].name
        table = RateTable(node.name, models, tuple(m.name for m in model_nodes), batch, speeds,
                          geos, tools, fallback)
        self._check_combinations(table, node.loc)
        return table

    def _check_combinations(self, table: RateTable, loc: Loc) -> None:
        """Every modifier combination must still give whole atto-USD per token."""
        mods = [table.batch, *table.speeds.values(), *table.geos.values()]
        for name in table.canonical:
            model = table.models[name]
            applicable = [m for m in mods if m is not None and m.applies_to(model)]
            for count in range(1, len(applicable) + 1):
                for combo in itertools.combinations(applicable, count):
                    factor = Decimal(1)
                    for mod in combo:
                        factor *= mod.factor
                    for period in model.periods:
                        for sheet in (period.base, *(t for _, t in period.tiers)):
                            for meter, atto in zip(METERS, sheet.atto_per_token, strict=True):
                                scaled = atto * factor
                                if scaled != scaled.to_integral_value():
                                    kinds = " + ".join(
                                        f"{m.kind} {m.text}" if m.kind != "batch" else
                                        f"batch {m.text}" for m in combo)
                                    self.error("inexact-price", f'{meter} of "{name}" under '
                                               f"{kinds} is not a whole number of atto-USD per "
                                               "token", loc)
                                    return

    def tool(self, node: s.Tool) -> ToolRate:
        unit = _singular(node.unit)
        if node.per <= 0 or node.per != node.per.to_integral_value():
            self.error("bad-tool", f"tool price must be per a positive whole number of {node.unit}",
                       node.loc)
        atto = node.usd * 10**18
        if node.usd < 0 or atto != atto.to_integral_value():
            self.error("inexact-price", f"tool price {node.price_text} must be a non-negative "
                       "whole number of atto-USD", node.loc)
        seconds = _UNIT_SECONDS[unit] if unit != "request" else 1
        free = 0
        if node.allowance is not None:
            allowance = node.allowance
            a_unit = _singular(allowance.unit)
            if (a_unit == "request") != (unit == "request"):
                self.error("bad-allowance", f"allowance in {allowance.unit} does not match a "
                           f"price per {node.unit}", allowance.loc)
            else:
                free_units = allowance.quantity * _UNIT_SECONDS[a_unit]
                if free_units < 0 or free_units != free_units.to_integral_value():
                    self.error("bad-allowance", "allowance must be a whole number of "
                               f"{'requests' if unit == 'request' else 'seconds'}", allowance.loc)
                else:
                    free = int(free_units)
        return ToolRate(node.name, node.usd, int(node.per) if node.per > 0 else 1, unit,
                        seconds, free)

