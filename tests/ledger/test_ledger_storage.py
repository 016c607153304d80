"""Storage edge cases: a full LMDB map and readers left behind by killed processes."""

from __future__ import annotations

import multiprocessing
from pathlib import Path

import pytest
from _ledger_support import (
    FakeClock,
    check_books,
    make_req,
    reader_worker,
    snapshot,
)

from policy.model import Policy
from sidecar.ledger import Ledger, LedgerFull

SMALL_MAP = 128 << 10  # LMDB needs a few dozen pages just for the ledger's databases


def fill_until_full(ledger: Ledger, policy: Policy) -> tuple[str, object]:
    """Authorize and record new requests until one raises LedgerFull; return it."""
    for i in range(100_000):
        req = make_req(f"r{i}", f"user{i % 7}", org="open", inp=i, out=i % 11)
        call = ledger.record if i % 2 else ledger.authorize
        before = snapshot(ledger)
        try:
            call(policy, req)
        except LedgerFull:
            assert snapshot(ledger) == before, "the failing call changed something"
            return call.__name__, req
    raise AssertionError("the map never filled")


def test_full_map_changes_nothing_and_a_larger_map_recovers(tmp_path: Path, policy: Policy,
                                                            clock: FakeClock) -> None:
    """LedgerFull aborts the whole call; reopened with a larger map the data is intact."""
    data = tmp_path / "data"
    ledger = Ledger(data, map_size=SMALL_MAP, clock=clock)
    try:
        kind, req = fill_until_full(ledger, policy)
        with pytest.raises(LedgerFull, match="map is full; nothing was changed"):
            getattr(ledger, kind)(policy, req)  # still full on retry, still no change
        kept = snapshot(ledger)
        assert kept["journal"]
        check_books(ledger)
    finally:
        ledger.close()
    ledger = Ledger(data, map_size=4 << 20, clock=clock)
    try:
        assert snapshot(ledger) == kept
        getattr(ledger, kind)(policy, req)  # the refused call now succeeds
        for i in range(200):
            ledger.record(policy, make_req(f"more{i}", "zed", org="open"))
        check_books(ledger)
    finally:
        ledger.close()


def test_reader_check_clears_a_killed_processs_read_transaction(tmp_path: Path, policy: Policy,
                                                                clock: FakeClock) -> None:
    """A reader slot of a SIGKILLed process is cleared by reader_check(); writes continue."""
    data = tmp_path / "data"
    ledger = Ledger(data, clock=clock)
    try:
        ledger.record(policy, make_req("before", "alice"))
        ctx = multiprocessing.get_context("spawn")
        results = ctx.Queue()
        child = ctx.Process(target=reader_worker, args=(str(data), results))
        child.start()
        state, pid = results.get(timeout=120)
        assert state == "reading"
        assert f" {pid} " in ledger.env.readers()
        child.kill()
        child.join(timeout=60)
        assert child.exitcode == -9
        assert f" {pid} " in ledger.env.readers()  # nothing clears the slot by itself
        assert ledger.env.reader_check() == 1
        assert f" {pid} " not in ledger.env.readers()
        assert ledger.env.reader_check() == 0
        for i in range(100):
            ledger.record(policy, make_req(f"after{i}", "zed", org="open"))
        check_books(ledger)
    finally:
        ledger.close()
