"""Durability: acknowledged Records survive kill -9; a failed fsync acknowledges nothing."""

from __future__ import annotations

import multiprocessing
import os
import random
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
from _ledger_support import (
    FakeClock,
    check_books,
    load_policy,
    make_req,
    requests,
    unsynced_record_worker,
)

from sidecar.ledger import Ledger, LedgerUnavailable

HERE = Path(__file__).resolve().parent
CHILD = HERE / "_crash_child.py"
CYCLES = int(os.environ.get("SPENDKEEPER_CRASH_CYCLES", "15"))


def crash_cycles(data_dir: Path, cycles: int, seed: int) -> None:
    """Start the child, SIGKILL it at a random moment, check the books; ``cycles`` times."""
    rng = random.Random(seed)
    acked: set[str] = set()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(HERE), *sys.path])}
    for cycle in range(cycles):
        child = subprocess.Popen([sys.executable, str(CHILD), str(data_dir), f"c{cycle}"],
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                 env=env)
        assert child.stdout is not None
        first = child.stdout.readline()  # the child is recording: now pick a moment
        time.sleep(rng.uniform(0, 0.25))
        child.send_signal(signal.SIGKILL)
        rest, err = child.communicate(timeout=60)
        assert child.returncode == -signal.SIGKILL, f"seed {seed}, cycle {cycle}: {err}"
        lines = (first + rest).split("\n")
        new = set(lines[:-1])  # the last piece was not a finished line
        assert new, f"seed {seed}, cycle {cycle}: the child acknowledged nothing: {err}"
        acked |= new
        ledger = Ledger(data_dir, map_size=256 << 20)
        try:
            journaled = check_books(ledger)  # counters == journal sums, reserved == live
            stored = requests(ledger)
        finally:
            ledger.close()
        assert all(n == 1 for n in journaled.values()), f"seed {seed}: settled twice"
        missing = sorted(rid for rid in acked
                         if journaled[rid] != 1 or stored[rid]["state"] != "settled")
        assert missing == [], f"seed {seed}, cycle {cycle}: acknowledged but lost"


@pytest.mark.slow
@pytest.mark.timeout(max(300, CYCLES * 10))
def test_acknowledged_records_survive_sigkill(tmp_path: Path) -> None:
    """Killed at random moments (SPENDKEEPER_CRASH_CYCLES times), no acknowledged Record is lost."""
    crash_cycles(tmp_path / "data", CYCLES, seed=random.randrange(2**32))


@pytest.mark.soak
@pytest.mark.timeout(1800)
def test_acknowledged_records_survive_sigkill_soak(tmp_path: Path) -> None:
    """The same, 40 kill cycles (the server-level kill -9 soak adds 25 more)."""
    crash_cycles(tmp_path / "data", 40, seed=random.randrange(2**32))


def test_record_is_not_acknowledged_when_fsync_fails(tmp_path: Path) -> None:
    """With fsync failing, record() raises LedgerUnavailable and every later write is refused."""
    data = tmp_path / "data"
    data.mkdir(mode=0o700)
    (data / "FAULTS_ENABLED").touch()
    policy = load_policy()
    clock = FakeClock()
    ledger = Ledger(data, clock=clock)
    try:
        assert ledger.record(policy, make_req("ok", "alice")).cost > 0
        (data / "FAIL_FSYNC").touch()
        with pytest.raises(LedgerUnavailable, match="fsync failed"):
            ledger.record(policy, make_req("r1", "alice"))
        with pytest.raises(LedgerUnavailable, match="storage failed earlier"):
            ledger.authorize(policy, make_req("a1", "alice"))
        with pytest.raises(LedgerUnavailable, match="storage failed earlier"):
            ledger.record(policy, make_req("r1", "alice"))
        with pytest.raises(LedgerUnavailable):
            ledger.release("a1")
    finally:
        ledger.close()
    (data / "FAIL_FSYNC").unlink()
    ledger = Ledger(data, clock=clock)  # a restart once the disk is healthy
    try:
        retried = ledger.record(policy, make_req("r1", "alice"))
        assert retried.cost > 0  # the gateway's retry gets an answer, charged once
        assert check_books(ledger) == Counter({"ok": 1, "r1": 1})
        assert ledger.authorize(policy, make_req("a1", "alice")).allowed
    finally:
        ledger.close()


def test_duplicate_record_is_acknowledged_only_once_durable(tmp_path: Path) -> None:
    """A retried Record whose first commit was never fsync'd answers only after an fsync.

    Another process committed the Record but its fsync failed (so it answered
    nothing); the retry reaching this process must not be acknowledged as a
    duplicate before an fsync covers that commit.
    """
    data = tmp_path / "data"
    policy = load_policy()
    ledger = Ledger(data, clock=FakeClock())  # opened before faults: its fsyncs work
    try:
        (data / "FAULTS_ENABLED").touch()
        (data / "FAIL_FSYNC").touch()
        ctx = multiprocessing.get_context("spawn")
        results = ctx.Queue()
        proc = ctx.Process(target=unsynced_record_worker, args=(str(data), "r1", results))
        proc.start()
        outcome = results.get(timeout=120)
        proc.join(timeout=60)
        assert outcome[0] == "unavailable", outcome
        assert ledger.group is not None
        syncs = ledger.group.syncs
        again = ledger.record(policy, make_req("r1", "alice"))
        assert again.duplicate
        assert ledger.group.syncs > syncs
    finally:
        ledger.close()
