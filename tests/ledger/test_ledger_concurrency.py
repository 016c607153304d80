"""Check-and-reserve is atomic across threads and across processes sharing one environment."""

from __future__ import annotations

import multiprocessing
import threading
from pathlib import Path
from typing import Any

from _ledger_support import (
    authorize_worker,
    cost_of,
    counters,
    make_req,
    record_worker,
)

from policy.model import Policy
from sidecar.ledger import Ledger

PROCESSES = 4


def _results(queue: Any, procs: list[Any]) -> list[Any]:
    """One result per process; a worker's error fails the test at once."""
    got = [queue.get(timeout=120) for _ in procs]
    assert [r for r in got if r[0] == "error"] == []
    for proc in procs:
        proc.join(timeout=60)
        assert proc.exitcode == 0
    return got


def test_threads_never_overspend_a_user_budget(ledger: Ledger, policy: Policy) -> None:
    """200 threads authorizing at once against alice's $0.30 admit exactly floor(budget/worst)."""
    worst = cost_of(1000, 3000)  # $0.007
    budget = 300_000_000
    barrier = threading.Barrier(200)
    allowed: list[bool] = []
    errors: list[BaseException] = []

    def one(i: int) -> None:
        try:
            barrier.wait(timeout=60)
            result = ledger.authorize(policy, make_req(f"t{i}", "alice", inp=1000, out=3000))
            allowed.append(result.allowed)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(200)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert len(allowed) == 200
    assert sum(allowed) == budget // worst == 42
    user = counters(ledger)[("2026-03", "user", "acme", "alice")]
    assert user == (0, 42 * worst, 0)


def test_processes_never_overspend_an_org_budget(tmp_path: Path) -> None:
    """4 processes on one environment, 60 attempts each, admit exactly floor($1 / worst)."""
    ctx = multiprocessing.get_context("spawn")
    barrier = ctx.Barrier(PROCESSES)
    results = ctx.Queue()
    path = str(tmp_path / "shared")
    procs = [ctx.Process(target=authorize_worker, args=(path, f"p{i}", 60, barrier, results))
             for i in range(PROCESSES)]
    for proc in procs:
        proc.start()
    got = dict(_results(results, procs))
    worst = cost_of(1000, 3000)
    admitted = 1_000_000_000 // worst
    assert admitted == 142 < 60 * PROCESSES
    assert sum(got.values()) == admitted
    ledger = Ledger(path)
    try:
        assert counters(ledger)[("2026-03", "org", "pool")] == (0, admitted * worst, 0)
        assert ledger.outstanding() == admitted
    finally:
        ledger.close()


def test_processes_sharing_an_environment_see_each_others_records(tmp_path: Path) -> None:
    """Records made by 4 processes are all visible to each of them and to a later reader."""
    ctx = multiprocessing.get_context("spawn")
    barrier = ctx.Barrier(PROCESSES)
    results = ctx.Queue()
    path = str(tmp_path / "shared")
    per_process = 25
    procs = [ctx.Process(target=record_worker, args=(path, f"p{i}", per_process, barrier,
                                                      results))
             for i in range(PROCESSES)]
    for proc in procs:
        proc.start()
    got = _results(results, procs)
    expected_ids = sorted(f"p{p}-{i}" for p in range(PROCESSES) for i in range(per_process))
    expected_spent = PROCESSES * sum(cost_of(1000, 1000 + i) for i in range(per_process))
    for _, seen, spent in got:
        assert seen == expected_ids
        assert spent == expected_spent
