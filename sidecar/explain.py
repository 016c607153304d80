"""``spendkeeper explain``: a decision and every step behind it.

:func:`explain` runs :func:`policy.decide.decide` read-only (nothing is
reserved) and lays out what it used: the member entry (listed, or the org's
default user type), the user type and its products, the model and its price
lines, and each level's limit with where that limit came from (a member line,
the default user limit, a user-type limit, the org limit, or nothing:
unlimited) and its spent / reserved / remaining figures. Counters come from a
:class:`LedgerReader`, a read-only snapshot of a ledger's LMDB environment
that the other operations commands (``diff``, ``replay``) share.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from types import TracebackType
from typing import Any

import lmdb

from policy import syntax as s
from policy.decide import Counters, Decision, Key, Request, decide, scopes_for
from policy.errors import PolicyError
from policy.model import MemberDef, OrgPolicy, Policy, usd_text
from policy.parse import parse_text
from policy.pricing import Cost, price, resolve_model
from sidecar.ledger.store import COUNTER, DATABASES, decode_key, encode_key, iter_prefix, open_env

__all__ = ["Explanation", "LedgerReader", "LimitStep", "OrgSources", "dollars", "explain",
           "limit_source", "no_counters", "org_sources", "print_explanation", "table", "usd"]

_READ_MAP_SIZE = 4 << 30


def usd(nanos: int | None) -> str | None:
    """Nano-USD as an exact decimal string (``"0.018"``); None stays None (unlimited)."""
    return None if nanos is None else usd_text(nanos)


class LedgerReader:
    """A read-only snapshot of a ledger (no writes, no sync thread; a running server is fine)."""

    def __init__(self, path: str | Path) -> None:
        folder = Path(path)
        if not (folder / "data.mdb").is_file():
            raise FileNotFoundError(f"no ledger in {folder} (expected {folder / 'data.mdb'})")
        self.env = open_env(folder, _READ_MAP_SIZE, readonly=True)
        try:
            self.txn = self.env.begin()
            self.dbs = {name: self.env.open_db(name.encode(), txn=self.txn, create=False)
                        for name in DATABASES}
        except lmdb.Error as exc:
            self.env.close()
            raise FileNotFoundError(f"{folder} is not a spendkeeper ledger ({exc})") from None

    def __enter__(self) -> LedgerReader:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def close(self) -> None:
        """End the snapshot and close the environment."""
        self.txn.abort()
        self.env.close()

    def counter(self, key: Key) -> tuple[int, int, int]:
        """(spent, reserved, requests) of a counter key (zeros when absent)."""
        raw = self.txn.get(encode_key(key), db=self.dbs["counters"])
        if raw is None:
            return 0, 0, 0
        spent, reserved, count = COUNTER.unpack_from(raw)
        return spent, reserved, count

    def counters(self, key: Key) -> tuple[int, int]:
        """(spent, reserved): the :data:`policy.decide.Counters` shape."""
        spent, reserved, _ = self.counter(key)
        return spent, reserved

    def scan(self, db: str, prefix: tuple[str, ...]) -> Iterator[tuple[bytes, bytes]]:
        """Every (key, value) of ``db`` under ``prefix``, in key order."""
        yield from iter_prefix(self.txn, self.dbs[db], prefix)

    def users(self, period: str, org: str) -> dict[str, tuple[int, int]]:
        """Every user with a counter in ``period``: (spent, reserved)."""
        found = {}
        for key, value in self.scan("counters", (period, "user", org)):
            parts = decode_key(key, value[COUNTER.size:])
            spent, reserved, _ = COUNTER.unpack_from(value)
            found[parts[3]] = (spent, reserved)
        return found


def no_counters(key: Key) -> tuple[int, int]:
    """Counters of an empty ledger."""
    return 0, 0


# ---------------------------------------------------------------- where limits come from
@dataclass
class OrgSources:
    """Where an org's statements are written (``file:line``), from re-reading its files."""

    org: str = ""
    limit: str = ""
    types: dict[str, str] = dataclasses.field(default_factory=dict)
    default_limit: str = ""
    default_type: str = ""
    members: dict[str, str] = dataclasses.field(default_factory=dict)
    member_month: set[str] = dataclasses.field(default_factory=set)  # members with a month limit


