"""``spendkeeper replay``: a period's recorded usage re-priced and re-decided under a policy.

The ledger's journal keeps every settled record of a period (who, what, the
exact usage, when, what it cost). :func:`replay` takes those records and a
policy (usually a proposed one) and answers two questions:

* **What would it have cost?** Each record is re-priced under the policy, in
  the order the ledger settled them, with each org's free tool allowances
  consumed in that order as the ledger does. Figures are grouped per org,
  user type (the type the record was charged to), user and model: recorded
  vs re-priced, in exact nano-USD (and the exact atto-USD sums).
* **What would it have allowed?** The records are replayed in time order
  against fresh counters: each is decided with :func:`policy.decide.decide`
  using its recorded usage as the estimate; an allowed request then adds its
  re-priced cost to its levels, a denied one adds nothing (it would not have
  happened), and in shadow mode it is allowed and counted as a would-be deny.

Under an unchanged policy the re-priced figures equal the recorded ones
exactly. Corrections (``adjustments``) are not journal records and are not
replayed.
"""

from __future__ import annotations

import collections
import dataclasses
import datetime as dt
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from policy.decide import Key, Request, decide, scopes_for
from policy.model import OrgPolicy, Policy, atto_to_usd
from policy.pricing import Cost, Usage, price
from sidecar.explain import LedgerReader, usd
from sidecar.ledger.store import SEQ, loads

__all__ = ["JournalRecord", "ReplayReport", "Totals", "read_journal", "replay"]

_MAX_EXAMPLES = 20


@dataclass(frozen=True, slots=True)
class JournalRecord:
    """One settled record as the journal keeps it."""

    seq: int
    request: Request
    user_type: str
    nanos: int
    atto: int
    priced: bool
    late: bool


def read_journal(reader: LedgerReader, period: str, org: str | None = None) -> list[JournalRecord]:
    """Every record settled into ``period`` (for ``org``, or all orgs), in settlement order."""
    prefix = (period, org) if org is not None else (period,)
    records = []
    for key, value in reader.scan("journal", prefix):
        entry = loads(value)
        usage = Usage(**entry.get("usage", {}))
        req = Request(entry["id"], entry["org"], entry["user"], entry["product"],
                      entry["model"], usage, dt.datetime.fromisoformat(entry["at"]),
                      entry.get("tier", "standard"), entry.get("speed", "standard"),
                      entry.get("geo", ""))
        records.append(JournalRecord(SEQ.unpack(key[-SEQ.size:])[0], req,
                                     entry.get("type", ""), int(entry["nanos"]),
                                     int(entry.get("atto", 0)), bool(entry.get("priced", True)),
                                     bool(entry.get("late", False))))
    records.sort(key=lambda r: r.seq)
    return records


@dataclass
class Totals:
    """Recorded vs re-priced figures of a group of records."""

    records: int = 0
    recorded_nanos: int = 0
    repriced_nanos: int = 0
    recorded_atto: int = 0
    repriced_atto: int = 0
    unpriced: int = 0  # records the policy cannot price (unknown org or model)

    def add(self, rec: JournalRecord, cost: Cost | None) -> None:
        """Count one record and its re-priced cost (None or unpriced: zero)."""
        self.records += 1
        self.recorded_nanos += rec.nanos
        self.recorded_atto += rec.atto
        if cost is None or not cost.priced:
            self.unpriced += 1
        else:
            self.repriced_nanos += cost.nanos
            self.repriced_atto += cost.atto

    @property
    def difference_nanos(self) -> int:
        """Re-priced minus recorded (negative: cheaper under the policy)."""
        return self.repriced_nanos - self.recorded_nanos

    def to_json(self) -> dict[str, Any]:
        """Exact decimal USD strings (enforcement nanos) plus the exact atto-USD sums."""
        return {"records": self.records, "recorded_usd": usd(self.recorded_nanos),
                "repriced_usd": usd(self.repriced_nanos),
                "difference_usd": usd(self.difference_nanos),
                "recorded_nanos": self.recorded_nanos, "repriced_nanos": self.repriced_nanos,
                "recorded_exact_usd": format(atto_to_usd(self.recorded_atto), "f"),
                "repriced_exact_usd": format(atto_to_usd(self.repriced_atto), "f"),
                "unpriced": self.unpriced}


