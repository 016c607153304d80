"""The LMDB environment under the ledger: databases, key encoding, group commit.

One environment holds every database the ledger needs. Commits are not
fsync'd one by one (``sync=False``, no ``writemap``/``map_async``, so a process
crash loses nothing and an OS crash can lose only the newest commits); Records
then wait for a :class:`GroupSync` that fsyncs once for every commit before it.
"""

from __future__ import annotations

import hashlib
import json
import struct
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import lmdb
import msgpack

__all__ = [
    "COUNTER", "DATABASES", "SEQ", "GroupSync", "LedgerError", "LedgerFull", "LedgerUnavailable",
    "boot_id", "decode_key", "dumps", "encode_key", "iter_prefix", "loads", "open_env",
    "pack_entry",
    "unpack_entry",
]

#: spent, reserved, requests (nano-USD, nano-USD, count)
COUNTER = struct.Struct(">qqq")
#: Sequence numbers and monotonic deadlines: big-endian, so keys sort numerically.
SEQ = struct.Struct(">Q")
_MAX_KEY = 480  # LMDB's default key limit is 511 bytes; keep a margin
_SEP = "\x1f"

#: The named databases and what they hold.
DATABASES = {
    "counters": "(period|day, level, org, name) -> spent, reserved, requests",
    "requests": "request_id -> state, reservation and the stored answers",
    "expiry": "monotonic deadline + request_id -> b'' (reservations to reap)",
    "usage": "(period, org, user, model, meter, unit price, per, label) -> quantity, free, n",
    "allowances": "(period, org, tool) -> free units used",
    "journal": "(period, org, seq) -> one settled record (JSON)",
    "unpriced": "(period, org, seq) -> usage that could not be priced (JSON)",
    "outbox": "seq -> notification (JSON)",
    "crossings": "(scope key, threshold) -> outbox seq",
    "adjustments": "(period, org, seq) -> correction entry (JSON)",
    "meta": "name -> value",
}


class LedgerError(Exception):
    """Base of the ledger's errors."""


class LedgerFull(LedgerError):
    """The LMDB map is full: the transaction was aborted and nothing changed."""


class LedgerUnavailable(LedgerError):
    """Storage failed (I/O, fsync): the ledger refuses writes until reopened."""


class Conflict(LedgerError):
    """The request id was used before with a different payload."""


def boot_id() -> str:
    """This boot's id: monotonic clock readings are only comparable within one boot."""
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:  # pragma: no cover - non-Linux
        return "unknown-boot"


def open_env(path: str | Path, map_size: int, readonly: bool = False) -> lmdb.Environment:
    """Open (creating 0700/0600) the ledger's LMDB environment."""
    folder = Path(path)
    if not readonly:
        folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    return lmdb.open(str(folder), map_size=map_size, max_dbs=len(DATABASES) + 2, mode=0o600,
                     subdir=True, sync=False, metasync=False, writemap=False, map_async=False,
                     readahead=False, max_readers=512, lock=True, readonly=readonly)


_encoded: dict[tuple[str, ...], bytes] = {}


def encode_key(parts: tuple[str, ...]) -> bytes:
    """A tuple of strings as an ordered LMDB key (long keys end in a hash); memoised."""
    hit = _encoded.get(parts)
    if hit is not None:
        return hit
    key = _encode(parts)
    if len(_encoded) > 200_000:
        _encoded.clear()
    _encoded[parts] = key
    return key


def _encode(parts: tuple[str, ...]) -> bytes:
    raw = _SEP.join(parts).encode()
    if len(raw) <= _MAX_KEY:
        return raw
    digest = hashlib.sha256(raw).hexdigest()
    head = _SEP.join(parts[:3]).encode()[: _MAX_KEY - 80]
    return head + (_SEP + "#" + digest).encode()


def decode_key(key: bytes, overflow: bytes = b"") -> tuple[str, ...]:
    """The parts of a key; hashed keys carry their parts in ``overflow`` (JSON)."""
    if overflow:
        return tuple(json.loads(overflow))
    return tuple(key.decode().split(_SEP))


