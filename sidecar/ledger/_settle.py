"""Settling a Record inside its write transaction: charge, aggregate, journal, notify.

Split from :mod:`sidecar.ledger.core` (which owns transactions, reservations
and idempotency) so each reads on its own: everything here runs inside the one
write transaction that :meth:`Ledger.record` opens.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
from typing import TYPE_CHECKING

import lmdb

from policy.decide import Request, Scope, scopes_for
from policy.model import MemberDef, OrgPolicy, Policy
from policy.periods import month_bounds, period_key
from policy.pricing import TOOL_FIELDS, Cost, price
from sidecar.ledger.results import LevelView, RecordResult
from sidecar.ledger.store import COUNTER, SEQ, dumps, encode_key, is_hashed

if TYPE_CHECKING:
    from sidecar.ledger.core import Ledger

__all__ = ["settle"]



def settle(ledger: Ledger, txn: lmdb.Transaction, policy: Policy, req: Request,
           now: dt.datetime) -> RecordResult:
    """Charge ``req`` at every level of its period, aggregate it, journal it, and queue
    notifications for thresholds it crosses. Usage that cannot be priced is kept."""
    org = policy.orgs.get(req.org)
    if org is None:
        period = req.at.astimezone(dt.UTC).strftime("%Y-%m")
        _unpriced(ledger, txn, period, req, "unknown org")
        return RecordResult(0, False, (), period, False, policy.version)
    at, late = _attribution(org, req.at, now)
    period = period_key(at, org.tz)
    member = org.member(req.user) or MemberDef(req.user, "", (), None, None, False)
    free = _free_remaining(ledger, txn, org, period)
    cost = price(org.rates, req.model, req.usage, req.at, service_tier=req.service_tier,
                 speed=req.speed, geo=req.geo, free_remaining=free)
    if not cost.priced:
        _unpriced(ledger, txn, period, req, f'unknown model "{req.model}"')
    scopes = scopes_for(org, member, at)
    views = []
    for scope in scopes:
        spent, reserved, _ = ledger.add_counter(txn, scope.key, spent=cost.nanos, requests=1)
        views.append(LevelView(scope.level, scope.name, scope.limit, spent, reserved))
    _aggregate(ledger, txn, period, org, member, cost, late)
    _crossings(ledger, txn, org, scopes, tuple(views), cost.nanos, period, now)
    _journal(ledger, txn, period, org, member, req, cost, late)
    return RecordResult(cost.nanos, cost.priced, tuple(views), period, late, policy.version,
                        detail=cost, user_type=member.user_type)


def _attribution(org: OrgPolicy, at: dt.datetime, now: dt.datetime) -> tuple[dt.datetime, bool]:
    """When usage counts: its own period, or now if it came after the grace window."""
    current = period_key(now, org.tz)
    own = period_key(at, org.tz)
    if own >= current:
        return at, False
    closes = month_bounds(own, org.tz)[1] + dt.timedelta(days=org.grace_days)
    return (at, True) if now < closes else (now, True)


def _free_remaining(ledger: Ledger, txn: lmdb.Transaction, org: OrgPolicy,
                    period: str) -> dict[str, int]:
    free: dict[str, int] = {}
    for name, rate in org.rates.tools.items():
        if rate.free_per_month:
            raw = txn.get(encode_key((period, org.name, name)), db=ledger.dbs["allowances"])
            used = SEQ.unpack(raw)[0] if raw else 0
            free[name] = max(rate.free_per_month - used, 0)
    return free


def _aggregate(ledger: Ledger, txn: lmdb.Transaction, period: str, org: OrgPolicy,
               member: MemberDef, cost: Cost, late: bool) -> None:
    usage_db = ledger.dbs["usage"]
    flags = (", fallback" if cost.fallback else "") + (", late" if late else "")
    label = cost.label + flags
    # Tool fees are never discounted or multiplied: their lines say so.
    tool_label = "tool fee" + flags
    for line in cost.lines:
        key = (period, org.name, member.user, cost.model, line.meter, str(line.unit_usd),
               str(line.per), tool_label if line.meter.startswith("tool:") else label)
        ekey = encode_key(key)
        raw = txn.get(ekey, db=usage_db)
        qty, free, count = COUNTER.unpack_from(raw) if raw else (0, 0, 0)
        packed = COUNTER.pack(qty + line.quantity, free + line.free, count + 1)
        if is_hashed(ekey):
            packed += dumps(list(key))
        txn.put(ekey, packed, db=usage_db)
        if line.free:
            tool = line.meter.removeprefix("tool:")
            akey = encode_key((period, org.name, tool))
            raw = txn.get(akey, db=ledger.dbs["allowances"])
            used = SEQ.unpack(raw)[0] if raw else 0
            txn.put(akey, SEQ.pack(used + line.free), db=ledger.dbs["allowances"])


def _journal(ledger: Ledger, txn: lmdb.Transaction, period: str, org: OrgPolicy,
             member: MemberDef, req: Request, cost: Cost, late: bool) -> None:
    seq = ledger.next_seq(txn, b"journal_seq")
    usage = {f: getattr(req.usage, f) for f in (
        "input_tokens", "output_tokens", "cache_write_5m_tokens", "cache_write_1h_tokens",
        "cache_read_tokens", *TOOL_FIELDS.values()) if getattr(req.usage, f)}
    entry = {"id": req.request_id, "org": org.name, "user": member.user,
             "type": member.user_type, "product": req.product, "model": req.model,
             "priced_as": cost.model, "usage": usage, "tier": req.service_tier,
             "speed": req.speed, "geo": req.geo, "at": req.at.isoformat(),
             "nanos": cost.nanos, "atto": str(cost.atto), "priced": cost.priced,
             "late": late}
    txn.put(encode_key((period, org.name)) + b"\x1f" + seq, dumps(entry),
            db=ledger.dbs["journal"])


def _unpriced(ledger: Ledger, txn: lmdb.Transaction, period: str, req: Request,
              why: str) -> None:
    seq = ledger.next_seq(txn, b"unpriced_seq")
    entry = {"id": req.request_id, "org": req.org, "user": req.user, "model": req.model,
             "why": why, "at": req.at.isoformat(),
             "usage": dataclasses.asdict(req.usage)}
    txn.put(encode_key((period, req.org)) + b"\x1f" + seq, dumps(entry),
            db=ledger.dbs["unpriced"])


def _crossings(ledger: Ledger, txn: lmdb.Transaction, org: OrgPolicy,
               scopes: tuple[Scope, ...], views: tuple[LevelView, ...], added: int,
               period: str, now: dt.datetime) -> None:
    if not org.thresholds or added <= 0:
        return
    for scope, view in zip(scopes, views, strict=True):
        if scope.limit is None or scope.level == "user_day":
            continue
        before = view.spent - added
        for pct in org.thresholds:
            mark = scope.limit * pct / 100
            if before < mark <= view.spent:
                ckey = encode_key((*scope.key, str(pct)))
                if txn.get(ckey, db=ledger.dbs["crossings"]) is not None:
                    continue
                seq = ledger.next_seq(txn, b"outbox_seq")
                txn.put(ckey, seq, db=ledger.dbs["crossings"])
                note = {"seq": SEQ.unpack(seq)[0],
                        "key": hashlib.sha256(repr((scope.key, str(pct))).encode())
                        .hexdigest()[:32],
                        "org": org.name, "level": scope.level, "scope": scope.name,
                        "period": period, "threshold_percent": str(pct),
                        "spent_nanos": view.spent, "limit_nanos": scope.limit,
                        "at": now.isoformat(), "webhook": org.webhook,
                        "attempts": 0, "delivered": False}
                txn.put(seq, dumps(note), db=ledger.dbs["outbox"])
