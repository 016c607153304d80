"""The ledger: atomic hierarchical reservations and idempotent settlement in LMDB.

Each Authorize and Record is one LMDB write transaction, so checking every
level and reserving at every level happen atomically, across threads and
across processes sharing the environment. Request ids make both idempotent:
the same id with the same payload gets the stored first answer; with another
payload, :class:`~sidecar.ledger.store.Conflict`.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import lmdb

from policy.decide import Key, Request, decide
from policy.model import Policy
from sidecar.ledger._settle import settle
from sidecar.ledger.results import (
    AuthorizeResult,
    Clock,
    LevelView,
    RecordResult,
    SystemClock,
    auth_from,
    auth_json,
    auth_result,
    rec_from,
    rec_json,
)
from sidecar.ledger.store import (
    COUNTER,
    DATABASES,
    SEQ,
    Conflict,
    GroupSync,
    LedgerFull,
    LedgerUnavailable,
    boot_id,
    dumps,
    encode_key,
    fault_sync_check,
    is_hashed,
    iter_prefix,
    open_env,
    pack_entry,
    unpack_entry,
)

__all__ = ["AuthorizeResult", "Clock", "Ledger", "LevelView", "RecordResult", "SystemClock"]

DEFAULT_MAP_SIZE = 4 << 30  # 4 GiB of address space; the file grows only as used


def _fingerprint(kind: str, req: Request, at_given: bool) -> bytes:
    """A digest of everything a retry must repeat (``at`` only if the caller set it)."""
    usage = req.usage
    parts = (kind, req.org, req.user, req.product, req.model, usage.input_tokens,
             usage.output_tokens, usage.cache_write_5m_tokens, usage.cache_write_1h_tokens,
             usage.cache_read_tokens, usage.web_search_requests, usage.web_fetch_requests,
             usage.code_execution_seconds, req.service_tier, req.speed, req.geo,
             req.allow_clamp, req.at.timestamp() if at_given else None)
    return hashlib.blake2b(repr(parts).encode(), digest_size=12).digest()


class Ledger:
    """Spend counters, reservations and settled records in one LMDB environment."""

    def __init__(self, path: str | Path, *, map_size: int = DEFAULT_MAP_SIZE,
                 reservation_ttl: float = 300.0, clock: Clock | None = None,
                 durable: bool = True) -> None:
        self.path = Path(path)
        self.env = open_env(self.path, map_size)
        self.clock = clock or SystemClock()
        self.ttl_ns = int(reservation_ttl * 1e9)
        self.boot = boot_id()
        self.dbs = {name: self.env.open_db(name.encode()) for name in DATABASES}
        self._counters = self.dbs["counters"]
        self._requests = self.dbs["requests"]
        self._expiry = self.dbs["expiry"]
        self._faults = (self.path / "FAULTS_ENABLED").exists()
        self.group = GroupSync(self._sync) if durable else None
        self.expired_total = 0
        self._lock = threading.Lock()  # guards expired_total (reaped from several threads)
        self.run_write(self._mark_boot)
        self.env.reader_check()

    def _mark_boot(self, txn: lmdb.Transaction) -> None:
        stored_boot = txn.get(b"boot", db=self.dbs["meta"])
        if stored_boot is not None and bytes(stored_boot).decode() != self.boot:
            # Deadlines from another boot mean nothing now: those calls are gone.
            self._expire_all(txn)
        txn.put(b"boot", self.boot.encode(), db=self.dbs["meta"])

    # ---------------------------------------------------------------- plumbing
    def _sync(self) -> None:
        if self._faults:
            fault_sync_check(self.path)
        self.env.sync(True)

    def close(self) -> None:
        """Wait for pending syncs and close the environment."""
        if self.group is not None:
            self.group.close()
        self.env.close()

    def _check_usable(self) -> None:
        if self.group is not None and self.group.failed is not None:
            raise LedgerUnavailable(f"storage failed earlier ({self.group.failed}); restart "
                                    "the sidecar once the disk is healthy")

    def _write(self) -> lmdb.Transaction:
        self._check_usable()
        return self.env.begin(write=True)

    def run_write(self, fn: Callable[[lmdb.Transaction], Any]) -> Any:
        """Run ``fn`` in one write transaction (committed unless it raises), mapping
        storage errors to :class:`LedgerFull` / :class:`LedgerUnavailable`."""
        txn = self._write()
        try:
            result = fn(txn)
            txn.commit()
        except lmdb.MapFullError:
            txn.abort()
            raise LedgerFull("the ledger's LMDB map is full; nothing was changed (raise "
                             "--map-size)") from None
        except lmdb.Error as exc:
            txn.abort()
            raise LedgerUnavailable(f"storage error: {exc}") from exc
        except BaseException:
            txn.abort()
            raise
        return result

    def _durable(self) -> None:
        if self.group is not None:
            self.group.wait(self.group.ticket())

    def counter(self, txn: lmdb.Transaction, key: Key) -> tuple[int, int, int]:
        """(spent, reserved, requests) of a counter key."""
        raw = txn.get(encode_key(key), db=self._counters)
        if raw is None:
            return 0, 0, 0
        spent, reserved, count = COUNTER.unpack_from(raw)
        return spent, reserved, count

    def add_counter(self, txn: lmdb.Transaction, key: Key, spent: int = 0, reserved: int = 0,
                    requests: int = 0) -> tuple[int, int, int]:
        """Add to a counter inside ``txn`` (the one place that knows its encoding);
        returns its new (spent, reserved, requests)."""
        ekey = encode_key(key)
        raw = txn.get(ekey, db=self._counters)
        if raw is None:
            values = (spent, reserved, requests)
        else:
            old = COUNTER.unpack_from(raw)
            values = (old[0] + spent, old[1] + reserved, old[2] + requests)
        packed = COUNTER.pack(*values)
        if is_hashed(ekey):
            packed += dumps(list(key))
        txn.put(ekey, packed, db=self._counters)
        return values

    def next_seq(self, txn: lmdb.Transaction, name: bytes) -> bytes:
        """The next number of sequence ``name`` (8 bytes, big-endian) inside ``txn``."""
        meta = self.dbs["meta"]
        raw = txn.get(name, db=meta)
        seq = (SEQ.unpack(raw)[0] if raw else 0) + 1
        txn.put(name, SEQ.pack(seq), db=meta)
        return SEQ.pack(seq)

    # ---------------------------------------------------------------- authorize
    def authorize(self, policy: Policy, req: Request, *, at_given: bool = True,
                  shadow: bool = False) -> AuthorizeResult:
        """Decide and, if allowed, reserve the worst case at every level atomically."""
        fp = _fingerprint("authorize", req, at_given)
        now_ns = self.clock.monotonic_ns()

        def work(txn: lmdb.Transaction) -> AuthorizeResult:
            rkey = req.request_id.encode()
            raw = txn.get(rkey, db=self._requests)
            if raw is not None:
                previous = unpack_entry(raw)
                if "auth" in previous:
                    if previous["afp"] != fp:
                        raise Conflict(f'request_id "{req.request_id}" was already used for '
                                       "a different Authorize")
                    return auth_from(previous["auth"], replayed=True)
                raise Conflict(f'request_id "{req.request_id}" was already recorded')

            seen: dict[Key, tuple[bytes, tuple[int, int, int]]] = {}

            def read(key: Key) -> tuple[int, int]:
                ekey = encode_key(key)
                raw_counter = txn.get(ekey, db=self._counters)
                values = COUNTER.unpack_from(raw_counter) if raw_counter else (0, 0, 0)
                seen[key] = (ekey, values)
                return values[0], values[1]

            decision = decide(policy, req, read, shadow=shadow)
            expires = None
            entry: dict[str, Any] = {"afp": fp}
            if decision.allowed and decision.reserve > 0:
                deadline = now_ns + self.ttl_ns
                keys = [list(lv.scope.key) for lv in decision.levels]
                for lv in decision.levels:
                    # Counters read by the decision are rewritten without a second lookup.
                    ekey, (spent, reserved, count) = seen[lv.scope.key]
                    packed = COUNTER.pack(spent, reserved + decision.reserve, count)
                    if is_hashed(ekey):
                        packed += dumps(list(lv.scope.key))
                    txn.put(ekey, packed, db=self._counters)
                entry.update(state="reserved", amount=decision.reserve, keys=keys,
                             deadline=deadline, boot=self.boot)
                txn.put(SEQ.pack(deadline) + rkey, b"", db=self._expiry)
                expires = self.clock.now() + dt.timedelta(microseconds=self.ttl_ns // 1000)
            else:
                entry["state"] = "allowed" if decision.allowed else "denied"
            result = auth_result(decision, policy.version, expires)
            entry["auth"] = auth_json(result)
            txn.put(rkey, pack_entry(entry), db=self._requests)
            return result

        result: AuthorizeResult = self.run_write(work)
        return result

    # ---------------------------------------------------------------- release / expiry
    def _drop_reservation(self, txn: lmdb.Transaction, rkey: bytes, entry: dict[str, Any],
                          state: str) -> None:
        for key in entry["keys"]:
            self.add_counter(txn, tuple(key), reserved=-entry["amount"])
        txn.delete(SEQ.pack(entry["deadline"]) + rkey, db=self._expiry)
        entry["state"] = state
        txn.put(rkey, pack_entry(entry), db=self._requests)

    def _expired(self, entry: dict[str, Any], now_ns: int) -> bool:
        return entry.get("state") == "reserved" and (
            entry.get("boot") != self.boot or now_ns >= entry["deadline"])

    def release(self, request_id: str) -> bool:
        """Drop a live reservation without charging; False if there is none."""
        def work(txn: lmdb.Transaction) -> bool:
            rkey = request_id.encode()
            raw = txn.get(rkey, db=self._requests)
            if raw is None:
                return False
            entry = unpack_entry(raw)
            if entry.get("state") != "reserved":
                return False
            expired = self._expired(entry, self.clock.monotonic_ns())
            self._drop_reservation(txn, rkey, entry, "expired" if expired else "released")
            return not expired

        released: bool = self.run_write(work)
        return released

    def reap(self, limit: int = 1000) -> int:
        """Expire reservations whose TTL has passed; returns how many."""
        now_ns = self.clock.monotonic_ns()

        def work(txn: lmdb.Transaction) -> int:
            done = 0
            cursor = txn.cursor(db=self._expiry)
            due: list[bytes] = []
            for key in cursor.iternext(keys=True, values=False):
                if SEQ.unpack_from(key)[0] > now_ns or len(due) >= limit:
                    break
                due.append(bytes(key))
            for key in due:
                rkey = key[SEQ.size:]
                raw = txn.get(rkey, db=self._requests)
                if raw is None:
                    txn.delete(key, db=self._expiry)
                    continue
                entry = unpack_entry(raw)
                if entry.get("state") == "reserved":
                    self._drop_reservation(txn, rkey, entry, "expired")
                    done += 1
                else:
                    txn.delete(key, db=self._expiry)
            return done

        count: int = self.run_write(work)
        with self._lock:
            self.expired_total += count
        return count

    def _expire_all(self, txn: lmdb.Transaction) -> None:
        cursor = txn.cursor(db=self._expiry)
        keys = [bytes(k) for k in cursor.iternext(keys=True, values=False)]
        for key in keys:
            rkey = key[SEQ.size:]
            raw = txn.get(rkey, db=self._requests)
            if raw is not None and unpack_entry(raw).get("state") == "reserved":
                self._drop_reservation(txn, rkey, unpack_entry(raw), "expired")
            else:
                txn.delete(key, db=self._expiry)

    def outstanding(self) -> int:
        """How many reservations are live (not yet settled, released or reaped)."""
        with self.env.begin() as txn:
            return int(txn.stat(self._expiry)["entries"])

    # ---------------------------------------------------------------- record
    def record(self, policy: Policy, req: Request, *, at_given: bool = True) -> RecordResult:
        """Settle ``req`` with its actual usage; durable before it returns."""
        fp = _fingerprint("record", req, at_given)
        now = self.clock.now()
        now_ns = self.clock.monotonic_ns()

        def work(txn: lmdb.Transaction) -> RecordResult:
            rkey = req.request_id.encode()
            raw = txn.get(rkey, db=self._requests)
            entry: dict[str, Any] = unpack_entry(raw) if raw is not None else {}
            if "rec" in entry:
                if entry["rfp"] != fp:
                    raise Conflict(f'request_id "{req.request_id}" was already recorded with a '
                                   "different payload")
                return dataclasses.replace(rec_from(entry["rec"]), duplicate=True)
            if entry.get("state") == "reserved":
                expired = self._expired(entry, now_ns)
                self._drop_reservation(txn, rkey, entry, "expired" if expired else "settling")
            result = settle(self, txn, policy, req, now)
            entry.update(state="settled", rfp=fp, rec=rec_json(result))
            txn.put(rkey, pack_entry(entry), db=self._requests)
            return result

        result: RecordResult = self.run_write(work)
        # Duplicates too: the first commit may not be fsync'd yet (its writer is still
        # waiting, or its fsync failed in another process), and this answer acknowledges it.
        self._durable()
        return result

    # ---------------------------------------------------------------- reading
    def read(self) -> lmdb.Transaction:
        """A read-only snapshot transaction (use as a context manager)."""
        return self.env.begin()

    def scan(self, db: str, prefix: tuple[str, ...]) -> Iterator[tuple[bytes, bytes]]:
        """Every (key, value) of ``db`` whose key starts with ``prefix``'s encoding."""
        with self.env.begin() as txn:
            yield from iter_prefix(txn, self.dbs[db], prefix)