def org_sources(policy: Policy, name: str) -> OrgSources:
    """Locations of ``name``'s statements; empty if the files cannot be re-read."""
    found = OrgSources()
    for file in policy.files:
        try:
            tree = parse_text(Path(file).read_text(encoding="utf-8"), file)
        except (OSError, UnicodeDecodeError, PolicyError):
            continue
        for node in tree.body:
            if isinstance(node, s.OrgNode) and node.name == name:
                _collect(node, found)
    return found


def _at(loc: Any) -> str:
    return f"{loc.file}:{loc.line}"


def _collect(node: s.OrgNode, found: OrgSources) -> None:
    found.org = _at(node.loc)
    for stmt in node.body:
        if isinstance(stmt, s.OrgLimit):
            found.limit = _at(stmt.loc)
        elif isinstance(stmt, s.TypeLimit):
            found.types[stmt.user_type] = _at(stmt.loc)
        elif isinstance(stmt, s.DefaultLimit):
            found.default_limit = _at(stmt.loc)
        elif isinstance(stmt, s.DefaultType):
            found.default_type = _at(stmt.loc)
        elif isinstance(stmt, s.Member):
            found.members[stmt.user] = _at(stmt.loc)
            if any(a.window == "month" for a in stmt.limits):
                found.member_month.add(stmt.user)


def limit_source(org: OrgPolicy, member: MemberDef, level: str,
                 where: OrgSources) -> tuple[str, str]:
    """(source, file:line) of a level's limit for ``member``."""
    if level == "user_day":
        return "member line (daily)", where.members.get(member.user, "")
    if level == "user":
        if member.listed and member.user in where.member_month:
            return "member line", where.members.get(member.user, "")
        if member.month_limit is not None:
            return "default user limit", where.default_limit
        return "unlimited (no member limit, no default user limit)", ""
    if level == "user_type":
        if member.user_type in org.type_limits:
            return "user type limit", where.types.get(member.user_type, "")
        return f"unlimited (no limit for user type {member.user_type})", ""
    if org.limit is not None or where.limit:
        return "org limit", where.limit
    return "unlimited (no org limit)", ""


# ---------------------------------------------------------------- the explanation
@dataclass(frozen=True, slots=True)
class LimitStep:
    """One level as the decision saw it, with where its limit came from."""

    level: str
    scope: str
    limit: int | None
    source: str
    where: str
    spent: int
    reserved: int
    this_request: int

    @property
    def remaining(self) -> int | None:
        """Headroom before this request (may be negative); None when unlimited."""
        return None if self.limit is None else self.limit - self.spent - self.reserved

    @property
    def fits(self) -> bool:
        """Whether this request fits under the level's limit."""
        return self.limit is None or self.spent + self.reserved + self.this_request <= self.limit

    def to_json(self) -> dict[str, Any]:
        """JSON with exact decimal USD strings (limit null: unlimited)."""
        return {"level": self.level, "scope": self.scope, "limit_usd": usd(self.limit),
                "source": self.source, "where": self.where, "spent_usd": usd(self.spent),
                "reserved_usd": usd(self.reserved), "this_request_usd": usd(self.this_request),
                "remaining_usd": usd(self.remaining), "fits": self.fits}


