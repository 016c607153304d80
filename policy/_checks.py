"""The semantic checker: syntax trees to a compiled :class:`~policy.model.Policy`.

It resolves names across files (rate tables, plans, orgs), checks references,
duplicates and money, and collects every problem as a diagnostic. Rate tables
and the shared plumbing are in :mod:`policy._check_rates`; plans and orgs here.
"""

from __future__ import annotations

from decimal import Decimal

from policy import syntax as s
from policy._check_rates import KNOWN_PRODUCTS, RateChecks
from policy.errors import Loc, closest
from policy.model import (
    AddonDef,
    MemberDef,
    OrgPolicy,
    Plan,
    Policy,
    RateTable,
    UserTypeDef,
)

__all__ = ["KNOWN_PRODUCTS", "Checker"]


class Checker(RateChecks):
    """Collects definitions from every file, then checks and compiles them."""

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
