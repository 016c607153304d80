"""The decision: may this request spend now? A pure function.

``decide(policy, request, counters)`` takes the compiled policy, the request
and a way to read each level's counters (the ledger passes one that reads
inside its write transaction) and returns a :class:`Decision`. No clock, no
storage: the time is the request's ``at``.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
from collections.abc import Callable
from dataclasses import dataclass

from policy.model import ATTO_PER_NANO, MemberDef, OrgPolicy, Policy, format_usd
from policy.periods import calendar
from policy.pricing import Cost, Usage, price, resolve_model

__all__ = [
    "LEVELS", "REASONS", "Counters", "Decision", "Level", "Request", "Scope", "decide",
    "scopes_for",
]

#: Levels from narrowest to widest; a deny names the first that fails.
LEVELS = ("user_day", "user", "user_type", "org")
REASONS = ("WITHIN_LIMITS", "ORG_LIMIT", "USER_TYPE_LIMIT", "USER_LIMIT", "PRODUCT_NOT_ENTITLED",
           "MODEL_NOT_ALLOWED", "UNKNOWN_MODEL", "UNKNOWN_ORG", "UNKNOWN_USER")
_LEVEL_REASON = {"user_day": "USER_LIMIT", "user": "USER_LIMIT", "user_type": "USER_TYPE_LIMIT",
                 "org": "ORG_LIMIT"}

#: A counter key: (period or day, level, org, name...). The ledger encodes it.
Key = tuple[str, ...]
#: Reads (spent, reserved) in nano-USD for a key.
Counters = Callable[[Key], tuple[int, int]]


@dataclass(slots=True)  # not frozen: built per request, frozen init is 4x slower
class Request:
    """An Authorize or Record request in domain terms."""

    request_id: str
    org: str
    user: str
    product: str
    model: str
    usage: Usage
    at: dt.datetime  # aware
    service_tier: str = "standard"
    speed: str = "standard"
    geo: str = ""
    allow_clamp: bool = False


@dataclass(frozen=True, slots=True)
class Scope:
    """A level a request counts against: its display name, key and limit."""

    level: str
    name: str  # "acme", "acme/chat", "acme/alice@acme.com", "acme/alice@acme.com 2026-11-28"
    key: Key
    limit: int | None  # nano-USD; None: unlimited


@dataclass(slots=True)  # not frozen: built per request, frozen init is 4x slower
class Level:
    """A level's state as a decision saw it (nano-USD)."""

    scope: Scope
    spent: int
    reserved: int

    @property
    def remaining(self) -> int | None:
        """Headroom left (never below zero); None when unlimited."""
        if self.scope.limit is None:
            return None
        return max(self.scope.limit - self.spent - self.reserved, 0)


@dataclass(slots=True)  # not frozen: built per request, frozen init is 4x slower
class Decision:
    """The answer to an Authorize and everything behind it."""

    allowed: bool
    reason: str
    message: str
    cost: Cost | None  # the worst case priced (None when not priced)
    reserve: int  # nano-USD to reserve at every level
    levels: tuple[Level, ...]  # narrowest first, as seen before this request
    period: str
    resets_at: dt.datetime | None
    member: MemberDef | None = None
    max_output_tokens: int | None = None  # set when clamped
    shadow: bool = False  # decided in shadow mode: allowed whatever the verdict
    verdict: str = "WITHIN_LIMITS"  # the reason the policy itself gave (differs in shadow)


_scopes: dict[tuple[int, str, str], tuple[OrgPolicy, MemberDef, tuple[Scope, ...]]] = {}


def scopes_for(org: OrgPolicy, member: MemberDef, at: dt.datetime) -> tuple[Scope, ...]:
    """The levels a member's request at ``at`` counts against, narrowest first."""
    cal = calendar(at, org.tz)
    key = (id(org), member.user, cal.day)
    hit = _scopes.get(key)
    if hit is not None and hit[0] is org and hit[1] == member:
        return hit[2]
    scopes = _build_scopes(org, member, cal.period, cal.day)
    if len(_scopes) > 200_000:
        _scopes.clear()
    _scopes[key] = (org, member, scopes)
    return scopes


def _build_scopes(org: OrgPolicy, member: MemberDef, period: str, day: str) -> tuple[Scope, ...]:
    user_name = f"{org.name}/{member.user}"
    scopes = []
    if member.day_limit is not None:
        scopes.append(Scope("user_day", f"{user_name} {day}", (day, "day", org.name, member.user),
                            member.day_limit))
    scopes.append(Scope("user", user_name, (period, "user", org.name, member.user),
                        member.month_limit))
    scopes.append(Scope("user_type", f"{org.name}/{member.user_type}",
                        (period, "type", org.name, member.user_type),
                        org.type_limits.get(member.user_type)))
    scopes.append(Scope("org", org.name, (period, "org", org.name), org.limit))
    return tuple(scopes)


