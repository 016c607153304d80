"""Invoices from a real ledger: rounding worked out by hand, seats, corrections, late usage."""

from __future__ import annotations

import csv
import datetime as dt
import io
import json
from decimal import Decimal
from fractions import Fraction

import pytest
from _money_support import PERIOD, FakeClock, record_many, request

from policy.model import Policy
from sidecar.invoice import Invoice, UsageLine, build_invoice, render, round_cents
from sidecar.ledger import Ledger
from sidecar.ledger.adjust import add_adjustment


def invoice(ledger: Ledger, policy: Policy, org: str = "acme", period: str = PERIOD,
            now: dt.datetime | None = None) -> Invoice:
    return build_invoice(ledger, policy, policy.orgs[org], period, now)


def lines(inv: Invoice, user: str, model: str | None = None) -> list[UsageLine]:
    return [u for u in inv.usage if u.user == user and (model is None or u.model == model)]


@pytest.mark.parametrize(("value", "expected"), [
    (Fraction(5, 1000), "0.01"),  # exactly half a cent: up (half-even would give 0.00)
    (Fraction(15, 1000), "0.02"),  # half-even would give 0.02 too; half-up agrees
    (Fraction(25, 1000), "0.03"),  # half-even would give 0.02
    (Fraction(49999, 10**7), "0.00"),  # just under half a cent
    (Fraction(2675, 1000), "2.68"),  # float(2.675) rounds to 2.67
    (Fraction(1, 3), "0.33"),
    (Fraction(2, 3), "0.67"),
    (Fraction(-5, 1000), "-0.01"),  # a tie rounds away from zero for credits too
    (Fraction(0), "0.00"),
])
def test_round_cents_is_half_up_once(value: Fraction, expected: str) -> None:
    """Rounding to the cent: half-up, exact (fractions, never floats)."""
    assert round_cents(value) == Decimal(expected)
    assert str(round_cents(value)) == expected


def test_a_line_of_exactly_half_a_cent_rounds_up(ledger: Ledger, policy: Policy) -> None:
    """1,000 input tokens at $5 / MTok are $0.005: the line is $0.01."""
    ledger.record(policy, request("r1", "alice", "five", input_tokens=1000))
    (line,) = lines(invoice(ledger, policy), "alice")
    assert (line.meter, line.quantity, line.unit_usd, line.per) == ("input", 1000, 5, 10**6)
    assert line.exact == Fraction(5, 1000)
    assert line.amount == Decimal("0.01")


def test_rounding_is_once_per_line_not_per_request(ledger: Ledger, policy: Policy) -> None:
    """Rounding each request would give $0.00 and $3.00; the lines are $0.30 and $2.25."""
    # 100 requests of 1,000 input tokens at $3 / MTok: $0.003 each (rounds to $0.00 alone);
    # the line is 100,000 tokens = $0.30.
    record_many(ledger, policy, "small", 100, "bob", "m", input_tokens=1000)
    # 300 requests of 300 output tokens at $25 / MTok: $0.0075 each (rounds to $0.01 alone);
    # the line is 90,000 tokens = $2.25.
    record_many(ledger, policy, "half", 300, "bob", "five", output_tokens=300)
    inv = invoice(ledger, policy)
    (small,) = lines(inv, "bob", "m")
    (half,) = lines(inv, "bob", "five")
    assert (small.quantity, small.requests, small.amount) == (100_000, 100, Decimal("0.30"))
    assert (half.quantity, half.requests, half.amount) == (90_000, 300, Decimal("2.25"))
    assert inv.user_totals()["bob"] == Decimal("2.55")
    assert inv.subtotal("usage") == Decimal("2.55")


def test_half_up_is_exact_where_a_float_is_not(ledger: Ledger, policy: Policy) -> None:
    """535,000 tokens at $5 / MTok are $2.675: $2.68 (a float would say 2.67)."""
    ledger.record(policy, request("r1", "carol", "five", input_tokens=535_000))
    (line,) = lines(invoice(ledger, policy), "carol")
    assert line.amount == Decimal("2.68")
    assert round(2.675, 2) == 2.67  # why money never goes through a float


def test_batch_usage_has_its_own_price_lines(ledger: Ledger, policy: Policy) -> None:
    """Batch halves every token price: $1.50 / MTok input, $7.50 / MTok output."""
    ledger.record(policy, request("b1", "dave", "m", tier="batch", input_tokens=1_000_000,
                                  output_tokens=1001))
    ledger.record(policy, request("s1", "dave", "m", input_tokens=1_000_000))
    inv = invoice(ledger, policy)
    got = {(u.label, u.meter): (u.unit_usd, u.quantity, u.amount) for u in lines(inv, "dave")}
    assert got == {
        ("batch 50% off", "input"): (Decimal("1.5"), 1_000_000, Decimal("1.50")),
        # 1,001 x $7.50 / MTok = $0.0075075
        ("batch 50% off", "output"): (Decimal("7.5"), 1001, Decimal("0.01")),
        ("standard", "input"): (Decimal("3"), 1_000_000, Decimal("3.00")),
    }
    assert inv.user_totals()["dave"] == Decimal("4.51")


