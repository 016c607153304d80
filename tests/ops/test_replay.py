"""``spendkeeper replay``: a period's journal re-priced and re-decided under a policy."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pytest
from _ops_support import HERE, run, run_json

from sidecar.explain import LedgerReader, usd


def _period() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y-%m")


def _variant(tmp_path: Path, name: str, old: str, new: str) -> Path:
    text = (HERE / "policy.spend").read_text(encoding="utf-8")
    assert old in text
    target = tmp_path / name
    target.mkdir()
    (target / "policy.spend").write_text(text.replace(old, new, 1), encoding="utf-8")
    return target


def test_replay_under_the_unchanged_policy_reproduces_the_ledger_exactly(
        capsys: pytest.CaptureFixture[str], policy_dir: Path, ledger: Path) -> None:
    """Every org, user type, user and model: re-priced == recorded == the ledger's counters."""
    period = _period()
    report = run_json(capsys, "replay", "--policy", str(policy_dir), "--data-dir", str(ledger),
                      "--period", period)
    totals = report["totals"]
    assert totals["records"] == 17  # 5 alice + 4 bob + 2 carol + 2 dave + 4 hank
    assert totals["recorded_nanos"] == totals["repriced_nanos"] == 327_158_334
    assert totals["recorded_exact_usd"] == totals["repriced_exact_usd"]
    assert totals["difference_usd"] == "0"
    assert totals["unpriced"] == 0
    with LedgerReader(ledger) as reader:
        for org in report["orgs"]:
            spent, _, count = reader.counter((period, "org", org["org"]))
            assert org["recorded_nanos"] == org["repriced_nanos"] == spent
            assert org["records"] == count
            for line in org["user_types"]:
                key = (period, "type", org["org"], line["user_type"])
                assert line["recorded_nanos"] == line["repriced_nanos"] == reader.counter(key)[0]
            for line in org["users"]:
                key = (period, "user", org["org"], line["user"])
                assert line["recorded_nanos"] == line["repriced_nanos"] == reader.counter(key)[0]
            for line in org["models"]:
                assert line["recorded_nanos"] == line["repriced_nanos"]
    acme = report["orgs"][0]
    dave = next(u for u in acme["users"] if u["user"] == "dave@acme.com")
    # 2 x $0.018 of tokens + 600 s of code execution past the free hour at $0.05 / hour
    # (rounded up to the nano-USD): the free allowance is replayed in settlement order.
    assert dave["repriced_usd"] == "0.044333334"
    decisions = report["decisions"]
    assert decisions["would_deny"] == {"USER_LIMIT": 2}  # hank's 3rd and 4th at globex
    assert (decisions["shadow_would_deny"], decisions["denied"], decisions["allowed"]) == \
        (2, 0, 17)


def test_replay_under_a_cheaper_price_table_shows_the_difference(
        capsys: pytest.CaptureFixture[str], tmp_path: Path, ledger: Path) -> None:
    """Half-price tokens: each group's re-priced cost, tool fees unchanged."""
    cheap = _variant(tmp_path, "cheap", "input $3 / MTok  output $15 / MTok  cache_read $0.30",
                     "input $1.50 / MTok  output $7.50 / MTok  cache_read $0.15")
    report = run_json(capsys, "replay", "--policy", str(cheap), "--data-dir", str(ledger),
                      "--period", _period())
    users = {u["user"]: u for org in report["orgs"] for u in org["users"]}
    assert users["alice@acme.com"]["repriced_usd"] == "0.052515"  # 0.10503 / 2
    assert users["carol@acme.com"]["repriced_usd"] == "0.018"
    # bob: tokens 0.039795 / 2 + 3 web searches at $10 / 1000 (not halved).
    assert users["bob@acme.com"]["repriced_usd"] == "0.0498975"
    assert users["dave@acme.com"]["repriced_usd"] == "0.026333334"
    totals = report["totals"]
    assert (totals["recorded_usd"], totals["repriced_usd"], totals["difference_usd"]) == \
        ("0.327158334", "0.182745834", "-0.1444125")
    assert report["decisions"]["would_deny"] == {}  # hank's 4 x $0.009 fit in $0.05
    _, out = run(capsys, "replay", "--policy", str(cheap), "--data-dir", str(ledger),
                 "--period", _period())
    total = next(line for line in out.splitlines() if line.startswith("total"))
    assert total.split() == ["total", "17", "$0.327158334", "$0.182745834", "-$0.1444125"]


def test_replay_under_a_stricter_limit_counts_would_be_denials(
        capsys: pytest.CaptureFixture[str], tmp_path: Path, ledger: Path) -> None:
    """alice at $0.05: her 3rd to 5th calls ($0.021 each) would be denied; --org filters."""
    strict = _variant(tmp_path, "strict", 'chat_code limit $2 / month',
                      'chat_code limit $0.05 / month')
    report = run_json(capsys, "replay", "--policy", str(strict), "--data-dir", str(ledger),
                      "--period", _period(), "--org", "acme")
    assert [org["org"] for org in report["orgs"]] == ["acme"]
    decisions = report["decisions"]
    assert decisions["would_deny"] == {"USER_LIMIT": 3}
    assert (decisions["denied"], decisions["allowed"], decisions["shadow_would_deny"]) == \
        (3, 10, 0)
    assert {ex["request_id"] for ex in decisions["examples"]} == {"alice-2", "alice-3",
                                                                 "alice-4"}
    _, out = run(capsys, "replay", "--policy", str(strict), "--data-dir", str(ledger),
                 "--period", _period(), "--org", "acme")
    assert "10 allowed, 3 denied; would deny: USER_LIMIT 3" in out


def test_replay_of_an_empty_period(capsys: pytest.CaptureFixture[str], policy_dir: Path,
                                   ledger: Path) -> None:
    """A month with no records replays to zeros."""
    report = run_json(capsys, "replay", "--policy", str(policy_dir), "--data-dir", str(ledger),
                      "--period", "2001-01")
    assert report["totals"]["records"] == 0
    assert report["orgs"] == []
    assert usd(0) == "0"