def _deny(reason: str, message: str, period: str = "", resets: dt.datetime | None = None,
          member: MemberDef | None = None, cost: Cost | None = None,
          levels: tuple[Level, ...] = ()) -> Decision:
    return Decision(False, reason, message, cost, 0, levels, period, resets, member,
                    verdict=reason)


def decide(policy: Policy, req: Request, counters: Counters, *, shadow: bool = False) -> Decision:
    """Decide ``req`` against ``policy`` given the current counters."""
    decision = _decide(policy, req, counters)
    org = policy.orgs.get(req.org)
    if (shadow or (org is not None and org.shadow)) and not decision.allowed:
        reserve = decision.cost.nanos if decision.cost is not None and decision.levels else 0
        return dataclasses.replace(decision, allowed=True, shadow=True, reserve=reserve,
                                   message=f"shadow mode: would deny: {decision.message}")
    if shadow or (org is not None and org.shadow):
        return dataclasses.replace(decision, shadow=True)
    return decision


def _decide(policy: Policy, req: Request, counters: Counters) -> Decision:
    org = policy.orgs.get(req.org)
    if org is None:
        return _deny("UNKNOWN_ORG", f'unknown org "{req.org}"')
    cal = calendar(req.at, org.tz)
    period, resets = cal.period, cal.resets_at
    member = org.member(req.user)
    if member is None:
        return _deny("UNKNOWN_USER", f'user "{req.user}" is not a member of org "{org.name}" '
                     "and the org sets no default user_type", period, resets)
    user_type = org.plan.user_types.get(member.user_type)
    if user_type is None or req.product not in user_type.products:
        return _deny("PRODUCT_NOT_ENTITLED", f'user type "{member.user_type}" does not include '
                     f'product "{req.product}"', period, resets, member)
    model, _fallback = resolve_model(org.rates, req.model)
    if model is None:
        return _deny("UNKNOWN_MODEL", f'model "{req.model}" is not in rate table '
                     f'"{org.rates.name}"', period, resets, member)
    if model.retires is not None and req.at >= model.retires:
        return _deny("MODEL_NOT_ALLOWED", f'model "{model.name}" was retired on '
                     f"{model.retires.date().isoformat()}", period, resets, member)
    if req.speed == "fast":
        fast = org.rates.speeds.get("fast")
        if fast is None or not fast.applies_to(model):
            return _deny("MODEL_NOT_ALLOWED", f'fast mode is not available for model '
                         f'"{model.name}"', period, resets, member)
    cost = price(org.rates, req.model, req.usage, req.at, service_tier=req.service_tier,
                 speed=req.speed, geo=req.geo, detail=False)
    levels = tuple(Level(sc, *counters(sc.key)) for sc in scopes_for(org, member, req.at))
    failing = [lv for lv in levels if lv.scope.limit is not None
               and lv.spent + lv.reserved + cost.nanos > lv.scope.limit]
    if not failing:
        return Decision(True, "WITHIN_LIMITS", "within limits", cost, cost.nanos, levels, period,
                        resets, member)
    if req.allow_clamp:
        clamped = _clamp(org, req, levels, cost)
        if clamped is not None:
            # ``cost`` stays the unclamped worst case; only the clamped cost is reserved.
            return Decision(True, "WITHIN_LIMITS", f"allowed with max_output_tokens clamped "
                            f"to {clamped[0]}", cost, clamped[1].nanos, levels, period,
                            resets, member, max_output_tokens=clamped[0])
    first = failing[0]
    reason = _LEVEL_REASON[first.scope.level]
    limit = first.scope.limit or 0
    message = (f"{first.scope.level} limit of {first.scope.name} exceeded: spent "
               f"{format_usd(first.spent)} + reserved {format_usd(first.reserved)} + this request "
               f"{format_usd(cost.nanos)} > limit {format_usd(limit)}")
    return Decision(False, reason, message, cost, 0, levels, period, resets, member,
                    verdict=reason)


def _clamp(org: OrgPolicy, req: Request, levels: tuple[Level, ...],
           cost: Cost) -> tuple[int, Cost] | None:
    """The largest max_output_tokens that fits every level, if at least one does."""
    headroom = min(lv.scope.limit - lv.spent - lv.reserved for lv in levels
                   if lv.scope.limit is not None)
    if headroom <= 0 or req.usage.output_tokens <= 1:
        return None
    def at(output: int) -> Cost:
        usage = dataclasses.replace(req.usage, output_tokens=output)
        return price(org.rates, req.model, usage, req.at, service_tier=req.service_tier,
                     speed=req.speed, geo=req.geo)
    base = at(0).atto
    per_token = at(1).atto - base
    budget = headroom * ATTO_PER_NANO - base
    if per_token <= 0 or budget < per_token:
        return None
    tokens = min(budget // per_token, req.usage.output_tokens - 1)
    clamped = at(tokens)
    return (tokens, clamped) if tokens >= 1 and clamped.nanos <= headroom else None
