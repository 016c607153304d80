"""Corrections: credits and charges as new ledger entries, never edits.

A correction (a credit for an outage, a re-priced request) is appended to the
``adjustments`` database under ``(period, org)`` and a sequence number, as a
JSON entry with its id, user, exact amount in USD, reason and time. Nothing
already recorded is changed: the journal and the usage aggregates stay as the
requests left them, and the invoice shows corrections in their own section.

By default a correction also moves the enforcement counters of its period
(user, user type and org; never the per-day window): a credit restores
headroom, a charge uses it up, and the usage report, ``GetUsage`` and the
spend metric include it. ``counters=False`` records an invoice-only
correction. Each is fsync'd before :func:`add_adjustment` returns.
"""

from __future__ import annotations

import datetime as dt
import uuid
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from typing import Any

import lmdb

from policy.decide import scopes_for
from policy.model import NANOS_PER_USD, MemberDef, OrgPolicy
from policy.periods import month_bounds, parse_period
from sidecar.ledger.core import Ledger
from sidecar.ledger.store import SEQ, Conflict, LedgerUnavailable, dumps, encode_key, loads

__all__ = [
    "MAX_AMOUNT_USD", "Adjustment", "AdjustmentError", "add_adjustment", "list_adjustments",
    "parse_amount", "scan_adjustments",
]

#: The largest correction accepted, in USD (nano-USD counters are 64-bit).
MAX_AMOUNT_USD = Decimal(10) ** 9
_SEQ_NAME = b"adjustments_seq"
_MAX_REASON = 1000
_MAX_ID_BYTES = 256


class AdjustmentError(ValueError):
    """A correction's fields are invalid; the message names the field."""


@dataclass(frozen=True, slots=True)
class Adjustment:
    """One correction as stored: positive amounts charge, negative ones credit."""

    seq: int
    id: str
    org: str
    user: str
    user_type: str
    period: str
    amount: Decimal  # exact USD, whole nano-USD
    reason: str
    at: dt.datetime
    model: str | None = None
    counters: bool = True  # whether the enforcement counters moved

    @property
    def nanos(self) -> int:
        """The amount in integer nano-USD (exact by construction)."""
        return int(self.amount * NANOS_PER_USD)

    def to_json(self) -> dict[str, Any]:
        """The stored form: the amount as an exact decimal string."""
        return {"seq": self.seq, "id": self.id, "org": self.org, "user": self.user,
                "type": self.user_type, "period": self.period,
                "amount": format(self.amount, "f"), "reason": self.reason,
                "at": self.at.isoformat(), "model": self.model, "counters": self.counters,
                # What the correction added to each month counter (the auditor's sum).
                "nanos": self.nanos if self.counters else 0}

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> Adjustment:
        """The inverse of :meth:`to_json`."""
        return cls(raw["seq"], raw["id"], raw["org"], raw["user"], raw.get("type", ""),
                   raw["period"], Decimal(raw["amount"]), raw["reason"],
                   dt.datetime.fromisoformat(raw["at"]), raw.get("model"),
                   raw.get("counters", True))


def parse_amount(text: str) -> Decimal:
    """A correction amount in USD: exact, non-zero, whole nano-USD, within bounds."""
    try:
        amount = Decimal(text.strip().replace(",", "").removeprefix("$"))
    except InvalidOperation:
        raise AdjustmentError(f"amount {text!r} is not a decimal number of USD") from None
    if not amount.is_finite():
        raise AdjustmentError(f"amount {text!r} is not a finite number")
    if amount == 0:
        raise AdjustmentError("amount is zero: a correction must change something")
    if abs(amount) > MAX_AMOUNT_USD:
        raise AdjustmentError(f"amount {text} is beyond +-{MAX_AMOUNT_USD:,} USD")
    exponent = amount.normalize().as_tuple().exponent
    if isinstance(exponent, int) and exponent < -9:
        raise AdjustmentError(f"amount {text} has more than 9 decimals (nano-USD is the "
                              "smallest unit the ledger counts)")
    return amount