def test_seat_fees_per_user_type_and_the_hipaa_add_on(ledger: Ledger, policy: Policy) -> None:
    """Members by type, users seen under the default type, HIPAA per chat member."""
    ledger.record(policy, request("g1", "guest", "m", input_tokens=1000))  # unlisted, active
    inv = invoice(ledger, policy)
    seats = {(s.kind, s.name): (s.count, s.unit_usd, s.amount, s.users) for s in inv.seats}
    assert seats == {
        ("seat", "chat"): (3, Decimal(20), Decimal("60.00"), ("alice", "bob", "guest")),
        ("seat", "chat_code"): (2, Decimal(30), Decimal("60.00"), ("carol", "dave")),
        ("addon", "hipaa"): (2, Decimal(5), Decimal("10.00"), ("alice", "bob")),
    }
    # guest's 1,000 tokens at $3 / MTok are $0.003: $0.00.
    assert (inv.subtotal("seat"), inv.subtotal("addon"), inv.total) == (
        Decimal("120.00"), Decimal("10.00"), Decimal("130.00"))


def test_users_the_org_does_not_know_pay_no_seat(ledger: Ledger, policy: Policy) -> None:
    """An org without a default user type: strangers' usage is billed, flagged, seatless."""
    ledger.record(policy, request("x1", "mallory", "m", org="strict", input_tokens=1_000_000))
    inv = invoice(ledger, policy, "strict")
    assert inv.non_members == ("mallory",)
    assert [(s.name, s.count) for s in inv.seats] == [("chat", 1)]  # erin
    assert lines(inv, "mallory")[0].amount == Decimal("3.00")
    assert inv.total == Decimal("23.00")


def test_free_allowance_is_listed_at_zero(ledger: Ledger, policy: Policy) -> None:
    """1 free hour of code execution per org and month: only the rest is charged."""
    ledger.record(policy, request("c1", "carol", code_execution_seconds=5400))
    ledger.record(policy, request("c2", "dave", code_execution_seconds=1800))
    ledger.record(policy, request("w1", "bob", web_search_requests=3))
    inv = invoice(ledger, policy)
    (carol,) = lines(inv, "carol")
    (dave,) = lines(inv, "dave")
    (bob,) = lines(inv, "bob")
    # 1,800 billable seconds at $0.05 / 3,600 s = $0.025 -> $0.03.
    assert (carol.quantity, carol.free, carol.billable, carol.amount) == (
        5400, 3600, 1800, Decimal("0.03"))
    assert (dave.free, dave.amount) == (0, Decimal("0.03"))
    assert (bob.meter, bob.unit_text, bob.amount) == (
        "tool:web_search", "$10 / 1,000 requests", Decimal("0.03"))
    assert carol.unit_text == "$0.05 / 3,600 s"
    assert "5,400 (3,600 free at $0)" in render(inv, "text")


def test_corrections_have_their_own_section(ledger: Ledger, policy: Policy) -> None:
    """A credit lowers the total; each correction is rounded once like any line."""
    org = policy.orgs["acme"]
    add_adjustment(ledger, org, user="alice", period=PERIOD, amount=Decimal("-12.50"),
                   reason="credit for outage")
    add_adjustment(ledger, org, user="bob", period=PERIOD, amount=Decimal("0.005"),
                   reason="re-priced request r7", model="m")
    add_adjustment(ledger, org, user="bob", period=PERIOD, amount=Decimal("-0.005"),
                   reason="goodwill")
    inv = invoice(ledger, policy)
    got = [(a.user, a.amount, amount, a.reason) for a, amount in inv.corrections]
    assert got == [("alice", Decimal("-12.50"), Decimal("-12.50"), "credit for outage"),
                   ("bob", Decimal("0.005"), Decimal("0.01"), "re-priced request r7"),
                   ("bob", Decimal("-0.005"), Decimal("-0.01"), "goodwill")]
    # Seats: chat 2 x $20, chat_code 2 x $30, hipaa 2 x $5 = $110.
    assert (inv.subtotal("corrections"), inv.total) == (Decimal("-12.50"), Decimal("97.50"))
    data = json.loads(render(inv, "json"))
    assert data["corrections"][0]["amount"] == "-12.50"
    assert data["corrections"][1]["model"] == "m"
    assert data["totals"]["corrections_usd"] == "-12.50"
    assert "credit for outage" in render(inv, "text")


