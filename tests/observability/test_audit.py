"""Ledger conservation: Σ users == Σ user types == org == Σ journal, and drift is caught."""

from __future__ import annotations

import dataclasses
import datetime as dt
import struct
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path

import pytest
from _obs_support import HERE, StartSidecar, request, scrape, value

from policy.compile import load
from policy.model import Policy
from policy.periods import period_key
from sidecar.ledger import Ledger
from sidecar.ledger.adjust import add_adjustment
from sidecar.ledger.audit import Auditor, balance, conservation
from sidecar.ledger.store import COUNTER, dumps, encode_key


@pytest.fixture(scope="module")
def policy() -> Policy:
    """The observability tests' policy (acme with user, type, org and a daily limit)."""
    return load(HERE / "policy.spend")


@pytest.fixture
def ledger(tmp_path: Path) -> Iterator[Ledger]:
    """A durable ledger on the real clocks."""
    led = Ledger(tmp_path / "data", map_size=64 << 20)
    yield led
    led.close()


def _period(ledger: Ledger) -> str:
    return period_key(ledger.clock.now(), dt.UTC)


def traffic(ledger: Ledger, policy: Policy) -> int:
    """Records at every kind of member, a reservation, an unpriced record; the nanos charged."""
    total = 0
    for rid, org, user, inp in (("a", "acme", "alice", 50_000), ("b", "acme", "bob", 30_000),
                                ("d", "acme", "dana", 40_000), ("d2", "acme", "dana", 1),
                                ("n", "acme", "newcomer", 7), ("z", "beta", "zed", 1000)):
        total += ledger.record(policy, request(rid, org=org, user=user, inp=inp)).cost
    held = request("held", org="acme", user="bob", inp=10)
    assert ledger.authorize(policy, held).allowed
    unknown = dataclasses.replace(request("u", org="acme", user="bob", inp=10),
                                  model="no-such-model")
    assert not ledger.record(policy, unknown).priced
    return total


def test_books_balance_after_traffic(ledger: Ledger, policy: Policy) -> None:
    """Every level and the journal agree; dana's day counter is not double counted."""
    total = traffic(ledger, policy)
    assert conservation(ledger, policy) == []
    assert conservation(ledger, policy, _period(ledger)) == []
    acme = balance(ledger, "acme", _period(ledger))
    beta = balance(ledger, "beta", _period(ledger))
    assert acme.drift == 0
    assert acme.org_spent + beta.org_spent == total
    assert acme.org_spent == acme.users_spent == acme.types_spent == acme.journal_spent
    assert acme.org_reserved == acme.users_reserved == acme.types_reserved > 0


def test_corrections_that_move_counters_keep_the_books_balanced(
        ledger: Ledger, policy: Policy) -> None:
    """A credit is its own entry (not a journal edit): it counts on the journal side."""
    traffic(ledger, policy)
    period = _period(ledger)
    add_adjustment(ledger, policy.orgs["acme"], user="bob", period=period,
                   amount=Decimal("-0.01"), reason="outage credit")
    add_adjustment(ledger, policy.orgs["acme"], user="alice", period=period,
                   amount=Decimal("0.02"), reason="invoice only", counters=False)
    assert conservation(ledger, policy) == []
    acme = balance(ledger, "acme", period)
    assert acme.adjusted == -10_000_000
    assert acme.org_spent == acme.journal_spent - 10_000_000
    assert Auditor(ledger).balance("acme", period) == acme


def _bump_counter(ledger: Ledger, key: tuple[str, ...], spent: int) -> None:
    ekey = encode_key(key)
    with ledger.env.begin(write=True) as txn:
        old = COUNTER.unpack(bytes(txn.get(ekey, db=ledger.dbs["counters"])))
        txn.put(ekey, COUNTER.pack(old[0] + spent, old[1], old[2]), db=ledger.dbs["counters"])


def test_a_corrupted_counter_or_journal_shows_as_drift(ledger: Ledger, policy: Policy) -> None:
    """7 nano-USD added to one user counter, or a stray journal entry, is reported."""
    traffic(ledger, policy)
    period = _period(ledger)
    _bump_counter(ledger, (period, "user", "acme", "bob"), 7)
    drifts = conservation(ledger, policy)
    assert [(d.org, d.drift) for d in drifts] == [("acme", 7)]
    assert drifts[0].users_spent == drifts[0].org_spent + 7
    _bump_counter(ledger, (period, "user", "acme", "bob"), -7)
    assert conservation(ledger, policy) == []
    with ledger.env.begin(write=True) as txn:  # a settled record no counter knows about
        txn.put(encode_key((period, "beta")) + b"\x1f" + struct.pack(">Q", 10**9),
                dumps({"nanos": 5}), db=ledger.dbs["journal"])
    assert [(d.org, d.drift) for d in conservation(ledger, policy)] == [("beta", 5)]


def test_the_auditor_keeps_a_running_journal_sum_equal_to_a_full_scan(
        ledger: Ledger, policy: Policy) -> None:
    """Scrape after scrape, reading only new journal entries gives the full scan's answer."""
    auditor = Auditor(ledger)
    period = _period(ledger)
    assert auditor.balance("acme", period) == balance(ledger, "acme", period)
    for i in range(3):
        ledger.record(policy, request(f"x{i}", org="acme", user=f"u{i}", inp=1000 * (i + 1)))
        assert auditor.balance("acme", period) == balance(ledger, "acme", period)
    assert auditor.balance("acme", period).journal_spent == 6_000_000


def test_the_drift_gauge_is_zero_after_traffic_and_flags_a_corrupted_counter(
        start_sidecar: StartSidecar) -> None:
    """spendkeeper_ledger_conservation_drift_nano_usd{org} on a real sidecar's /metrics."""
    run = start_sidecar()
    with run.client() as c:
        for i, user in enumerate(("alice", "bob", "dana", "newcomer")):
            c.record(f"r{i}", "acme", user, "chat", "m1", input_tokens=10_000, output_tokens=5)
        c.record("z", "beta", "zed", "chat", "m1", input_tokens=10)
    gauge = "spendkeeper_ledger_conservation_drift_nano_usd"
    s = scrape(run.metrics_port)
    assert (value(s, gauge, org="acme"), value(s, gauge, org="beta")) == (0, 0)
    ledger = run.sidecar.ledger
    _bump_counter(ledger, (_period(ledger), "type", "acme", "chat"), -3)
    s = scrape(run.metrics_port)
    assert (value(s, gauge, org="acme"), value(s, gauge, org="beta")) == (3, 0)
