"""The decision log: a JSON-lines compliance trail of Authorize (and Record) decisions.

:class:`DecisionLog` is an :class:`~sidecar.observe.Observer`. By default it
logs every deny and every shadow-mode would-be deny; with ``decision_log_all``
it logs every Authorize and every Record. The RPC thread only puts a tuple on
a bounded queue (``put_nowait``); a writer thread formats the lines and
appends them. When the queue is full the entry is dropped and counted in
``spendkeeper_decision_log_dropped_total`` (and warned about in the log), so
the log never blocks a request and never loses a line silently.

The file is appended with ``O_APPEND`` under an ``flock`` on ``<log>.lock``,
so several worker processes may share one log. When the next line would take
it past ``max_bytes`` it is rotated: ``<log>.N-1`` becomes ``<log>.N`` ...
and ``<log>`` becomes ``<log>.1``; the oldest is deleted. Disk use is bounded
by ``(backups + 1) * max_bytes``.

With ``hash_user_ids`` the ``user`` field (and the user id wherever the
``message`` names it) is ``sha256:`` followed by the hex SHA-256 of the
install's salt followed by the user id (both UTF-8). The salt
is 32 random bytes, hex-encoded, kept in ``<data_dir>/decision-log.salt``
(0600, created on first use): the same user always gets the same hash on one
install, and nobody without the salt can confirm a guess.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import hashlib
import json
import logging
import os
import queue
import secrets
import threading
import time
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry, Counter

from policy.decide import Request
from policy.model import usd_text
from sidecar.config import Config
from sidecar.ledger import AuthorizeResult, RecordResult

__all__ = ["DEFAULT_BACKUPS", "DEFAULT_QUEUE_SIZE", "DecisionLog", "hash_user", "load_salt"]

DEFAULT_QUEUE_SIZE = 10_000
DEFAULT_BACKUPS = 5
_BATCH = 512  # lines per write
_WARN_EVERY = 60.0  # seconds between warnings about dropped lines
_SALT_FILE = "decision-log.salt"
_log = logging.getLogger("spendkeeper.decision_log")


def load_salt(data_dir: Path) -> str:
    """The install's salt for hashing user ids (created 0600 on first use)."""
    path = data_dir / _SALT_FILE
    with contextlib.suppress(FileNotFoundError):
        return path.read_text(encoding="ascii").strip()
    data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    salt = secrets.token_hex(32)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:  # another worker won the race: use its salt
        return path.read_text(encoding="ascii").strip()
    with os.fdopen(fd, "w", encoding="ascii") as handle:
        handle.write(salt + "\n")
    return salt


def hash_user(salt: str, user: str) -> str:
    """``sha256:<hex>`` of salt + user id, as the decision log writes it."""
    return "sha256:" + hashlib.sha256((salt + user).encode()).hexdigest()


def _iso(epoch_ns: int) -> str:
    when = dt.datetime.fromtimestamp(epoch_ns / 1e9, dt.UTC)
    return when.isoformat(timespec="microseconds").replace("+00:00", "Z")