def test_late_usage_within_the_grace_window_is_marked_on_its_month(
        ledger: Ledger, policy: Policy, clock: FakeClock) -> None:
    """Usage from November arriving on 2 December (grace: 3 days) lands in November, late."""
    clock.set(dt.datetime(2026, 12, 2, tzinfo=dt.UTC))
    result = ledger.record(policy, request("late1", "alice", at=dt.datetime(
        2026, 11, 29, 18, 0, tzinfo=dt.UTC), input_tokens=1_000_000))
    assert (result.period, result.late) == (PERIOD, True)
    inv = invoice(ledger, policy)
    (line,) = lines(inv, "alice")
    assert (line.label, line.late, line.amount) == ("standard, late", True, Decimal("3.00"))
    assert inv.subtotal("late") == Decimal("3.00")
    assert not inv.final
    assert inv.grace_closes == dt.datetime(2026, 12, 4, tzinfo=dt.UTC)
    assert "STANDARD, LATE" in render(inv, "text")
    assert "provisional" in render(inv, "md")
    assert invoice(ledger, policy, now=dt.datetime(2026, 12, 5, tzinfo=dt.UTC)).final


def test_late_usage_after_the_grace_window_counts_in_the_current_month(
        ledger: Ledger, policy: Policy, clock: FakeClock) -> None:
    """After 4 December, November usage is billed (marked late) in December."""
    clock.set(dt.datetime(2026, 12, 10, tzinfo=dt.UTC))
    ledger.record(policy, request("late2", "bob", at=dt.datetime(2026, 11, 20, tzinfo=dt.UTC),
                                  input_tokens=1_000_000))
    assert lines(invoice(ledger, policy), "bob") == []
    december = invoice(ledger, policy, period="2026-12")
    (line,) = lines(december, "bob")
    assert (line.late, line.amount) == (True, Decimal("3.00"))
    assert december.subtotal("late") == Decimal("3.00")


def test_unpriced_usage_is_listed_and_not_charged(ledger: Ledger, policy: Policy) -> None:
    """A model the table does not know: recorded, flagged on the invoice, never charged."""
    ledger.record(policy, request("u1", "bob", "mystery-model", input_tokens=500,
                                  output_tokens=20))
    ledger.record(policy, request("u2", "newbie", "mystery-model", input_tokens=10))
    inv = invoice(ledger, policy)
    assert inv.usage == ()
    assert [(u.user, u.model, u.request_ids, u.usage) for u in inv.unpriced] == [
        ("bob", "mystery-model", ("u1",), {"input_tokens": 500, "output_tokens": 20}),
        ("newbie", "mystery-model", ("u2",), {"input_tokens": 10})]
    assert inv.subtotal("usage") == 0
    # newbie appeared in usage (unlisted, default type chat): a seat.
    assert [s.users for s in inv.seats if s.name == "chat"] == [("alice", "bob", "newbie")]
    data = json.loads(render(inv, "json"))
    assert data["unpriced"][0]["charged"] is False
    assert "NOT CHARGED" in render(inv, "text")
    assert "NOT CHARGED" in render(inv, "csv")


def test_fallback_pricing_is_marked(ledger: Ledger, policy: Policy) -> None:
    """A model priced by the table's fallback says so on its lines."""
    ledger.record(policy, request("f1", "zed", "gpt-x", org="fallback", input_tokens=1000))
    (line,) = lines(invoice(ledger, policy, "fallback"), "zed")
    assert (line.model, line.label, line.fallback) == ("m", "standard, fallback", True)


def test_every_format_carries_the_same_totals_and_the_rule(
        ledger: Ledger, policy: Policy) -> None:
    """JSON, CSV, Markdown and text agree on every subtotal and state the rounding rule."""
    record_many(ledger, policy, "s", 7, "bob", "five", input_tokens=1000)  # $0.035 -> $0.04
    ledger.record(policy, request("c", "carol", "m", cache_read_tokens=12345,
                                  cache_write_1h_tokens=999))
    add_adjustment(ledger, policy.orgs["acme"], user="carol", period=PERIOD,
                   amount=Decimal("-1"), reason="credit")
    inv = invoice(ledger, policy)
    data = json.loads(render(inv, "json"))
    assert data["totals"] == {"seats_usd": "100.00", "addons_usd": "10.00", "usage_usd": "0.05",
                              "late_usage_usd": "0.00", "corrections_usd": "-1.00",
                              "total_usd": "109.05"}
    # carol: 12,345 x $0.30 / MTok = $0.0037035 -> $0.00; 999 x $6 / MTok = $0.005994 -> $0.01
    assert [u["amount_usd"] for u in data["usage"] if u["user"] == "carol"] == ["0.01", "0.00"]
    assert sum(Decimal(u["amount_usd"]) for u in data["usage"]) == Decimal("0.05")
    rows = list(csv.DictReader(io.StringIO(render(inv, "csv"))))
    assert rows[-1]["section"] == "total"
    assert rows[-1]["amount_usd"] == "109.05"
    assert sum(Decimal(r["amount_usd"]) for r in rows if r["section"] in (
        "seat", "addon", "usage", "correction")) == Decimal("109.05")
    for fmt in ("md", "text"):
        text = render(inv, fmt)
        assert "$109.05" in text
        assert "rounded once to the cent" in " ".join(text.split())
    assert data["rounding"].startswith("Each line is its exact quantity")
