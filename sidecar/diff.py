"""``spendkeeper diff OLD NEW``: what a policy change does, before it ships.

:func:`diff_policies` compares two compiled policies and lists every change
that matters to money: orgs, members and user types added or removed, limits
(old -> new, members' effective limits included, so a changed default shows
on every member it reaches), user-type changes, entitlements (products),
seat fees, and prices per model and meter. With a ledger, :func:`headroom`
reads the current period's counters and shows, for every scope whose limit
changes, its headroom before and after, and who would be over their new
limit right now (spent + reserved above it).
"""

from __future__ import annotations

import dataclasses
import datetime as dt
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

from policy.decide import Key
from policy.model import METERS, MemberDef, ModelRates, OrgPolicy, Plan, Policy, RateTable
from policy.periods import day_key, period_key
from sidecar.explain import LedgerReader, usd

__all__ = ["Change", "Headroom", "diff_policies", "headroom"]


@dataclass(frozen=True, slots=True)
class Change:
    """One difference: ``subject``'s ``field`` went from ``old`` to ``new`` (None: absent)."""

    section: str  # "orgs", "limits", "members", "plans", "prices", "settings"
    subject: str  # "acme", "acme/alice@acme.com", "enterprise/chat", "anthropic/claude-x"
    field: str
    old: str | None
    new: str | None

    def to_json(self) -> dict[str, Any]:
        """As JSON."""
        return {"section": self.section, "subject": self.subject, "field": self.field,
                "old": self.old, "new": self.new}


def _money(value: Decimal) -> str:
    """``$2``, ``$0.10``, ``$2.50``, ``$0.125``: whole dollars bare, else at least cents."""
    whole, _, frac = format(value.normalize(), "f").partition(".")
    sign = "-" if whole.startswith("-") else ""
    return f"{sign}${int(whole.lstrip('-')):,}" + (f".{frac.ljust(2, '0')}" if frac else "")


def _limit(nanos: int | None) -> str:
    return "unlimited" if nanos is None else _money(Decimal(nanos).scaleb(-9))