def iter_prefix(txn: lmdb.Transaction, db: Any, prefix: tuple[str, ...]) -> Iterator[
        tuple[bytes, bytes]]:
    """Every (key, value) of ``db`` whose key lies under ``prefix`` (all of it for ``()``)."""
    start = encode_key(prefix) + _SEP.encode() if prefix else b""
    cursor = txn.cursor(db=db)
    if not cursor.set_range(start):
        return
    for key, value in cursor:
        if not bytes(key).startswith(start):
            break
        yield bytes(key), bytes(value)


def is_hashed(key: bytes) -> bool:
    """Whether ``key`` was shortened (its parts must be stored with the value)."""
    return (_SEP + "#").encode() in key[-70:]


def pack_entry(value: dict[str, Any]) -> bytes:
    """A request entry (state, reservation, stored answers) as compact msgpack.

    msgpack, not JSON, because an Authorize writes one of these in its hot path
    and msgpack encodes it about three times faster; the format is stable and
    carries only maps, lists, strings, bytes, ints, bools and nil.
    """
    return bytes(msgpack.packb(value, use_bin_type=True))


def unpack_entry(raw: bytes | memoryview) -> dict[str, Any]:
    """The inverse of :func:`pack_entry`."""
    value: dict[str, Any] = msgpack.unpackb(bytes(raw), raw=False, strict_map_key=False)
    return value


def dumps(value: Any) -> bytes:
    """Compact JSON for stored answers and entries."""
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode()


def loads(raw: bytes | memoryview) -> Any:
    """The inverse of :func:`dumps`."""
    return json.loads(bytes(raw))


class GroupSync:
    """One fsync covers every commit made before it started (group commit).

    A writer commits, takes a :meth:`ticket`, and calls :meth:`wait`. The first
    waiter that finds no fsync running becomes the leader and fsyncs itself
    (the GIL is released inside ``env.sync``), so there is no hand-off to
    another thread; everyone whose ticket is covered is released when it ends,
    and the next uncovered waiter leads the next fsync. Tickets are issued
    after the commit, so a sync that starts after ticket ``t`` was issued
    covers commit ``t``.
    """

    def __init__(self, sync: Callable[[], None]) -> None:
        self._sync = sync
        self._cond = threading.Condition()
        self._issued = 0
        self._synced = 0
        self._syncing = False
        self._error: BaseException | None = None
        self.syncs = 0
        self.sync_seconds = 0.0

    def ticket(self) -> int:
        """Call right after a commit: the number this commit waits for."""
        with self._cond:
            self._issued += 1
            return self._issued

    def wait(self, ticket: int, timeout: float = 30.0) -> None:
        """Block until ``ticket`` is durable; raise :class:`LedgerUnavailable` if fsync failed."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while self._synced < ticket:
                if self._error is not None:
                    raise LedgerUnavailable(f"fsync failed: {self._error}")
                if not self._syncing:
                    self._lead()
                    continue
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise LedgerUnavailable("fsync did not complete in time")
                self._cond.wait(remaining)

    def _lead(self) -> None:
        """Run one fsync for every ticket issued so far (called holding the lock)."""
        self._syncing = True
        target = self._issued
        self._cond.release()
        started = time.perf_counter()
        error: BaseException | None = None
        try:
            self._sync()
        except BaseException as exc:  # any failure must stop acknowledgements
            error = exc
        finally:
            self._cond.acquire()
        self._syncing = False
        if error is not None:
            self._error = error
        else:
            self.syncs += 1
            self.sync_seconds += time.perf_counter() - started
            self._synced = max(self._synced, target)
        self._cond.notify_all()

    @property
    def failed(self) -> BaseException | None:
        """The fsync error that poisoned the ledger, if any."""
        return self._error

    def close(self) -> None:
        """Make every ticket issued so far durable (the last commits before shutdown)."""
        with self._cond:
            while self._syncing:
                self._cond.wait(1.0)
            if self._synced < self._issued and self._error is None:
                self._lead()


def fault_sync_check(path: Path) -> None:
    """Fault injection for tests: a ``FAIL_FSYNC`` file in the data dir fails syncs.

    Real fsync failures (EIO) cannot be provoked without root-only tricks; this
    file stands in for them so the test suite can prove that no acknowledgement
    goes out without a durable commit.
    """
    if (path / "FAIL_FSYNC").exists():
        raise OSError(5, "Input/output error (injected by FAIL_FSYNC)")
