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
import struct
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lmdb

from policy.decide import Decision, Key, Level, Request, Scope, decide, scopes_for
from policy.model import MemberDef, OrgPolicy, Policy
from policy.periods import month_bounds, period_key
from policy.pricing import TOOL_FIELDS, Cost, price
from sidecar.ledger.store import (
    COUNTER,
    DATABASES,
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

_SEQ = struct.Struct(">Q")
_DEADLINE = struct.Struct(">Q")
DEFAULT_MAP_SIZE = 4 << 30  # 4 GiB of address space; the file grows only as used


class Clock:
    """Time as the ledger sees it: wall clock for periods, monotonic for TTLs."""

    def now(self) -> dt.datetime:
        """The current UTC time."""
        raise NotImplementedError

    def monotonic_ns(self) -> int:
        """A monotonic reading (CLOCK_MONOTONIC is shared by processes of one boot)."""
        raise NotImplementedError


class SystemClock(Clock):
    """The real clocks."""

    def now(self) -> dt.datetime:
        return dt.datetime.now(dt.UTC)

    def monotonic_ns(self) -> int:
        return time.monotonic_ns()


@dataclass(slots=True)  # not frozen: built per request, frozen init is 4x slower
class LevelView:
    """A level's counters after an operation (nano-USD; limit None = unlimited)."""

    level: str
    scope: str
    limit: int | None
    spent: int
    reserved: int

    @property
    def remaining(self) -> int | None:
        """Headroom left, never negative; None when unlimited."""
        return None if self.limit is None else max(self.limit - self.spent - self.reserved, 0)


@dataclass(slots=True)  # not frozen: built per request, frozen init is 4x slower
class AuthorizeResult:
    """The stored answer to an Authorize."""

    allowed: bool
    reason: str
    message: str
    reserved: int  # nano-USD
    worst_case: int  # nano-USD
    levels: tuple[LevelView, ...]
    max_output_tokens: int | None
    period: str
    resets_at: dt.datetime | None
    expires_at: dt.datetime | None
    policy_version: str
    shadow: bool
    verdict: str
    replayed: bool = False  # True when this is the stored answer to a retry


@dataclass(slots=True)  # not frozen: built per request, frozen init is 4x slower
class RecordResult:
    """The stored answer to a Record."""

    cost: int  # nano-USD charged
    priced: bool
    levels: tuple[LevelView, ...]
    period: str
    late: bool
    policy_version: str
    duplicate: bool = False
    #: The priced cost (lines per meter) of a first settlement; None on replays.
    detail: Cost | None = None
    user_type: str = ""


def _fingerprint(kind: str, req: Request, at_given: bool) -> bytes:
    """A digest of everything a retry must repeat (``at`` only if the caller set it)."""
    usage = req.usage
    parts = (kind, req.org, req.user, req.product, req.model, usage.input_tokens,
             usage.output_tokens, usage.cache_write_5m_tokens, usage.cache_write_1h_tokens,
             usage.cache_read_tokens, usage.web_search_requests, usage.web_fetch_requests,
             usage.code_execution_seconds, req.service_tier, req.speed, req.geo,
             req.allow_clamp, req.at.timestamp() if at_given else None)
    return hashlib.blake2b(repr(parts).encode(), digest_size=12).digest()


def _views(levels: tuple[Level, ...], reserve: int) -> tuple[LevelView, ...]:
    return tuple(LevelView(lv.scope.level, lv.scope.name, lv.scope.limit, lv.spent,
                           lv.reserved + reserve) for lv in levels)


def _views_json(views: tuple[LevelView, ...]) -> list[list[Any]]:
    return [[v.level, v.scope, v.limit, v.spent, v.reserved] for v in views]


def _views_from(raw: list[list[Any]]) -> tuple[LevelView, ...]:
    return tuple(LevelView(r[0], r[1], r[2], r[3], r[4]) for r in raw)


def _micros(when: dt.datetime | None) -> int | None:
    if when is None:
        return None
    delta = when - _EPOCH
    return (delta.days * 86_400 + delta.seconds) * 1_000_000 + delta.microseconds


def _from_micros(value: int | None) -> dt.datetime | None:
    return None if value is None else _EPOCH + dt.timedelta(microseconds=value)


_EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)


def _iso(when: dt.datetime | None) -> str | None:
    return when.isoformat() if when is not None else None