def _check_text(name: str, value: str, limit: int) -> None:
    if not value.strip():
        raise AdjustmentError(f"{name} is required")
    if len(value.encode("utf-8", "surrogatepass")) > limit:
        raise AdjustmentError(f"{name} is longer than {limit} bytes")
    if any(ord(c) < 0x20 or 0xD800 <= ord(c) <= 0xDFFF for c in value):
        raise AdjustmentError(f"{name} contains control characters or invalid UTF-8")


def _prefix(period: str, org: str) -> bytes:
    return encode_key((period, org)) + b"\x1f"


def scan_adjustments(txn: lmdb.Transaction, ledger: Ledger, period: str,
                     org: str) -> list[Adjustment]:
    """The corrections of ``org`` in ``period`` as seen by ``txn`` (one snapshot)."""
    prefix = _prefix(period, org)
    cursor = txn.cursor(db=ledger.dbs["adjustments"])
    found: list[Adjustment] = []
    if not cursor.set_range(prefix):
        return found
    for key, value in cursor:
        if not bytes(key).startswith(prefix):
            break
        found.append(Adjustment.from_json(loads(value)))
    return found


def list_adjustments(ledger: Ledger, org: str, period: str) -> list[Adjustment]:
    """Every correction of ``org`` in ``period``, in the order they were made."""
    with ledger.read() as txn:
        return scan_adjustments(txn, ledger, period, org)


def _same(entry: Adjustment, user: str, amount: Decimal, reason: str, model: str | None,
          counters: bool) -> bool:
    return (entry.user, entry.amount, entry.reason, entry.model, entry.counters) == (
        user, amount, reason, model, counters)


def add_adjustment(ledger: Ledger, org: OrgPolicy, *, user: str, period: str, amount: Decimal,
                   reason: str, model: str | None = None, adjustment_id: str | None = None,
                   counters: bool = True, now: dt.datetime | None = None,
                   ) -> tuple[Adjustment, bool]:
    """Append a correction (durably); return it and whether it is new.

    With ``adjustment_id`` the call is idempotent: the same id with the same
    fields returns the stored entry (``False``); with other fields it raises
    :class:`~sidecar.ledger.store.Conflict`. Ids are unique per org and period.
    """
    _check_text("user", user, _MAX_ID_BYTES)
    _check_text("reason", reason, _MAX_REASON)
    if model is not None:
        _check_text("model", model, _MAX_ID_BYTES)
    if adjustment_id is not None:
        _check_text("id", adjustment_id, _MAX_ID_BYTES)
    try:
        parse_period(period)
    except ValueError as exc:
        raise AdjustmentError(str(exc)) from None
    amount = parse_amount(str(amount))
    when = now or ledger.clock.now()
    member = org.member(user) or MemberDef(user, "", (), None, None, False)
    nanos = int(amount * NANOS_PER_USD)

    def work(txn: lmdb.Transaction) -> tuple[Adjustment, bool]:
        if adjustment_id is not None:
            for entry in scan_adjustments(txn, ledger, period, org.name):
                if entry.id != adjustment_id:
                    continue
                if _same(entry, user, amount, reason, model, counters):
                    return entry, False
                raise Conflict(f'correction id "{adjustment_id}" was already used for a '
                               "different correction")
        packed_seq = ledger.next_seq(txn, _SEQ_NAME)
        seq = SEQ.unpack(packed_seq)[0]
        entry = Adjustment(seq, adjustment_id or uuid.uuid4().hex, org.name, user,
                           member.user_type, period, amount, reason, when, model, counters)
        if counters:
            # The month's levels of the period's first instant; never the day window.
            # Ledger.add_counter is the one place that knows the counter encoding.
            start = month_bounds(period, org.tz)[0]
            for scope in scopes_for(org, member, start):
                if scope.level != "user_day":
                    ledger.add_counter(txn, scope.key, spent=nanos)
        txn.put(_prefix(period, org.name) + packed_seq, dumps(entry.to_json()),
                db=ledger.dbs["adjustments"])
        return entry, True

    result: tuple[Adjustment, bool] = ledger.run_write(work)
    try:
        ledger.env.sync(True)
    except lmdb.Error as exc:
        raise LedgerUnavailable(f"fsync failed ({exc}): correction {result[0].id} may not be "
                                "durable; repeat it with that id once the disk is healthy")\
            from exc
    return result