class _RotatingFile:
    """An O_APPEND file rotated by size; safe to share between processes.

    Each batch is written under an exclusive ``flock`` on ``<path>.lock``, so
    the size check, the rotation and the append are one step for every
    process sharing the file: no file grows past ``max_bytes`` (unless one
    line alone is larger) and no line is split or lost in a rotation.
    """

    def __init__(self, path: Path, max_bytes: int, backups: int) -> None:
        self.path = path
        self.max_bytes = max_bytes
        self.backups = backups
        path.parent.mkdir(parents=True, exist_ok=True)
        self.lock = os.open(f"{path}.lock", os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o600)
        self.fd = self._open()

    def _open(self) -> int:
        return os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)

    def _reopen_if_moved(self) -> None:
        """Another process rotated the file: follow the name, not the old inode."""
        try:
            same = os.stat(self.path).st_ino == os.fstat(self.fd).st_ino
        except FileNotFoundError:
            same = False
        if not same:
            os.close(self.fd)
            self.fd = self._open()

    def write(self, lines: list[bytes]) -> None:
        """Append ``lines``, rotating first whenever the next line would not fit."""
        fcntl.flock(self.lock, fcntl.LOCK_EX)
        try:
            self._reopen_if_moved()
            size = os.fstat(self.fd).st_size
            chunk: list[bytes] = []
            for line in lines:
                if size + len(line) > self.max_bytes and size > 0:
                    self._append(b"".join(chunk))
                    chunk = []
                    self._rotate()
                    size = 0
                chunk.append(line)
                size += len(line)
            self._append(b"".join(chunk))
        finally:
            fcntl.flock(self.lock, fcntl.LOCK_UN)

    def _append(self, data: bytes) -> None:
        view = memoryview(data)
        while view:  # a regular file takes it all at once; loop on a short write anyway
            view = view[os.write(self.fd, view):]

    def _rotate(self) -> None:
        """``<log>.N-1`` -> ``<log>.N`` ... ``<log>`` -> ``<log>.1`` (held under the lock)."""
        if self.backups < 1:
            os.ftruncate(self.fd, 0)
            return
        for index in range(self.backups - 1, 0, -1):
            older = Path(f"{self.path}.{index}")
            if older.exists():
                older.replace(f"{self.path}.{index + 1}")
        self.path.replace(f"{self.path}.1")
        os.close(self.fd)
        self.fd = self._open()

    def close(self) -> None:
        for fd in (self.fd, self.lock):
            with contextlib.suppress(OSError):
                os.close(fd)