class _Differ:
    def __init__(self) -> None:
        self.changes: list[Change] = []

    def add(self, section: str, subject: str, field: str, old: str | None,
            new: str | None) -> None:
        if old != new:
            self.changes.append(Change(section, subject, field, old, new))

    def keyed(self, section: str, prefix: str, field: str, old: dict[str, Any],
              new: dict[str, Any]) -> list[str]:
        """Report added/removed keys; return the common ones in order."""
        for name in sorted(old.keys() - new.keys()):
            self.add(section, f"{prefix}{name}", field, "present", None)
        for name in sorted(new.keys() - old.keys()):
            self.add(section, f"{prefix}{name}", field, None, "added")
        return [name for name in new if name in old]

    # ---------------------------------------------------------------- orgs
    def org(self, old: OrgPolicy, new: OrgPolicy) -> None:
        name = old.name
        self.add("limits", name, "org limit", _limit(old.limit), _limit(new.limit))
        for user_type in sorted(old.plan.user_types.keys() | new.plan.user_types.keys()
                                | old.type_limits.keys() | new.type_limits.keys()):
            self.add("limits", f"{name}/{user_type}", "user type limit",
                     _limit(old.type_limits.get(user_type)),
                     _limit(new.type_limits.get(user_type)))
        self.add("limits", name, "default user limit", _limit(old.default_user_limit),
                 _limit(new.default_user_limit))
        self.add("settings", name, "default user_type", old.default_user_type,
                 new.default_user_type)
        for field, before, after in (
                ("plan", old.plan.name, new.plan.name), ("rates", old.rates.name, new.rates.name),
                ("timezone", old.timezone, new.timezone),
                ("shadow", str(old.shadow).lower(), str(new.shadow).lower()),
                ("notify at", _pcts(old), _pcts(new)), ("webhook", old.webhook, new.webhook),
                ("late_usage grace days", str(old.grace_days), str(new.grace_days))):
            self.add("settings", name, field, before, after)
        for user in self.keyed("members", f"{name}/", "member", old.members, new.members):
            self.member(name, old.members[user], new.members[user])
        for user in sorted(new.members.keys() - old.members.keys()):
            # A newly listed user may have been a default-type user before.
            was = old.member(user)
            if was is not None:
                self.member(name, was, new.members[user])
        for user in sorted(old.members.keys() - new.members.keys()):
            # An unlisted user may still be covered by the default user type.
            now = new.member(user)
            if now is not None:
                self.member(name, old.members[user], now)

    def member(self, org: str, old: MemberDef, new: MemberDef) -> None:
        subject = f"{org}/{old.user}"
        self.add("members", subject, "user type", old.user_type, new.user_type)
        self.add("limits", subject, "user limit", _limit(old.month_limit),
                 _limit(new.month_limit))
        self.add("limits", subject, "daily limit", _limit(old.day_limit), _limit(new.day_limit))
        self.add("members", subject, "add-ons", ", ".join(old.addons) or "none",
                 ", ".join(new.addons) or "none")

    # ---------------------------------------------------------------- plans
    def plan(self, old: Plan, new: Plan) -> None:
        prefix = f"{old.name}/"
        for name in self.keyed("plans", prefix, "user type", old.user_types, new.user_types):
            a, b = old.user_types[name], new.user_types[name]
            self.add("plans", prefix + name, "seat", _money(a.seat_usd), _money(b.seat_usd))
            for product in sorted(a.products - b.products):
                self.add("plans", prefix + name, f"product {product}", "entitled", None)
            for product in sorted(b.products - a.products):
                self.add("plans", prefix + name, f"product {product}", None, "entitled")
        for name in self.keyed("plans", prefix, "addon", old.addons, new.addons):
            a2, b2 = old.addons[name], new.addons[name]
            self.add("plans", prefix + name, "addon seat", _money(a2.seat_usd),
                     _money(b2.seat_usd))
            self.add("plans", prefix + name, "addon for", ", ".join(sorted(a2.for_types)),
                     ", ".join(sorted(b2.for_types)))

    # ---------------------------------------------------------------- prices
    def table(self, old: RateTable, new: RateTable) -> None:
        prefix = f"{old.name}/"
        old_models = {n: old.models[n] for n in old.canonical}
        new_models = {n: new.models[n] for n in new.canonical}
        for name in self.keyed("prices", prefix, "model", old_models, new_models):
            self.model(prefix + name, old_models[name], new_models[name])
        self.add("prices", old.name, "batch", _mod(old.batch), _mod(new.batch))
        for kind in sorted(old.speeds.keys() | new.speeds.keys()):
            self.add("prices", old.name, kind, _mod(old.speeds.get(kind)),
                     _mod(new.speeds.get(kind)))
        for region in sorted(old.geos.keys() | new.geos.keys()):
            self.add("prices", old.name, f"geo {region}", _mod(old.geos.get(region)),
                     _mod(new.geos.get(region)))
        for tool in sorted(old.tools.keys() | new.tools.keys()):
            a, b = old.tools.get(tool), new.tools.get(tool)
            self.add("prices", old.name, f"tool {tool}",
                     None if a is None else f"{_money(a.usd)} / {a.per} {a.unit}, "
                     f"{a.free_per_month} free", None if b is None
                     else f"{_money(b.usd)} / {b.per} {b.unit}, {b.free_per_month} free")
        self.add("prices", old.name, "fallback", old.fallback, new.fallback)

    def model(self, subject: str, old: ModelRates, new: ModelRates) -> None:
        a, b = _sheets(old), _sheets(new)
        for key in [*a, *(k for k in b if k not in a)]:
            self.add("prices", subject, key, a.get(key), b.get(key))
        self.add("prices", subject, "retires", _day(old.retires), _day(new.retires))
        self.add("prices", subject, "released", _date(old.released), _date(new.released))
        self.add("prices", subject, "aliases", ", ".join(old.aliases) or "none",
                 ", ".join(new.aliases) or "none")


def _pcts(org: OrgPolicy) -> str:
    return ", ".join(f"{format(p.normalize(), 'f')}%" for p in org.thresholds) or "none"


def _mod(mod: Any) -> str | None:
    if mod is None:
        return None
    scope = "" if mod.models is None else " for " + ", ".join(sorted(mod.models))
    since = "" if mod.released_since is None else f" for models released >= {mod.released_since}"
    return f"{mod.text}{scope}{since}"


def _day(when: dt.datetime | None) -> str | None:
    return None if when is None else when.date().isoformat()


def _date(day: dt.date | None) -> str | None:
    return None if day is None else day.isoformat()


def _sheets(model: ModelRates) -> dict[str, str]:
    """``"input"``, ``"from 2026-10-07 cache_read"``, ``"prompt > 200,000 output"`` -> price."""
    out: dict[str, str] = {}
    for period in model.periods:
        when = "" if period.start is None else f"from {period.start.date().isoformat()} "
        for threshold, sheet in ((0, period.base), *period.tiers):
            tier = f"prompt > {threshold:,} " if threshold else ""
            for meter, value in zip(METERS, sheet.usd_per_mtok, strict=True):
                out[f"{when}{tier}{meter}"] = f"{_money(value)} / MTok"
    return out


def diff_policies(old: Policy, new: Policy) -> list[Change]:
    """Every money-relevant difference between ``old`` and ``new``, grouped by section."""
    differ = _Differ()
    for name in differ.keyed("orgs", "", "org", old.orgs, new.orgs):
        differ.org(old.orgs[name], new.orgs[name])
    for name in differ.keyed("plans", "", "plan", old.plans, new.plans):
        differ.plan(old.plans[name], new.plans[name])
    for name in differ.keyed("prices", "", "rate table", old.rate_tables, new.rate_tables):
        differ.table(old.rate_tables[name], new.rate_tables[name])
    order = {s: i for i, s in enumerate(("orgs", "limits", "members", "plans", "prices",
                                         "settings"))}
    return sorted(differ.changes, key=lambda c: order.get(c.section, 99))