@dataclass(frozen=True, slots=True)
class Explanation:
    """A decision and the inputs behind it."""

    request: Request
    decision: Decision
    policy_version: str
    org: OrgPolicy | None
    sources: OrgSources
    member: MemberDef | None
    worst_case: Cost | None  # the estimate priced with its full max output
    limits: tuple[LimitStep, ...]
    counters_from: str  # the ledger path, or "" for zeros

    @property
    def failing(self) -> tuple[LimitStep, ...]:
        """Levels this request does not fit, narrowest first."""
        return tuple(step for step in self.limits if not step.fits)

    def to_json(self) -> dict[str, Any]:
        """Everything as JSON (exact decimal USD strings)."""
        req, dec = self.request, self.decision
        member = self.member
        user_type = (self.org.plan.user_types.get(member.user_type)
                     if self.org is not None and member is not None else None)
        cost = self.worst_case
        return {
            "decision": "ALLOW" if dec.allowed else "DENY", "reason": dec.reason,
            "verdict": dec.verdict, "shadow": dec.shadow, "message": dec.message,
            "reserve_usd": usd(dec.reserve), "max_output_tokens": dec.max_output_tokens,
            "policy_version": self.policy_version, "period": dec.period,
            "resets_at": dec.resets_at.isoformat() if dec.resets_at else None,
            "counters_from": self.counters_from or None,
            "request": {"org": req.org, "user": req.user, "product": req.product,
                        "model": req.model, "at": req.at.isoformat(),
                        "usage": {k: v for k, v in dataclasses.asdict(req.usage).items() if v},
                        "service_tier": req.service_tier, "speed": req.speed, "geo": req.geo,
                        "allow_clamp": req.allow_clamp},
            "org": None if self.org is None else {
                "name": self.org.name, "where": self.sources.org, "timezone": self.org.timezone,
                "shadow": self.org.shadow, "rates": self.org.rates.name,
                "plan": self.org.plan.name},
            "member": None if member is None else {
                "user": member.user, "entry": "member line" if member.listed
                else "default user_type", "where": self.sources.members.get(member.user)
                if member.listed else self.sources.default_type, "user_type": member.user_type,
                "addons": list(member.addons)},
            "user_type": None if user_type is None else {
                "name": user_type.name, "products": sorted(user_type.products),
                "seat_usd": format(user_type.seat_usd, "f"),
                "entitled": req.product in user_type.products},
            "price": None if cost is None else {
                "model": cost.model, "fallback": cost.fallback, "priced": cost.priced,
                "modifiers": list(cost.modifiers), "tier": cost.tier,
                "lines": [{"meter": ln.meter, "quantity": ln.quantity,
                           "unit_usd": format(ln.unit_usd.normalize(), "f"), "per": ln.per,
                           "cost_usd": format(ln.usd, "f")} for ln in cost.lines],
                "worst_case_usd": format(cost.usd, "f"), "worst_case_nanos": cost.nanos},
            "limits": [step.to_json() for step in self.limits],
            "failing_levels": [step.level for step in self.failing],
            "narrowest_failing": self.failing[0].level if self.failing else None,
        }


def explain(policy: Policy, req: Request, counters: Counters = no_counters, *,
            shadow: bool = False, counters_from: str = "") -> Explanation:
    """Decide ``req`` read-only and collect every step behind the decision."""
    decision = decide(policy, req, counters, shadow=shadow)
    org = policy.orgs.get(req.org)
    if org is None:
        return Explanation(req, decision, policy.version, None, OrgSources(), None, None, (),
                           counters_from)
    sources = org_sources(policy, org.name)
    member = org.member(req.user)
    worst: Cost | None = None
    model, _ = resolve_model(org.rates, req.model)
    if model is not None:
        worst = price(org.rates, req.model, req.usage, req.at, service_tier=req.service_tier,
                      speed=req.speed, geo=req.geo)
    steps: list[LimitStep] = []
    if member is not None:
        # Clamped: the levels must hold the clamped reserve, not the unclamped worst case.
        if decision.max_output_tokens is not None:
            this = decision.reserve
        else:
            this = worst.nanos if worst is not None else 0
        for scope in scopes_for(org, member, req.at):
            spent, reserved = counters(scope.key)
            source, where = limit_source(org, member, scope.level, sources)
            steps.append(LimitStep(scope.level, scope.name, scope.limit, source, where, spent,
                                   reserved, this))
    return Explanation(req, decision, policy.version, org, sources, member, worst, tuple(steps),
                       counters_from)


# ---------------------------------------------------------------- for people
def table(*headers: str, right: tuple[int, ...] = ()) -> Any:
    """A borderless rich table; ``right`` lists the right-aligned columns."""
    from rich.table import Table

    grid = Table(*headers, box=None, pad_edge=False)
    for column in right:
        grid.columns[column].justify = "right"
    return grid


def dollars(text: str | None) -> str:
    """An exact decimal USD string for people: ``$1,234.50``, ``$0.0083``; None: unlimited."""
    if text is None:
        return "unlimited"
    value = Decimal(text)
    whole, _, frac = format(abs(value), "f").partition(".")
    return f"{'-' if value < 0 else ''}${int(whole):,}.{frac.rstrip('0').ljust(2, '0')}"


