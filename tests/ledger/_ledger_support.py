"""Helpers shared by the ledger tests and the processes they spawn.

A module rather than conftest fixtures because child processes (multiprocessing
'spawn' and plain subprocesses) import it by name: pytest puts this directory
on ``sys.path`` and 'spawn' passes that path on to its children.
"""

from __future__ import annotations

import datetime as dt
import os
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

from policy.compile import load
from policy.decide import Request
from policy.model import Policy
from policy.pricing import Usage
from sidecar.ledger import Clock, Ledger, LedgerUnavailable
from sidecar.ledger.store import COUNTER, DATABASES, decode_key, loads, open_env, unpack_entry

HERE = Path(__file__).resolve().parent
POLICY_FILE = HERE / "policy.spend"
#: A weekday in March, away from any month or DST boundary.
T0 = dt.datetime(2026, 3, 10, 15, 0, tzinfo=dt.UTC)
#: Nano-USD per token of model "m1" in policy.spend.
INPUT_NANOS = 1_000
OUTPUT_NANOS = 2_000
USD = 10**9


class FakeClock(Clock):
    """A clock the test sets: wall time and monotonic time move independently."""

    def __init__(self, wall: dt.datetime = T0, mono_ns: int = 10**12) -> None:
        self.wall = wall
        self.mono = mono_ns

    def now(self) -> dt.datetime:
        return self.wall

    def monotonic_ns(self) -> int:
        return self.mono

    def tick(self, seconds: float) -> None:
        """Let real time pass: both clocks move."""
        self.mono += int(seconds * 1e9)
        self.wall += dt.timedelta(seconds=seconds)

    def jump_wall(self, delta: dt.timedelta) -> None:
        """Step the wall clock only (NTP correction, operator error)."""
        self.wall += delta

    def advance_mono(self, seconds: float) -> None:
        """Move only the monotonic clock."""
        self.mono += int(seconds * 1e9)


def load_policy() -> Policy:
    """The tests' policy (tests/ledger/policy.spend)."""
    return load(POLICY_FILE)


def make_req(request_id: str, user: str = "alice", *, org: str = "acme", inp: int = 1000,
             out: int = 1000, at: dt.datetime = T0, product: str = "chat", model: str = "m1",
             allow_clamp: bool = False, **usage: int) -> Request:
    """A request on model m1 (cost ``inp * 1000 + out * 2000`` nano-USD)."""
    return Request(request_id, org, user, product, model,
                   Usage(input_tokens=inp, output_tokens=out, **usage), at,
                   allow_clamp=allow_clamp)


def cost_of(inp: int, out: int) -> int:
    """The price of ``inp`` input and ``out`` output tokens of m1, worked out by hand."""
    return inp * INPUT_NANOS + out * OUTPUT_NANOS


def snapshot(ledger: Ledger, *names: str) -> dict[str, dict[bytes, bytes]]:
    """Every key and value of the named databases (all of them by default)."""
    with ledger.read() as txn:
        return {name: {bytes(k): bytes(v) for k, v in txn.cursor(db=ledger.dbs[name])}
                for name in (names or tuple(DATABASES))}


def counters(ledger: Ledger) -> dict[tuple[str, ...], tuple[int, int, int]]:
    """The counters database decoded: key parts -> (spent, reserved, requests)."""
    out = {}
    for key, value in snapshot(ledger, "counters")["counters"].items():
        spent, reserved, count = COUNTER.unpack_from(value)
        out[decode_key(key, value[COUNTER.size:])] = (spent, reserved, count)
    return out


def journal(ledger: Ledger) -> list[tuple[str, dict[str, Any]]]:
    """Every settled record as (period, entry), in journal order."""
    rows = []
    for key, value in snapshot(ledger, "journal")["journal"].items():
        rows.append((decode_key(key[:-9])[0], loads(value)))
    return rows


def requests(ledger: Ledger) -> dict[str, dict[str, Any]]:
    """The requests database decoded: request id -> stored entry."""
    rows = snapshot(ledger, "requests")["requests"]
    return {k.decode(): unpack_entry(v) for k, v in rows.items()}


