"""Ledger conservation checks: every nano-USD settled is counted once at every level.

Each settled Record adds its cost to the user's, the user type's and the org's
counter for its period, and writes one journal entry carrying the same nanos.
So, per org and period, these must all be equal::

    Σ user spent == Σ user-type spent == org spent == Σ journal nanos + Σ corrections

and likewise Σ user reserved == Σ user-type reserved == org reserved.
Corrections (:mod:`sidecar.ledger.adjust`) that move the counters are their
own entries in the ``adjustments`` database, never journal edits, so they are
added to the journal side.
(Users with a daily limit also have a ``day`` counter; it is a second window
on the same spend, not part of the sums.) A difference means a bug or a
damaged file. :func:`conservation` checks it from scratch; :class:`Auditor`
keeps running journal sums so the metrics collector can check every scrape
without re-reading a month of journal entries each time (journal and
correction entries are append-only, so only new ones need reading).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

import lmdb

from policy.model import Policy
from policy.periods import period_key
from sidecar.ledger.core import Ledger
from sidecar.ledger.store import COUNTER, decode_key, encode_key, loads

__all__ = ["Auditor", "Balance", "balance", "conservation"]

_SEP = b"\x1f"


@dataclass(frozen=True, slots=True)
class Balance:
    """One org's period as each level (and the journal) counts it, in nano-USD."""

    org: str
    period: str
    org_spent: int
    types_spent: int
    users_spent: int
    journal_spent: int
    adjusted: int  # Σ nanos of corrections that moved the counters
    org_reserved: int
    types_reserved: int
    users_reserved: int

    @property
    def drift(self) -> int:
        """The largest difference from the org's own counter (0 when the books balance)."""
        return max(abs(self.types_spent - self.org_spent), abs(self.users_spent - self.org_spent),
                   abs(self.journal_spent + self.adjusted - self.org_spent),
                   abs(self.types_reserved - self.org_reserved),
                   abs(self.users_reserved - self.org_reserved))


def _sum_counters(txn: lmdb.Transaction, ledger: Ledger,
                  prefix: tuple[str, ...]) -> tuple[int, int]:
    """Σ spent and Σ reserved of every counter under ``prefix``."""
    start = encode_key(prefix) + _SEP
    spent = reserved = 0
    cursor = txn.cursor(db=ledger.dbs["counters"])
    if cursor.set_range(start):
        for key, value in cursor:
            if not bytes(key).startswith(start):
                break
            s, r, _ = COUNTER.unpack_from(value)
            spent += s
            reserved += r
    return spent, reserved


def _sum_entries(txn: lmdb.Transaction, ledger: Ledger, db: str, period: str, org: str,
                 after: bytes = b"") -> tuple[int, bytes]:
    """Σ "nanos" of ``db``'s (period, org) entries after key ``after``; and the last key.

    ``db`` is "journal" or "adjustments": both key entries by (period, org) and a
    sequence number and hold JSON with integer "nanos".
    """
    start = encode_key((period, org)) + _SEP
    total = 0
    last = after
    cursor = txn.cursor(db=ledger.dbs[db])
    found = cursor.set_range(after) if after else cursor.set_range(start)
    if found and after and bytes(cursor.key()) == after:
        found = cursor.next()
    while found:
        key = bytes(cursor.key())
        if not key.startswith(start):
            break
        total += int(loads(cursor.value())["nanos"])
        last = key
        found = cursor.next()
    return total, last


def _balance(txn: lmdb.Transaction, ledger: Ledger, org: str, period: str,
             journal_spent: int, adjusted: int) -> Balance:
    org_spent, org_reserved, _ = ledger.counter(txn, (period, "org", org))
    types = _sum_counters(txn, ledger, (period, "type", org))
    users = _sum_counters(txn, ledger, (period, "user", org))
    return Balance(org, period, org_spent, types[0], users[0], journal_spent, adjusted,
                   org_reserved, types[1], users[1])


def balance(ledger: Ledger, org: str, period: str) -> Balance:
    """Every level's sum for ``org`` in ``period``, from one snapshot (full journal scan)."""
    with ledger.read() as txn:
        journal, _ = _sum_entries(txn, ledger, "journal", period, org)
        adjusted, _ = _sum_entries(txn, ledger, "adjustments", period, org)
        return _balance(txn, ledger, org, period, journal, adjusted)


def _orgs_in(ledger: Ledger, period: str) -> set[str]:
    """Orgs with an org-level counter in ``period`` (also those a policy no longer lists)."""
    start = encode_key((period, "org")) + _SEP
    orgs = set()
    with ledger.read() as txn:
        cursor = txn.cursor(db=ledger.dbs["counters"])
        if cursor.set_range(start):
            for key, value in cursor:
                if not bytes(key).startswith(start):
                    break
                orgs.add(decode_key(bytes(key), bytes(value)[COUNTER.size:])[2])
    return orgs


def conservation(ledger: Ledger, policy: Policy, period: str | None = None) -> list[Balance]:
    """The orgs whose books do not balance in ``period`` (default: each org's current one).

    An empty list means every nano-USD is counted once at every level.
    """
    checks: set[tuple[str, str]] = set()
    if period is None:
        now = ledger.clock.now()
        checks = {(name, period_key(now, org.tz)) for name, org in policy.orgs.items()}
    else:
        checks = {(name, period) for name in {*policy.orgs, *_orgs_in(ledger, period)}}
    found = [balance(ledger, org, p) for org, p in sorted(checks)]
    return [b for b in found if b.drift != 0]


class Auditor:
    """Conservation checks for every scrape, reading only journal entries not seen before."""

    def __init__(self, ledger: Ledger) -> None:
        self.ledger = ledger
        #: (db, org, period) -> (Σ nanos so far, last key read)
        self._sums: dict[tuple[str, str, str], tuple[int, bytes]] = {}
        self._lock = threading.Lock()

    def balance(self, org: str, period: str) -> Balance:
        """Like :func:`balance`, continuing the journal sum where the last call stopped."""
        with self._lock, self.ledger.read() as txn:
            if len(self._sums) > 20_000:  # periods long gone: start over
                self._sums.clear()
            totals = []
            for db in ("journal", "adjustments"):
                total, last = self._sums.get((db, org, period), (0, b""))
                more, last = _sum_entries(txn, self.ledger, db, period, org, last)
                self._sums[(db, org, period)] = (total + more, last)
                totals.append(total + more)
            return _balance(txn, self.ledger, org, period, totals[0], totals[1])
