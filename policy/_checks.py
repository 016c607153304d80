"""The semantic checker: syntax trees to a compiled :class:`~policy.model.Policy`.

It resolves names across files (rate tables, plans, orgs), checks references,
duplicates and money, and collects every problem as a diagnostic.
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
    AddonDef,
    MemberDef,
    ModelRates,
    Multiplier,
    OrgPolicy,
    Plan,
    Policy,
    PricePeriod,
    PriceSheet,
    RateTable,
    ToolRate,
    UserTypeDef,
)

__all__ = ["KNOWN_PRODUCTS", "Checker"]

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


def _whole(value: Decimal) -> bool:
    return value == value.to_integral_value()


def _singular(unit: str) -> str:
    return unit[:-1] if unit.endswith("s") else unit


class Checker:
    """Collects definitions from every file, then checks and compiles them."""

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

    # ------------------------------------------------------------------ entry
    def compile(self, version: str) -> Policy:
        rates_nodes = [n for t in self.trees for n in t.body if isinstance(n, s.RatesNode)]
        plan_nodes = [n for t in self.trees for n in t.body if isinstance(n, s.PlanNode)]
        org_nodes = [n for t in self.trees for n in t.body if isinstance(n, s.OrgNode)]
        test_nodes = [n for t in self.trees for n in t.body if isinstance(n, s.TestNode)]
        self._unique("rate table", ((n.name, n.loc) for n in rates_nodes))
        self._unique("plan", ((n.name, n.loc) for n in plan_nodes))
        self._unique("org", ((n.name, n.loc) for n in org_nodes))
        self._unique("test", ((n.name, n.loc) for n in test_nodes))
        tables = {n.name: self.rate_table(n) for n in rates_nodes}
        plans = {n.name: self.plan(n) for n in plan_nodes}
        orgs: dict[str, OrgPolicy] = {}
        for node in org_nodes:
            org = self.org(node, tables, plans)
            if org is not None:
                orgs[node.name] = org
        files = tuple(t.path for t in self.trees)
        return Policy(orgs, tables, plans, version, files, tuple(test_nodes))

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
                if not _whole(price.usd * _ATTO_PER_MTOK_USD):
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
            if not _whole(scaled):
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
            if threshold <= 0 or not _whole(threshold):
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

    # ------------------------------------------------------------------ plans
    def plan(self, node: s.PlanNode) -> Plan:
        type_nodes = [b for b in node.body if isinstance(b, s.UserTypeNode)]
        addon_nodes = [b for b in node.body if isinstance(b, s.AddonNode)]
        self._unique("user type", ((n.name, n.loc) for n in type_nodes))
        self._unique("addon", ((n.name, n.loc) for n in addon_nodes))
        types: dict[str, UserTypeDef] = {}
        for tnode in type_nodes:
            seat = self._seat([b for b in tnode.body if isinstance(b, s.Seat)], tnode)
            product_stmts = [b for b in tnode.body if isinstance(b, s.Products)]
            products: list[tuple[str, Loc]] = [p for stmt in product_stmts for p in stmt.names]
            if not products:
                self.error("no-products", f'user type "{tnode.name}" lists no products', tnode.loc)
            self._unique("product", products)
            for name, loc in products:
                hint = closest(name, KNOWN_PRODUCTS)
                if name not in KNOWN_PRODUCTS and hint:
                    self.error("unknown-product", f'unknown product "{name}"', loc,
                               f"did you mean {hint}?")
            types[tnode.name] = UserTypeDef(tnode.name, seat, frozenset(p for p, _ in products))
        addons: dict[str, AddonDef] = {}
        for anode in addon_nodes:
            seat = self._seat([b for b in anode.body if isinstance(b, s.Seat)], anode)
            targets = [t for b in anode.body if isinstance(b, s.AddonFor) for t in b.names]
            if not targets:
                self.error("addon-without-types", f'addon "{anode.name}" names no user type '
                           "(add: for chat)", anode.loc)
            for name, loc in targets:
                if name not in types:
                    self.unknown("user type", name, loc, types)
            addons[anode.name] = AddonDef(anode.name, seat, frozenset(t for t, _ in targets))
        return Plan(node.name, types, addons)

    def _seat(self, seats: list[s.Seat], owner: s.UserTypeNode | s.AddonNode) -> Decimal:
        for extra in seats[1:]:
            self.error("duplicate", f'duplicate seat fee for "{owner.name}"', extra.loc)
        if not seats:
            return Decimal(0)
        seat = seats[0]
        if seat.usd < 0:
            self.error("negative-price", f"seat fee {seat.text} is negative", seat.loc)
        scaled = seat.usd * 100
        if scaled != scaled.to_integral_value():
            self.error("inexact-amount", f"seat fee {seat.text} is not a whole number of cents",
                       seat.loc)
        return seat.usd

    # ------------------------------------------------------------------ orgs
    def _one(self, node: s.OrgNode, kind: type, what: str) -> list[s.OrgStmt]:
        found = [b for b in node.body if isinstance(b, kind)]
        for extra in found[1:]:
            self.error("duplicate", f'duplicate {what} in org "{node.name}" (first at '
                       f"{found[0].loc})", extra.loc)
        return found

    def org(self, node: s.OrgNode, tables: dict[str, RateTable],
            plans: dict[str, Plan]) -> OrgPolicy | None:
        plan_stmts = self._one(node, s.OrgPlan, "plan")
        rates_stmts = self._one(node, s.OrgRates, "rates")
        tz_stmts = self._one(node, s.Timezone, "timezone")
        limit_stmts = self._one(node, s.OrgLimit, "limit")
        notify_stmts = self._one(node, s.Notify, "notify")
        default_limit = self._one(node, s.DefaultLimit, "default user limit")
        default_type = self._one(node, s.DefaultType, "default user_type")
        grace_stmts = self._one(node, s.Grace, "late_usage grace")
        plan: Plan | None = None
        if not plan_stmts:
            self.error("missing-plan", f'org "{node.name}" names no plan (add: plan "...")',
                       node.loc)
        else:
            stmt = plan_stmts[0]
            assert isinstance(stmt, s.OrgPlan)
            plan = plans.get(stmt.name)
            if plan is None:
                self.unknown("plan", stmt.name, stmt.loc, plans)
        table: RateTable | None = None
        if not rates_stmts:
            self.error("missing-rates", f'org "{node.name}" names no rate table (add: rates "...")',
                       node.loc)
        else:
            rstmt = rates_stmts[0]
            assert isinstance(rstmt, s.OrgRates)
            table = tables.get(rstmt.name)
            if table is None:
                self.unknown("rate table", rstmt.name, rstmt.loc, tables)
        tz_name = "UTC"
        if tz_stmts:
            tstmt = tz_stmts[0]
            assert isinstance(tstmt, s.Timezone)
            tz_name = tstmt.name
        from policy.compile import zone

        tz = zone(tz_name)
        if tz is None:
            import zoneinfo

            hint = closest(tz_name, zoneinfo.available_timezones())
            self.error("unknown-timezone", f'unknown time zone "{tz_name}"', tz_stmts[0].loc,
                       f"did you mean {hint}?" if hint else
                       'use an IANA name such as "Europe/Berlin" or "UTC"')
        org_limit = None
        if limit_stmts:
            lstmt = limit_stmts[0]
            assert isinstance(lstmt, s.OrgLimit)
            org_limit = self._month(lstmt.amount, "org limit")
        thresholds: tuple[Decimal, ...] = ()
        webhook = None
        if notify_stmts:
            nstmt = notify_stmts[0]
            assert isinstance(nstmt, s.Notify)
            thresholds, webhook = self._notify(nstmt)
        types = plan.user_types if plan is not None else {}
        type_limits: dict[str, int | None] = {}
        for stmt in node.body:
            if isinstance(stmt, s.TypeLimit):
                if plan is not None and stmt.user_type not in types:
                    self.unknown("user type", stmt.user_type, stmt.loc, types)
                if stmt.user_type in type_limits:
                    self.error("duplicate", f'duplicate limit for user type "{stmt.user_type}"',
                               stmt.loc)
                type_limits[stmt.user_type] = self._month(stmt.amount, "user type limit")
        d_limit = None
        if default_limit:
            dstmt = default_limit[0]
            assert isinstance(dstmt, s.DefaultLimit)
            d_limit = self._month(dstmt.amount, "default user limit")
        d_type = None
        if default_type:
            tstmt2 = default_type[0]
            assert isinstance(tstmt2, s.DefaultType)
            d_type = tstmt2.user_type
            if plan is not None and d_type not in types:
                self.unknown("user type", d_type, tstmt2.loc, types)
        members = self._members(node, plan, d_limit)
        grace = 0
        if grace_stmts:
            gstmt = grace_stmts[0]
            assert isinstance(gstmt, s.Grace)
            if gstmt.days < 0 or gstmt.days > 366 or gstmt.days != gstmt.days.to_integral_value():
                self.error("bad-grace", "late_usage grace must be a whole number of days up to "
                           "366", gstmt.loc)
            else:
                grace = int(gstmt.days)
        shadow = bool(self._one(node, s.Shadow, "shadow"))
        user_metrics = bool(self._one(node, s.UserMetrics, "per_user_metrics"))
        if plan is None or table is None or tz is None:
            return None
        return OrgPolicy(node.name, plan, table, tz_name, tz, org_limit, type_limits, d_limit,
                         d_type, members, thresholds, webhook, shadow, user_metrics, grace)

    def _month(self, amount: s.Amount, what: str) -> int | None:
        if amount.window != "month":
            self.error("bad-window", f"{what} must be per month (only members may add a daily "
                       "limit)", amount.loc)
        return self.limit(amount)

    def _notify(self, stmt: s.Notify) -> tuple[tuple[Decimal, ...], str | None]:
        values: list[Decimal] = []
        for value, text, loc in stmt.percents:
            if not 0 < value <= 1000:
                self.error("bad-threshold", f"threshold {text} must be above 0% and at most "
                           "1000%", loc)
            elif value in values:
                self.error("duplicate", f"duplicate threshold {text}", loc)
            else:
                values.append(value)
        if stmt.webhook is not None and not stmt.webhook.startswith(("https://", "http://")):
            self.error("bad-webhook", f'webhook "{stmt.webhook}" must be an http(s) URL', stmt.loc)
        return tuple(sorted(values)), stmt.webhook

    def _members(self, node: s.OrgNode, plan: Plan | None,
                 default_limit: int | None) -> dict[str, MemberDef]:
        members: dict[str, MemberDef] = {}
        first: dict[str, Loc] = {}
        for stmt in node.body:
            if not isinstance(stmt, s.Member):
                continue
            if stmt.user in first:
                self.error("duplicate", f'duplicate member "{stmt.user}" (first at '
                           f"{first[stmt.user]})", stmt.loc)
                continue
            first[stmt.user] = stmt.loc
            if not stmt.user or len(stmt.user.encode()) > 256:
                self.error("bad-member", "member ids must be 1 to 256 bytes", stmt.loc)
            if plan is not None:
                if stmt.user_type not in plan.user_types:
                    self.unknown("user type", stmt.user_type, stmt.type_loc, plan.user_types)
                for addon, loc in stmt.addons:
                    found = plan.addons.get(addon)
                    if found is None:
                        self.unknown("addon", addon, loc, plan.addons)
                    elif stmt.user_type not in found.for_types:
                        self.error("addon-not-for-type", f'addon "{addon}" is not available for '
                                   f'user type "{stmt.user_type}"', loc,
                                   "it is for: " + ", ".join(sorted(found.for_types)))
            month: int | None = default_limit
            day: int | None = None
            seen_windows: set[str] = set()
            for amount in stmt.limits:
                if amount.window in seen_windows:
                    self.error("duplicate", f"duplicate {amount.window} limit for "
                               f'"{stmt.user}"', amount.loc)
                seen_windows.add(amount.window)
                if amount.window == "day":
                    day = self.limit(amount)
                else:
                    month = self.limit(amount)
            self._unique("addon", stmt.addons)
            members[stmt.user] = MemberDef(stmt.user, stmt.user_type,
                                           tuple(a for a, _ in stmt.addons), month, day, True)
        return members
