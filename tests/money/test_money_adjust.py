"""Corrections: new entries (never edits) that move the month's counters unless invoice-only."""

from __future__ import annotations

import datetime as dt
from decimal import Decimal
from pathlib import Path

import pytest
from _money_support import PERIOD, FakeClock, request

from policy.model import Policy
from sidecar.ledger import Conflict, Ledger
from sidecar.ledger.adjust import (
    AdjustmentError,
    add_adjustment,
    list_adjustments,
    parse_amount,
)
from sidecar.ledger.store import loads
from sidecar.ledger.views import usage_report

USD = 10**9


def spent(ledger: Ledger, policy: Policy, user: str) -> tuple[int, int, int]:
    """(user, user type, org) spent in nano-USD this period."""
    report = usage_report(ledger, policy, policy.orgs["acme"], PERIOD)
    (line,) = [u for u in report.users if u.scope == user]
    (kind,) = [t for t in report.types if t.scope == line.user_type]
    return line.spent, kind.spent, report.org_line.spent


def test_a_credit_restores_headroom_at_every_month_level(ledger: Ledger, policy: Policy) -> None:
    """alice ($1 a month) is at her limit; a $0.50 credit lets her spend again."""
    ledger.record(policy, request("r1", "alice", "five", input_tokens=200_000))  # $1.00
    probe = request("probe", "alice", "m", input_tokens=1000, output_tokens=1000)
    assert ledger.authorize(policy, probe).reason == "USER_LIMIT"
    entry, created = add_adjustment(ledger, policy.orgs["acme"], user="alice", period=PERIOD,
                                    amount=Decimal("-0.50"), reason="credit for outage")
    assert created
    assert (entry.user_type, entry.nanos, entry.counters) == ("chat", -USD // 2, True)
    assert spent(ledger, policy, "alice") == (USD // 2, USD // 2, USD // 2)
    retry = request("probe2", "alice", "m", input_tokens=1000, output_tokens=1000)
    assert ledger.authorize(policy, retry).allowed


def test_a_charge_uses_headroom(ledger: Ledger, policy: Policy) -> None:
    """A positive correction counts like spend: it can put a user over their limit."""
    add_adjustment(ledger, policy.orgs["acme"], user="alice", period=PERIOD,
                   amount=Decimal("1.000000001"), reason="re-priced request r9")
    assert spent(ledger, policy, "alice")[0] == USD + 1
    assert ledger.authorize(policy, request("p", "alice", input_tokens=1)).reason == "USER_LIMIT"


def test_an_invoice_only_correction_leaves_the_counters_alone(
        ledger: Ledger, policy: Policy) -> None:
    """``counters=False``: the invoice changes, enforcement does not."""
    ledger.record(policy, request("r1", "bob", "m", input_tokens=1_000_000))
    add_adjustment(ledger, policy.orgs["acme"], user="bob", period=PERIOD,
                   amount=Decimal("-2"), reason="goodwill", counters=False)
    assert spent(ledger, policy, "bob") == (3 * USD, 3 * USD, 3 * USD)
    (entry,) = list_adjustments(ledger, "acme", PERIOD)
    assert (entry.counters, entry.to_json()["nanos"]) == (False, 0)


def test_corrections_are_appended_never_edits(ledger: Ledger, policy: Policy) -> None:
    """The journal and usage aggregates stay as the requests left them."""
    ledger.record(policy, request("r1", "bob", "m", input_tokens=1000))
    with ledger.read() as txn:
        before = {name: [(bytes(k), bytes(v)) for k, v in txn.cursor(db=ledger.dbs[name])]
                  for name in ("journal", "usage", "unpriced")}
    org = policy.orgs["acme"]
    for amount in ("-1", "2.5", "-0.000000001"):
        add_adjustment(ledger, org, user="bob", period=PERIOD, amount=Decimal(amount),
                       reason=f"fix {amount}")
    with ledger.read() as txn:
        after = {name: [(bytes(k), bytes(v)) for k, v in txn.cursor(db=ledger.dbs[name])]
                 for name in ("journal", "usage", "unpriced")}
        stored = [loads(v) for _, v in txn.cursor(db=ledger.dbs["adjustments"])]
    assert after == before
    assert [(e["seq"], e["amount"], e["reason"]) for e in stored] == [
        (1, "-1", "fix -1"), (2, "2.5", "fix 2.5"), (3, "-0.000000001", "fix -0.000000001")]
    assert {"id", "org", "user", "period", "at"} <= set(stored[0])


def test_corrections_survive_reopening(data_dir: Path, policy: Policy, clock: FakeClock) -> None:
    """Committed and fsync'd before returning: a new process sees the entry."""
    first = Ledger(data_dir, map_size=64 << 20, clock=clock, durable=False)
    entry, _ = add_adjustment(first, policy.orgs["acme"], user="carol", period=PERIOD,
                              amount=Decimal("-12.50"), reason="credit for outage",
                              model="five")
    first.close()
    again = Ledger(data_dir, map_size=64 << 20, clock=clock, durable=False)
    try:
        assert list_adjustments(again, "acme", PERIOD) == [entry]
        assert entry.at == clock.now()
        assert entry.model == "five"
    finally:
        again.close()


def test_an_id_makes_repeating_safe(ledger: Ledger, policy: Policy) -> None:
    """Same id, same fields: the stored entry, nothing new. Other fields: a conflict."""
    org = policy.orgs["acme"]
    first, created = add_adjustment(ledger, org, user="bob", period=PERIOD,
                                    amount=Decimal("-3"), reason="outage", adjustment_id="inc-42")
    again, created_again = add_adjustment(ledger, org, user="bob", period=PERIOD,
                                          amount=Decimal("-3"), reason="outage",
                                          adjustment_id="inc-42")
    assert (created, created_again, again) == (True, False, first)
    assert spent(ledger, policy, "bob")[0] == -3 * USD
    with pytest.raises(Conflict, match="inc-42"):
        add_adjustment(ledger, org, user="bob", period=PERIOD, amount=Decimal("-4"),
                       reason="outage", adjustment_id="inc-42")
    assert len(list_adjustments(ledger, "acme", PERIOD)) == 1


def test_corrections_of_a_past_month_move_that_month(ledger: Ledger, policy: Policy,
                                                     clock: FakeClock) -> None:
    """A credit for October changes October's counters, not November's."""
    clock.set(dt.datetime(2026, 11, 25, tzinfo=dt.UTC))
    add_adjustment(ledger, policy.orgs["acme"], user="dave", period="2026-10",
                   amount=Decimal("-1"), reason="October outage")
    october = usage_report(ledger, policy, policy.orgs["acme"], "2026-10")
    assert october.org_line.spent == -USD
    assert usage_report(ledger, policy, policy.orgs["acme"], PERIOD).org_line.spent == 0
    assert list_adjustments(ledger, "acme", PERIOD) == []


@pytest.mark.parametrize(("text", "message"), [
    ("0", "zero"), ("abc", "not a decimal"), ("NaN", "finite"), ("Infinity", "finite"),
    ("0.0000000001", "more than 9 decimals"), ("2000000000", "beyond"),
])
def test_bad_amounts_are_refused(text: str, message: str) -> None:
    """Amounts are exact, non-zero, whole nano-USD and bounded."""
    with pytest.raises(AdjustmentError, match=message):
        parse_amount(text)


def test_amounts_accept_dollar_signs_and_separators() -> None:
    """``$1,234.50`` and ``-12.50`` read as exact decimals."""
    assert parse_amount("$1,234.50") == Decimal("1234.50")
    assert parse_amount("-12.50") == Decimal("-12.50")


@pytest.mark.parametrize(("field", "value", "message"), [
    ("reason", "  ", "reason is required"), ("user", "", "user is required"),
    ("period", "2026-13", "period must look like"), ("reason", "a\nb", "control characters"),
])
def test_bad_fields_are_refused_and_change_nothing(ledger: Ledger, policy: Policy, field: str,
                                                   value: str, message: str) -> None:
    """A refused correction leaves no entry and no counter change."""
    kwargs = {"user": "bob", "period": PERIOD, "reason": "ok", field: value}
    with pytest.raises(AdjustmentError, match=message):
        add_adjustment(ledger, policy.orgs["acme"], amount=Decimal(1), **kwargs)
    assert list_adjustments(ledger, "acme", PERIOD) == []
    assert usage_report(ledger, policy, policy.orgs["acme"], PERIOD).org_line.spent == 0
