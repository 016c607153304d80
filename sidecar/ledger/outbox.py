"""The notification outbox: reading, claiming and settling threshold notifications.

:meth:`~sidecar.ledger.core.Ledger.record` writes one outbox entry per threshold
crossing inside the Record's own transaction (so the notification is exactly as
durable as the spend that caused it). This module is the other side: the
notifier finds entries that are due, **claims** one with a lease before sending
it (so of several processes sharing the environment only one sends it at a
time), then marks it delivered or records the failed attempt and when to retry.

Each step is its own small write transaction and none calls ``env.sync()``.
A commit without fsync already survives a process crash (LMDB's guarantee
without ``writemap``/``map_async``), so a restarted sidecar never re-sends a
delivery it marked. Only an OS crash or power loss in the moments after a
delivery could lose the mark, and then the entry is simply sent again with
the same idempotency key — within the at-least-once contract, and cheaper than
an extra fsync per delivery. The next Record's group commit syncs the mark
anyway.

Times here are wall-clock milliseconds since the epoch (integers): leases and
retry times must mean the same thing in every process and across restarts.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import lmdb

from sidecar.ledger.core import Ledger
from sidecar.ledger.store import SEQ, dumps, loads

__all__ = [
    "LOW_WATER", "OutboxStats", "claim", "due", "entries", "get", "mark_delivered",
    "record_failure", "stats",
]

#: Key in the ``meta`` database: every outbox seq at or below it is delivered,
#: so scans for pending entries start after it instead of at the beginning.
LOW_WATER = b"outbox_low_water"
#: How many entries one scan for due work looks at (bounds a poll's cost).
SCAN_LIMIT = 10_000


@dataclass(frozen=True, slots=True)
class OutboxStats:
    """Undelivered notifications, and how many of them have failed at least once."""

    pending: int
    retrying: int


def _low_water(txn: lmdb.Transaction, ledger: Ledger) -> int:
    raw = txn.get(LOW_WATER, db=ledger.dbs["meta"])
    return int(SEQ.unpack(raw)[0]) if raw else 0


def _undelivered(txn: lmdb.Transaction, ledger: Ledger,
                 limit: int = SCAN_LIMIT) -> Iterator[dict[str, Any]]:
    """Undelivered entries in seq order, starting after the low-water mark."""
    cursor = txn.cursor(db=ledger.dbs["outbox"])
    if not cursor.set_range(SEQ.pack(_low_water(txn, ledger) + 1)):
        return
    for seen, (_key, value) in enumerate(cursor):
        if seen >= limit:
            return
        entry: dict[str, Any] = loads(value)
        if not entry.get("delivered"):
            yield entry


def entries(ledger: Ledger) -> list[dict[str, Any]]:
    """Every outbox entry, delivered or not, in seq order (for audits and tests)."""
    with ledger.read() as txn:
        return [loads(value) for _key, value in txn.cursor(db=ledger.dbs["outbox"])]


def get(ledger: Ledger, seq: int) -> dict[str, Any] | None:
    """The entry ``seq``, or None."""
    with ledger.read() as txn:
        raw = txn.get(SEQ.pack(seq), db=ledger.dbs["outbox"])
        return loads(raw) if raw is not None else None


def _is_due(entry: dict[str, Any], now_ms: int) -> bool:
    return (not entry.get("delivered") and entry.get("retry_at_ms", 0) <= now_ms
            and entry.get("lease_until_ms", 0) <= now_ms)


def due(ledger: Ledger, now_ms: int, limit: int = 100) -> list[dict[str, Any]]:
    """Undelivered entries whose retry time has come and that nobody holds a lease on."""
    found: list[dict[str, Any]] = []
    with ledger.read() as txn:
        for entry in _undelivered(txn, ledger):
            if _is_due(entry, now_ms):
                found.append(entry)
                if len(found) >= limit:
                    break
    return found


def stats(ledger: Ledger) -> OutboxStats:
    """How many notifications wait, and how many of those already failed once."""
    pending = retrying = 0
    with ledger.read() as txn:
        for entry in _undelivered(txn, ledger):
            pending += 1
            retrying += entry.get("attempts", 0) > 0
    return OutboxStats(pending, retrying)


def _update(ledger: Ledger, seq: int,
            change: Callable[[dict[str, Any]], dict[str, Any] | None]) -> dict[str, Any] | None:
    """Apply ``change(entry) -> entry | None`` (None: leave it) to ``seq`` in one write txn."""
    key = SEQ.pack(seq)
    with ledger.env.begin(write=True) as txn:
        raw = txn.get(key, db=ledger.dbs["outbox"])
        if raw is None:
            return None
        updated = change(loads(raw))
        if updated is not None:
            txn.put(key, dumps(updated), db=ledger.dbs["outbox"])
        return updated


def claim(ledger: Ledger, seq: int, owner: str, now_ms: int,
          lease_ms: int) -> dict[str, Any] | None:
    """Take a lease on entry ``seq`` so that only ``owner`` sends it; None if not ours now.

    The check and the lease are one write transaction, and LMDB admits one
    writer at a time across processes: two notifiers can never both win.
    """
    def change(entry: dict[str, Any]) -> dict[str, Any] | None:
        if not _is_due(entry, now_ms):
            return None
        entry.update(lease_owner=owner, lease_until_ms=now_ms + lease_ms)
        return entry

    return _update(ledger, seq, change)


def mark_delivered(ledger: Ledger, seq: int, owner: str, now_ms: int, how: str) -> bool:
    """Mark ``seq`` delivered (``how``: "webhook" or "logged"); False if it already was.

    Marked even when the lease ran out meanwhile: the receiver has the
    notification, so nobody should send it again.
    """
    key = SEQ.pack(seq)
    with ledger.env.begin(write=True) as txn:
        raw = txn.get(key, db=ledger.dbs["outbox"])
        if raw is None:
            return False
        entry = loads(raw)
        if entry.get("delivered"):
            return False
        entry.update(delivered=True, delivered_as=how, delivered_at_ms=now_ms,
                     delivered_by=owner, lease_owner=None, lease_until_ms=0)
        txn.put(key, dumps(entry), db=ledger.dbs["outbox"])
        _advance_low_water(txn, ledger)
    return True


def _advance_low_water(txn: lmdb.Transaction, ledger: Ledger) -> None:
    low = _low_water(txn, ledger)
    start = low
    cursor = txn.cursor(db=ledger.dbs["outbox"])
    if cursor.set_range(SEQ.pack(low + 1)):
        for key, value in cursor:
            seq = int(SEQ.unpack(key)[0])
            if seq != low + 1 or not loads(value).get("delivered"):
                break
            low = seq
    if low != start:
        txn.put(LOW_WATER, SEQ.pack(low), db=ledger.dbs["meta"])


def record_failure(ledger: Ledger, seq: int, owner: str, error: str, now_ms: int,
                   retry_at_ms: int) -> dict[str, Any] | None:
    """Count a failed attempt on ``seq``, note why, and set when to try again."""
    def change(entry: dict[str, Any]) -> dict[str, Any] | None:
        if entry.get("delivered"):
            return None
        entry.update(attempts=entry.get("attempts", 0) + 1, last_error=error[:500],
                     last_attempt_ms=now_ms, retry_at_ms=retry_at_ms)
        if entry.get("lease_owner") == owner:  # another may hold it by now: leave theirs
            entry.update(lease_owner=None, lease_until_ms=0)
        return entry

    return _update(ledger, seq, change)