@dataclass
class ReplayReport:
    """A period replayed under a policy."""

    period: str
    policy_version: str
    totals: Totals = dataclasses.field(default_factory=Totals)
    orgs: dict[str, Totals] = dataclasses.field(default_factory=dict)
    types: dict[tuple[str, str], Totals] = dataclasses.field(default_factory=dict)
    users: dict[tuple[str, str], Totals] = dataclasses.field(default_factory=dict)
    models: dict[tuple[str, str], Totals] = dataclasses.field(default_factory=dict)
    user_types: dict[tuple[str, str], str] = dataclasses.field(default_factory=dict)
    allowed: int = 0
    denied: int = 0
    would_deny: collections.Counter[str] = dataclasses.field(
        default_factory=collections.Counter)
    shadow_would_deny: int = 0
    examples: list[dict[str, Any]] = dataclasses.field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        """Everything as JSON, orgs sorted by name and users by recorded cost."""
        orgs = []
        for org in sorted(self.orgs):
            def rows(table: dict[tuple[str, str], Totals], label: str,
                     org: str = org) -> list[dict[str, Any]]:
                keys = sorted((k for k in table if k[0] == org),
                              key=lambda k: (-table[k].recorded_nanos, k[1]))
                return [{label: k[1], **table[k].to_json()} for k in keys]
            users = rows(self.users, "user")
            for line in users:
                line["user_type"] = self.user_types.get((org, line["user"]), "")
            orgs.append({"org": org, **self.orgs[org].to_json(),
                         "user_types": rows(self.types, "user_type"), "users": users,
                         "models": rows(self.models, "model")})
        return {"period": self.period, "policy_version": self.policy_version,
                "totals": self.totals.to_json(), "orgs": orgs,
                "decisions": {"replayed": self.allowed + self.denied, "allowed": self.allowed,
                              "denied": self.denied, "would_deny": dict(self.would_deny),
                              "shadow_would_deny": self.shadow_would_deny,
                              "examples": self.examples}}


def _reprice(policy: Policy, records: Iterable[JournalRecord]) -> dict[int, Cost | None]:
    """Each record's cost under ``policy``, consuming free allowances in settlement order."""
    free: dict[str, dict[str, int]] = {}
    costs: dict[int, Cost | None] = {}
    for rec in records:
        req = rec.request
        org = policy.orgs.get(req.org)
        if org is None:
            costs[rec.seq] = None
            continue
        left = free.setdefault(org.name, {name: rate.free_per_month
                                          for name, rate in org.rates.tools.items()
                                          if rate.free_per_month})
        cost = price(org.rates, req.model, req.usage, req.at, service_tier=req.service_tier,
                     speed=req.speed, geo=req.geo, free_remaining=left)
        for line in cost.lines:
            if line.free:
                tool = line.meter.removeprefix("tool:")
                left[tool] = max(left.get(tool, 0) - line.free, 0)
        costs[rec.seq] = cost
    return costs


def _month(key: Key) -> Key:
    """Counter keys of one replayed period: every month key maps to the same period."""
    return ("month", *key[1:]) if len(key[0]) == 7 else key


def _decide_all(report: ReplayReport, policy: Policy, records: list[JournalRecord],
                costs: dict[int, Cost | None]) -> None:
    counters: dict[Key, int] = {}

    def read(key: Key) -> tuple[int, int]:
        return counters.get(_month(key), 0), 0

    for rec in sorted(records, key=lambda r: (r.request.at, r.seq)):
        req = rec.request
        decision = decide(policy, req, read)
        if decision.verdict != "WITHIN_LIMITS":
            report.would_deny[decision.verdict] += 1
            report.shadow_would_deny += decision.shadow
            if len(report.examples) < _MAX_EXAMPLES:
                report.examples.append({"request_id": req.request_id, "org": req.org,
                                        "user": req.user, "at": req.at.isoformat(),
                                        "reason": decision.verdict, "shadow": decision.shadow,
                                        "message": decision.message})
        if not decision.allowed:
            report.denied += 1
            continue
        report.allowed += 1
        org: OrgPolicy = policy.orgs[req.org]
        member = org.member(req.user)
        cost = costs.get(rec.seq)
        if member is None or cost is None:
            continue
        for scope in scopes_for(org, member, req.at):
            key = _month(scope.key)
            counters[key] = counters.get(key, 0) + cost.nanos


def replay(policy: Policy, records: list[JournalRecord], period: str) -> ReplayReport:
    """Re-price and re-decide ``records`` (one period's journal) under ``policy``."""
    report = ReplayReport(period, policy.version)
    costs = _reprice(policy, records)
    for rec in records:
        req = rec.request
        cost = costs[rec.seq]
        report.totals.add(rec, cost)
        report.orgs.setdefault(req.org, Totals()).add(rec, cost)
        for group, name in ((report.types, rec.user_type), (report.users, req.user),
                            (report.models, req.model)):
            group.setdefault((req.org, name), Totals()).add(rec, cost)
        report.user_types[(req.org, req.user)] = rec.user_type
    _decide_all(report, policy, records, costs)
    return report