def _from_iso(text: str | None) -> dt.datetime | None:
    return dt.datetime.fromisoformat(text) if text else None


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
        self._lock = threading.Lock()
        with self.env.begin(write=True) as txn:
            stored_boot = txn.get(b"boot", db=self.dbs["meta"])
            if stored_boot is not None and stored_boot.decode() != self.boot:
                # Deadlines from another boot mean nothing now: those calls are gone.
                self._expire_all(txn)
            txn.put(b"boot", self.boot.encode(), db=self.dbs["meta"])
        self.env.reader_check()

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

    def _add(self, txn: lmdb.Transaction, key: Key, spent: int = 0, reserved: int = 0,
             requests: int = 0) -> None:
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

    def _next_seq(self, txn: lmdb.Transaction, name: bytes) -> bytes:
        meta = self.dbs["meta"]
        raw = txn.get(name, db=meta)
        seq = (_SEQ.unpack(raw)[0] if raw else 0) + 1
        txn.put(name, _SEQ.pack(seq), db=meta)
        return _SEQ.pack(seq)

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
                    return self._auth_from(previous["auth"], replayed=True)
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
                txn.put(_DEADLINE.pack(deadline) + rkey, b"", db=self._expiry)
                expires = self.clock.now() + dt.timedelta(microseconds=self.ttl_ns // 1000)
            else:
                entry["state"] = "allowed" if decision.allowed else "denied"
            result = self._auth_result(decision, policy.version, expires)
            entry["auth"] = self._auth_json(result)
            txn.put(rkey, pack_entry(entry), db=self._requests)
            return result

        result: AuthorizeResult = self.run_write(work)
        return result

    @staticmethod
    def _auth_result(d: Decision, version: str, expires: dt.datetime | None) -> AuthorizeResult:
        views = _views(d.levels, d.reserve if d.allowed else 0)
        return AuthorizeResult(d.allowed, d.reason, d.message, d.reserve if d.allowed else 0,
                               d.cost.nanos if d.cost is not None else 0, views,
                               d.max_output_tokens, d.period, d.resets_at, expires, version,
                               d.shadow, d.verdict)

    @staticmethod
    def _auth_json(r: AuthorizeResult) -> list[Any]:
        """The stored answer as a flat list (times as epoch microseconds: cheap to encode)."""
        return [r.allowed, r.reason, r.message, r.reserved, r.worst_case,
                _views_json(r.levels), r.max_output_tokens, r.period, _micros(r.resets_at),
                _micros(r.expires_at), r.policy_version, r.shadow, r.verdict]

    @staticmethod
    def _auth_from(j: list[Any], replayed: bool = False) -> AuthorizeResult:
        return AuthorizeResult(j[0], j[1], j[2], j[3], j[4], _views_from(j[5]), j[6], j[7],
                               _from_micros(j[8]), _from_micros(j[9]), j[10], j[11], j[12],
                               replayed)

    # ---------------------------------------------------------------- release / expiry
    def _drop_reservation(self, txn: lmdb.Transaction, rkey: bytes, entry: dict[str, Any],
                          state: str) -> None:
        for key in entry["keys"]:
            self._add(txn, tuple(key), reserved=-entry["amount"])
        txn.delete(_DEADLINE.pack(entry["deadline"]) + rkey, db=self._expiry)
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
                if _DEADLINE.unpack_from(key)[0] > now_ns or len(due) >= limit:
                    break
                due.append(bytes(key))
            for key in due:
                rkey = key[_DEADLINE.size:]
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
        self.expired_total += count
        return count

    def _expire_all(self, txn: lmdb.Transaction) -> None:
        cursor = txn.cursor(db=self._expiry)
        keys = [bytes(k) for k in cursor.iternext(keys=True, values=False)]
        for key in keys:
            rkey = key[_DEADLINE.size:]
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
                return dataclasses.replace(self._rec_from(entry["rec"]), duplicate=True)
            if entry.get("state") == "reserved":
                expired = self._expired(entry, now_ns)
                self._drop_reservation(txn, rkey, entry, "expired" if expired else "settling")
            result = self._settle(txn, policy, req, now)
            entry.update(state="settled", rfp=fp, rec=self._rec_json(result))
            txn.put(rkey, pack_entry(entry), db=self._requests)
            return result

        result: RecordResult = self.run_write(work)
        # Duplicates too: the first commit may not be fsync'd yet (its writer is still
        # waiting, or its fsync failed in another process), and this answer acknowledges it.
        self._durable()
        return result

    def _settle(self, txn: lmdb.Transaction, policy: Policy, req: Request,
                now: dt.datetime) -> RecordResult:
        org = policy.orgs.get(req.org)
        if org is None:
            period = req.at.astimezone(dt.UTC).strftime("%Y-%m")
            self._unpriced(txn, period, req, "unknown org")
            return RecordResult(0, False, (), period, False, policy.version)
        at, late = self._attribution(org, req.at, now)
        period = period_key(at, org.tz)
        member = org.member(req.user) or MemberDef(req.user, "", (), None, None, False)
        free = self._free_remaining(txn, org, period)
        cost = price(org.rates, req.model, req.usage, req.at, service_tier=req.service_tier,
                     speed=req.speed, geo=req.geo, free_remaining=free)
        if not cost.priced:
            self._unpriced(txn, period, req, f'unknown model "{req.model}"')
        scopes = scopes_for(org, member, at)
        for scope in scopes:
            self._add(txn, scope.key, spent=cost.nanos, requests=1)
        self._aggregate(txn, period, org, member, cost, late)
        views = tuple(self._view(txn, sc) for sc in scopes)
        self._crossings(txn, org, scopes, views, cost.nanos, period, now)
        self._journal(txn, period, org, member, req, cost, late)
        return RecordResult(cost.nanos, cost.priced, views, period, late, policy.version,
                            detail=cost, user_type=member.user_type)

    def _attribution(self, org: OrgPolicy, at: dt.datetime,
                     now: dt.datetime) -> tuple[dt.datetime, bool]:
        """When usage counts: its own period, or now if it came after the grace window."""
        current = period_key(now, org.tz)
        own = period_key(at, org.tz)
        if own >= current:
            return at, False
        closes = month_bounds(own, org.tz)[1] + dt.timedelta(days=org.grace_days)
        return (at, True) if now < closes else (now, True)

    def _view(self, txn: lmdb.Transaction, scope: Scope) -> LevelView:
        spent, reserved, _ = self.counter(txn, scope.key)
        return LevelView(scope.level, scope.name, scope.limit, spent, reserved)

    def _free_remaining(self, txn: lmdb.Transaction, org: OrgPolicy, period: str) -> dict[str, int]:
        free: dict[str, int] = {}
        for name, rate in org.rates.tools.items():
            if rate.free_per_month:
                raw = txn.get(encode_key((period, org.name, name)), db=self.dbs["allowances"])
                used = _SEQ.unpack(raw)[0] if raw else 0
                free[name] = max(rate.free_per_month - used, 0)
        return free

    def _aggregate(self, txn: lmdb.Transaction, period: str, org: OrgPolicy, member: MemberDef,
                   cost: Cost, late: bool) -> None:
        usage_db = self.dbs["usage"]
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
                raw = txn.get(akey, db=self.dbs["allowances"])
                used = _SEQ.unpack(raw)[0] if raw else 0
                txn.put(akey, _SEQ.pack(used + line.free), db=self.dbs["allowances"])

    def _journal(self, txn: lmdb.Transaction, period: str, org: OrgPolicy, member: MemberDef,
                 req: Request, cost: Cost, late: bool) -> None:
        seq = self._next_seq(txn, b"journal_seq")
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
                db=self.dbs["journal"])

    def _unpriced(self, txn: lmdb.Transaction, period: str, req: Request, why: str) -> None:
        seq = self._next_seq(txn, b"unpriced_seq")
        entry = {"id": req.request_id, "org": req.org, "user": req.user, "model": req.model,
                 "why": why, "at": req.at.isoformat(),
                 "usage": dataclasses.asdict(req.usage)}
        txn.put(encode_key((period, req.org)) + b"\x1f" + seq, dumps(entry),
                db=self.dbs["unpriced"])

    def _crossings(self, txn: lmdb.Transaction, org: OrgPolicy, scopes: tuple[Scope, ...],
                   views: tuple[LevelView, ...], added: int, period: str,
                   now: dt.datetime) -> None:
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
                    if txn.get(ckey, db=self.dbs["crossings"]) is not None:
                        continue
                    seq = self._next_seq(txn, b"outbox_seq")
                    txn.put(ckey, seq, db=self.dbs["crossings"])
                    note = {"seq": _SEQ.unpack(seq)[0],
                            "key": hashlib.sha256(repr((scope.key, str(pct))).encode())
                            .hexdigest()[:32],
                            "org": org.name, "level": scope.level, "scope": scope.name,
                            "period": period, "threshold_percent": str(pct),
                            "spent_nanos": view.spent, "limit_nanos": scope.limit,
                            "at": now.isoformat(), "webhook": org.webhook,
                            "attempts": 0, "delivered": False}
                    txn.put(seq, dumps(note), db=self.dbs["outbox"])

    @staticmethod
    def _rec_json(r: RecordResult) -> dict[str, Any]:
        return {"c": r.cost, "pr": r.priced, "l": _views_json(r.levels), "p": r.period,
                "late": r.late, "v": r.policy_version}

    @staticmethod
    def _rec_from(j: dict[str, Any]) -> RecordResult:
        return RecordResult(j["c"], j["pr"], _views_from(j["l"]), j["p"], j["late"], j["v"])

    # ---------------------------------------------------------------- reading
    def read(self) -> lmdb.Transaction:
        """A read-only snapshot transaction (use as a context manager)."""
        return self.env.begin()

    def scan(self, db: str, prefix: tuple[str, ...]) -> Iterator[tuple[bytes, bytes]]:
        """Every (key, value) of ``db`` whose key starts with ``prefix``'s encoding."""
        with self.env.begin() as txn:
            yield from iter_prefix(txn, self.dbs[db], prefix)