# ---------------------------------------------------------------- headroom now
@dataclass(frozen=True, slots=True)
class Headroom:
    """A scope whose limit changes (or that is over its new limit) against its counters now."""

    org: str
    level: str  # "org", "user_type", "user", "user_day"
    scope: str
    period: str
    used: int  # spent + reserved, nano-USD
    old_limit: int | None
    new_limit: int | None
    note: str = ""

    @property
    def old_remaining(self) -> int | None:
        """Headroom under OLD (negative when over); None when unlimited."""
        return None if self.old_limit is None else self.old_limit - self.used

    @property
    def new_remaining(self) -> int | None:
        """Headroom under NEW (negative when over); None when unlimited."""
        return None if self.new_limit is None else self.new_limit - self.used

    @property
    def change(self) -> int | None:
        """Headroom gained (positive) or lost; None when either side is unlimited."""
        if self.old_remaining is None or self.new_remaining is None:
            return None
        return self.new_remaining - self.old_remaining

    @property
    def over_now(self) -> bool:
        """Whether spent + reserved is above the new limit right now."""
        return self.new_limit is not None and self.used > self.new_limit

    def to_json(self) -> dict[str, Any]:
        """As JSON (exact decimal USD strings; null limit: unlimited)."""
        return {"org": self.org, "level": self.level, "scope": self.scope,
                "period": self.period, "used_usd": usd(self.used),
                "old_limit_usd": usd(self.old_limit), "new_limit_usd": usd(self.new_limit),
                "old_remaining_usd": usd(self.old_remaining),
                "new_remaining_usd": usd(self.new_remaining), "change_usd": usd(self.change),
                "over_now": self.over_now, "note": self.note}


def _used(reader: LedgerReader, key: Key) -> int:
    spent, reserved, _ = reader.counter(key)
    return spent + reserved


def headroom(old: Policy, new: Policy, reader: LedgerReader, now: dt.datetime) -> list[Headroom]:
    """Scopes whose limit changes or that are over their new limit, in each org's period."""
    rows: list[Headroom] = []
    for name, org in new.orgs.items():
        before = old.orgs.get(name)
        period = period_key(now, org.tz)

        def row(level: str, scope: str, key: Key, old_limit: int | None,
                new_limit: int | None, note: str = "", org_name: str = name,
                when: str = period) -> None:
            used = _used(reader, key)
            item = Headroom(org_name, level, scope, when, used, old_limit, new_limit, note)
            if item.over_now and old_limit is not None and used > old_limit:
                item = dataclasses.replace(item, note=", ".join(
                    x for x in ("over the old limit too", note) if x))
            if old_limit != new_limit or item.over_now:
                rows.append(item)

        old_org_limit = before.limit if before is not None else None
        row("org", name, (period, "org", name), old_org_limit, org.limit,
            "" if before is not None else "new org")
        types = org.plan.user_types.keys() | (before.plan.user_types.keys() if before else set())
        for user_type in sorted(types):
            old_limit = before.type_limits.get(user_type) if before is not None else None
            row("user_type", f"{name}/{user_type}", (period, "type", name, user_type), old_limit,
                org.type_limits.get(user_type))
        users = set(org.members) | set(reader.users(period, name))
        if before is not None:
            users |= set(before.members)
        today = day_key(now, org.tz)
        for user in sorted(users):
            was = before.member(user) if before is not None else None
            now_member = org.member(user)
            if now_member is None:
                used = _used(reader, (period, "user", name, user))
                rows.append(Headroom(name, "user", f"{name}/{user}", period, used,
                                     was.month_limit if was else None, None,
                                     "not a member under NEW: denied UNKNOWN_USER"))
                continue
            note = _type_note(was, now_member)
            row("user", f"{name}/{user}", (period, "user", name, user),
                was.month_limit if was else None, now_member.month_limit, note)
            old_day = was.day_limit if was else None
            if old_day is not None or now_member.day_limit is not None:
                row("user_day", f"{name}/{user} {today}", (today, "day", name, user), old_day,
                    now_member.day_limit, note, when=today)
    return rows


def _type_note(was: MemberDef | None, now: MemberDef) -> str:
    if was is None:
        return "new member"
    notes = []
    if now.listed and not was.listed:
        notes.append("newly listed (was a default user_type user)")
    if was.listed and not now.listed:
        notes.append("no longer listed (now a default user_type user)")
    if was.user_type != now.user_type:
        notes.append(f"type {was.user_type} -> {now.user_type}: spent so far stays on "
                     f"{was.user_type}")
    return "; ".join(notes)