def check_books(ledger: Ledger) -> Counter[str]:
    """Assert counters agree with the journal and live reservations; return journal ids.

    For orgs without per-day limits: each journal entry counts at its user,
    user type and org for its period; reserved is the sum of live reservations.
    """
    spent: Counter[tuple[str, ...]] = Counter()
    count: Counter[tuple[str, ...]] = Counter()
    ids: Counter[str] = Counter()
    for period, entry in journal(ledger):
        ids[entry["id"]] += 1
        key: tuple[str, ...]
        for key in ((period, "user", entry["org"], entry["user"]),
                    (period, "type", entry["org"], entry["type"]),
                    (period, "org", entry["org"])):
            spent[key] += entry["nanos"]
            count[key] += 1
    reserved: Counter[tuple[str, ...]] = Counter()
    live = 0
    for entry in requests(ledger).values():
        if entry.get("state") == "reserved":
            live += 1
            for key in entry["keys"]:
                reserved[tuple(key)] += entry["amount"]
    real = counters(ledger)
    for key in set(real) | set(spent) | set(reserved):
        assert real.get(key, (0, 0, 0)) == (spent[key], reserved[key], count[key]), key
    assert ledger.outstanding() == live
    return ids


# ---------------------------------------------------------------- process workers
# Run in children started with multiprocessing's 'spawn': top-level functions
# taking only picklable arguments, each opening the shared environment itself
# (on a fake clock at T0, so requests at T0 are never "late"). A failure is
# reported through the queue so that the parent fails at once instead of
# waiting for a result that will never come.
def _report(work: Callable[..., tuple[Any, ...]], args: tuple[Any, ...], results: Any) -> None:
    try:
        results.put(work(*args))
    except BaseException as exc:
        results.put(("error", f"{type(exc).__name__}: {exc}"))
        raise


def authorize_worker(*args: Any) -> None:
    """Process target: :func:`_authorize_worker` (path, prefix, attempts, barrier), results."""
    _report(_authorize_worker, args[:-1], args[-1])


def record_worker(*args: Any) -> None:
    """Process target: :func:`_record_worker` (path, prefix, count, barrier), results."""
    _report(_record_worker, args[:-1], args[-1])


def _authorize_worker(path: str, prefix: str, attempts: int, barrier: Any) -> tuple[str, int]:
    """Authorize ``attempts`` requests against org "pool" once every process is ready."""
    policy = load_policy()
    ledger = Ledger(path, map_size=64 << 20, clock=FakeClock())
    try:
        barrier.wait(timeout=60)
        allowed = 0
        for i in range(attempts):
            req = make_req(f"{prefix}-{i}", f"user-{prefix}", org="pool", inp=1000, out=3000)
            allowed += ledger.authorize(policy, req).allowed
    finally:
        ledger.close()
    return prefix, allowed


def _record_worker(path: str, prefix: str, count: int,
                   barrier: Any) -> tuple[str, list[str], int]:
    """Record ``count`` requests durably, wait for the others, then list every journaled id."""
    policy = load_policy()
    ledger = Ledger(path, map_size=64 << 20, clock=FakeClock())
    try:
        for i in range(count):
            ledger.record(policy, make_req(f"{prefix}-{i}", f"user-{prefix}", org="open",
                                           out=1000 + i))
        barrier.wait(timeout=60)
        seen = sorted(entry["id"] for _, entry in journal(ledger))
        spent = counters(ledger)[("2026-03", "org", "open")][0]
    finally:
        ledger.close()
    return prefix, seen, spent


def _unsynced_record_worker(path: str, request_id: str) -> tuple[str, str]:
    """Record with fsync failing (FAULTS_ENABLED and FAIL_FSYNC exist): commit, no sync."""
    policy = load_policy()
    ledger = Ledger(path, map_size=64 << 20, clock=FakeClock())
    try:
        ledger.record(policy, make_req(request_id, "alice"))
    except LedgerUnavailable as exc:
        return "unavailable", str(exc)
    finally:
        ledger.close()
    return "acknowledged", ""


def unsynced_record_worker(*args: Any) -> None:
    """Process target: :func:`_unsynced_record_worker` (path, request_id), results."""
    _report(_unsynced_record_worker, args[:-1], args[-1])


def reader_worker(path: str, results: Any) -> None:
    """Open a read transaction, report our pid, and hold it until killed."""
    env = open_env(path, 64 << 20)
    txn = env.begin()
    txn.get(b"boot")
    results.put(("reading", os.getpid()))
    time.sleep(600)