def print_explanation(r: dict[str, Any], console: Any) -> None:
    """Print :meth:`Explanation.to_json` for people on a rich ``console``."""
    def _out(text: str = "") -> None:
        console.print(text, markup=False, emoji=False, highlight=False)

    req = r["request"]
    shadow = " (shadow mode: the policy's verdict is " + r["verdict"] + ")" if r["shadow"] else ""
    _out(f"{r['decision']} {r['reason']}{shadow}: {r['message']}")
    _out(f"policy {r['policy_version']}, period {r['period'] or '-'}, counters "
         f"{'from ' + r['counters_from'] if r['counters_from'] else 'all zero (no --data-dir)'}")
    usage = ", ".join(f"{k} {v:,}" for k, v in req["usage"].items()) or "no usage"
    _out(f"request: {req['org']} / {req['user']} / {req['product']} / {req['model']} at "
         f"{req['at']}: {usage}; tier {req['service_tier']}, speed {req['speed']}"
         + (f", geo {req['geo']}" if req["geo"] else ""))
    org, member, utype = r["org"], r["member"], r["user_type"]
    if org is None:
        _out(f'1. org: "{req["org"]}" is not in the policy -> UNKNOWN_ORG')
        return
    _out(f'1. org "{org["name"]}" ({org["where"] or "?"}): plan {org["plan"]}, rates '
         f'{org["rates"]}, timezone {org["timezone"]}'
         + (", shadow mode (never denies)" if org["shadow"] else ""))
    if member is None:
        _out(f'2. member: "{req["user"]}" is not listed and the org has no default user_type '
             "-> UNKNOWN_USER")
        return
    entry = (f"listed (member line, {member['where']})" if member["entry"] == "member line"
             else f"not listed: the org's default user_type ({member['where'] or '?'})")
    addons = ", ".join(member["addons"]) or "none"
    _out(f'2. member "{member["user"]}": {entry}; user type {member["user_type"]}, '
         f"add-ons {addons}")
    if utype is not None:
        verdict = "entitled" if utype["entitled"] else "NOT entitled -> PRODUCT_NOT_ENTITLED"
        _out(f"3. user type {utype['name']} (seat ${utype['seat_usd']}/month): products "
             f"{', '.join(utype['products'])}; {req['product']} is {verdict}")
    cost = r["price"]
    if cost is None:
        _out(f'4. model "{req["model"]}": not in the rate table -> UNKNOWN_MODEL')
        return
    via = f" (fallback for {req['model']})" if cost["fallback"] else ""
    mods = ", ".join(cost["modifiers"]) or "standard prices"
    tier = f", prompt over {cost['tier']:,} tokens" if cost["tier"] else ""
    _out(f"4. price: {cost['model']}{via}, {mods}{tier}")
    grid = table("meter", "quantity", "unit price", "cost", right=(1, 3))
    for line in cost["lines"]:
        per = ("MTok" if not line["meter"].startswith("tool:") else f"{line['per']:,} "
               + ("s" if line["meter"] == "tool:code_execution" else "requests"))
        grid.add_row(line["meter"], f"{line['quantity']:,}", f"${line['unit_usd']} / {per}",
                     dollars(line["cost_usd"]))
    grid.add_row("worst case", "", "", dollars(cost["worst_case_usd"]))
    console.print(grid)
    if r["max_output_tokens"]:
        _out(f"   clamped: max_output_tokens {r['max_output_tokens']:,}, reserving "
             f"${r['reserve_usd']}")
    _out("5. limits, narrowest first (spent + reserved + this request must stay within):")
    grid = table("level", "scope", "limit", "from", "spent", "reserved", "this request",
                 "remaining", "fits", right=(2, 4, 5, 6, 7))
    for step in r["limits"]:
        source = step["source"] + (f" ({step['where']})" if step["where"] else "")
        grid.add_row(step["level"], step["scope"], dollars(step["limit_usd"]), source,
                     dollars(step["spent_usd"]), dollars(step["reserved_usd"]),
                     dollars(step["this_request_usd"]), dollars(step["remaining_usd"]),
                     "yes" if step["fits"] else "NO")
    console.print(grid)
    failing = r["failing_levels"]
    if r["verdict"] not in ("WITHIN_LIMITS", "ORG_LIMIT", "USER_TYPE_LIMIT", "USER_LIMIT"):
        _out(f"6. limits are not what decides: {r['verdict']} comes first")
    elif failing:
        _out(f"6. failing levels: {', '.join(failing)}; the narrowest, "
             f"{r['narrowest_failing']}, gives the reason {r['verdict']}")
    else:
        _out("6. every level has room" + (" (after clamping)" if r["max_output_tokens"] else ""))