class DecisionLog:
    """Observer that appends decisions as JSON lines from a background writer thread."""

    def __init__(self, path: str | Path, *, log_all: bool = False,
                 max_bytes: int = 64 << 20, backups: int = DEFAULT_BACKUPS,
                 salt: str | None = None, registry: CollectorRegistry | None = None,
                 queue_size: int = DEFAULT_QUEUE_SIZE, start: bool = True) -> None:
        """Log to ``path``; ``salt`` enables user-id hashing; ``start=False`` defers the writer."""
        if max_bytes < 1 or backups < 0 or queue_size < 1:
            raise ValueError("max_bytes and queue_size must be positive, backups not negative")
        self.path = Path(path)
        self.log_all = log_all
        self.salt = salt
        self._file = _RotatingFile(self.path, max_bytes, backups)
        self._queue: queue.Queue[tuple[Any, ...]] = queue.Queue(maxsize=queue_size)
        self._stop = threading.Event()
        self._closed = False
        self._idle = threading.Condition()
        self._pending = 0  # entries taken off the queue but not yet written
        self._drop_lock = threading.Lock()
        self._last_warning = 0.0
        self._dropped_since_warning = 0
        self.dropped = Counter("spendkeeper_decision_log_dropped",
                               "Decision-log lines lost: queue full or write failed",
                               registry=registry)
        self.written = Counter("spendkeeper_decision_log_lines",
                               "Decision-log lines written", registry=registry)
        self.write_errors = Counter("spendkeeper_decision_log_write_errors",
                                    "Failed writes to the decision log", registry=registry)
        self._thread = threading.Thread(target=self._run, name="decision-log", daemon=True)
        self._started = False
        if start:
            self.start()

    @classmethod
    def from_config(cls, config: Config, registry: CollectorRegistry) -> DecisionLog:
        """The log ``config`` asks for (``config.decision_log`` must be set)."""
        if config.decision_log is None:
            raise ValueError("decision_log is not configured")
        salt = load_salt(config.data_dir) if config.hash_user_ids else None
        return cls(config.decision_log, log_all=config.decision_log_all,
                   max_bytes=config.decision_log_max_bytes, salt=salt, registry=registry)

    def start(self) -> None:
        """Start the writer thread (only needed after ``start=False``)."""
        if not self._started and not self._closed:
            self._started = True
            self._thread.start()

    # -------------------------------------------------------------- observer (RPC threads)
    def _offer(self, item: tuple[Any, ...]) -> None:
        if self._closed:
            self._drop(1)
            return
        try:
            self._queue.put_nowait(item)
        except queue.Full:
            self._drop(1)

    def _drop(self, count: int) -> None:
        self.dropped.inc(count)
        with self._drop_lock:
            self._dropped_since_warning += count
            now = time.monotonic()
            if now - self._last_warning < _WARN_EVERY:
                return
            self._last_warning, dropped = now, self._dropped_since_warning
            self._dropped_since_warning = 0
        _log.warning("decision log %s: dropped %d line(s) (queue full or write failed); see "
                     "spendkeeper_decision_log_dropped_total", self.path, dropped)

    def authorized(self, req: Request, result: AuthorizeResult, seconds: float) -> None:
        """Queue a deny, a shadow would-be deny, or (``log_all``) any decision."""
        if self.log_all or not result.allowed or result.verdict != "WITHIN_LIMITS":
            self._offer(("authorize", time.time_ns(), req, result))

    def recorded(self, req: Request, result: RecordResult, seconds: float) -> None:
        """Queue a settled record (only with ``log_all``)."""
        if self.log_all:
            self._offer(("record", time.time_ns(), req, result))

    def released(self, released: bool, seconds: float) -> None:
        """Releases are not logged."""

    def usage_read(self, seconds: float) -> None:
        """Usage reads are not logged."""

    def failed(self, rpc: str, code: str, seconds: float) -> None:
        """Error statuses are not decisions; the metrics count them."""

    # -------------------------------------------------------------- writer thread
    def _line(self, item: tuple[Any, ...]) -> bytes:
        kind, stamp, req, result = item
        user = hash_user(self.salt, req.user) if self.salt is not None else req.user
        message = getattr(result, "message", "")
        if self.salt is not None and req.user:
            message = message.replace(req.user, user)  # scope names carry the user id
        entry: dict[str, Any] = {
            "time": _iso(stamp), "event": kind, "request_id": req.request_id, "org": req.org,
            "user": user, "product": req.product, "model": req.model,
        }
        if kind == "authorize":
            assert isinstance(result, AuthorizeResult)
            entry.update(
                decision="ALLOW" if result.allowed else "DENY", reason=result.reason,
                verdict=result.verdict, shadow=result.shadow, cost=usd_text(result.worst_case),
                reserved=usd_text(result.reserved), message=message,
                max_output_tokens=result.max_output_tokens, replayed=result.replayed)
        else:
            assert isinstance(result, RecordResult)
            entry.update(decision="RECORD", cost=usd_text(result.cost), priced=result.priced,
                         duplicate=result.duplicate, late=result.late,
                         user_type=result.user_type)
        entry.update(period=result.period, at=req.at.isoformat(),
                     service_tier=req.service_tier, policy_version=result.policy_version)
        return json.dumps(entry, ensure_ascii=False, separators=(",", ":")).encode() + b"\n"

    def _run(self) -> None:
        while True:
            try:
                first = self._queue.get(timeout=0.1)
            except queue.Empty:
                if self._stop.is_set():
                    return
                continue
            batch = [first]
            while len(batch) < _BATCH:
                try:
                    batch.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            with self._idle:
                self._pending = len(batch)
            self._write(batch)
            with self._idle:
                self._pending = 0
                self._idle.notify_all()

    def _write(self, batch: list[tuple[Any, ...]]) -> None:
        try:
            self._file.write([self._line(item) for item in batch])
        except Exception:
            self.write_errors.inc()
            self._drop(len(batch))
            _log.exception("writing %d line(s) to decision log %s failed", len(batch),
                           self.path)
        else:
            self.written.inc(len(batch))

    # -------------------------------------------------------------- shutdown
    def flush(self, timeout: float = 5.0) -> bool:
        """Wait until every queued line is written; False on timeout."""
        deadline = time.monotonic() + timeout
        with self._idle:
            while not self._queue.empty() or self._pending:
                remaining = deadline - time.monotonic()
                if remaining <= 0 or not self._thread.is_alive():
                    return False
                self._idle.wait(min(remaining, 0.05))
        return True

    def close(self, timeout: float = 5.0) -> None:
        """Write what is queued, stop the writer and close the file (idempotent)."""
        if self._closed:
            return
        self._closed = True
        self._stop.set()
        if self._started:
            self._thread.join(timeout)
        else:  # never started: write what was queued here, then stop
            self._run()
        leftover = 0
        while True:
            try:
                self._queue.get_nowait()
            except queue.Empty:
                break
            leftover += 1
        if leftover:
            self._drop(leftover)
        self._file.close()
