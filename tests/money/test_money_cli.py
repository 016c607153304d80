"""``spendkeeper usage | adjust | invoice | reconcile`` in process: output and exit codes."""

from __future__ import annotations

import csv
import datetime as dt
import json
from pathlib import Path

import pytest
from _money_support import PERIOD, POLICY_FILE, ROOT, FakeClock, load_policy, request

import sidecar
from sidecar import cli
from sidecar.ledger import Ledger


@pytest.fixture(autouse=True)
def _discoverable(monkeypatch: pytest.MonkeyPatch) -> None:
    """Let ``cli.main`` discover ``sidecar/_cli_*.py`` under the ``pytest`` entry point.

    There, ``tests/`` is on sys.path and the checkout is not, so ``import sidecar``
    finds the namespace package ``tests/sidecar`` (submodules still load through
    the editable install's finder, but ``sidecar.__path__`` lists no command
    modules). ``python -m pytest`` is unaffected. The lasting fix is
    ``pythonpath = ["."]`` in pytest's configuration.
    """
    if getattr(sidecar, "__file__", None) is None:
        monkeypatch.setattr(sidecar, "__path__", [str(ROOT / "sidecar")])


@pytest.fixture
def filled(tmp_path: Path) -> Path:
    """A closed ledger with November traffic: alice $0.50 (of $1), bob $3, carol $0.003."""
    data = tmp_path / "data"
    policy = load_policy()
    ledger = Ledger(data, map_size=64 << 20, clock=FakeClock(), durable=False)
    try:
        ledger.record(policy, request("a1", "alice", "five", input_tokens=100_000))
        ledger.record(policy, request("b1", "bob", "m", input_tokens=1_000_000))
        ledger.record(policy, request("c1", "carol", "m", input_tokens=1000))
        ledger.record(policy, request("x1", "dave", "mystery", input_tokens=5))
    finally:
        ledger.close()
    return data


def main(data: Path, *args: str, org: str = "acme") -> int:
    return cli.main([args[0], "--data-dir", str(data), "--policy", str(POLICY_FILE),
                     "--org", org, *args[1:]])


def test_the_money_commands_are_listed(capsys: pytest.CaptureFixture[str]) -> None:
    """Discovered from sidecar/_cli_money.py without an edit to the CLI."""
    assert cli.main(["--help"]) == 0
    out = capsys.readouterr().out
    for name in ("usage", "adjust", "invoice", "reconcile"):
        assert name in out


def test_usage_shows_members_by_spend_with_bars(filled: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    """Highest spend first; a bar and a percentage against each limit."""
    assert main(filled, "usage", "--period", PERIOD) == 0
    out = capsys.readouterr().out
    order = [out.index(f"  {name} ") for name in ("bob", "alice", "carol", "dave")]
    assert order == sorted(order)
    alice = next(line for line in out.splitlines() if line.lstrip().startswith("alice"))
    assert "$0.50" in alice
    assert "$1.00" in alice
    assert "██████████░░░░░░░░░░ 50%" in alice
    assert "User types" in out
    assert "Organisation" in out


def test_usage_json_has_exact_decimal_strings(filled: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    """Money as exact strings; unlimited limits as null."""
    assert main(filled, "usage", "--period", PERIOD, "--json") == 0
    data = json.loads(capsys.readouterr().out)
    users = {u["scope"]: u for u in data["users"]}
    assert users["alice"]["spent_usd"] == "0.5"
    assert users["alice"]["limit_usd"] == "1"
    assert users["alice"]["remaining_usd"] == "0.5"
    assert users["carol"]["spent_usd"] == "0.003"
    assert data["org_line"]["spent_usd"] == "3.503"
    assert data["org_line"]["limit_usd"] == "1000"
    assert [u["scope"] for u in data["users"]][:3] == ["bob", "alice", "carol"]


def test_usage_for_one_user(filled: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """``--user`` shows only that member; an unknown one is a usage error."""
    assert main(filled, "usage", "--period", PERIOD, "--user", "carol", "--json") == 0
    assert [u["scope"] for u in json.loads(capsys.readouterr().out)["users"]] == ["carol"]
    assert main(filled, "usage", "--period", PERIOD, "--user", "nobody") == 2
    assert 'no user "nobody"' in capsys.readouterr().err


def test_adjust_credits_and_the_invoice_shows_it(filled: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    """A credit is durable, moves alice's counters and appears under Corrections."""
    assert main(filled, "adjust", "--user", "alice", "--period", PERIOD, "--amount", "-0.25",
                "--reason", "credit for outage", "--id", "inc-1") == 0
    out = capsys.readouterr().out
    assert "recorded correction inc-1 (#1): credit of $0.25" in out
    assert "durable" in out
    assert main(filled, "adjust", "--user", "alice", "--period", PERIOD, "--amount", "-0.25",
                "--reason", "credit for outage", "--id", "inc-1") == 0
    assert "already recorded; nothing changed" in capsys.readouterr().out
    assert main(filled, "usage", "--period", PERIOD, "--user", "alice", "--json") == 0
    assert json.loads(capsys.readouterr().out)["users"][0]["spent_usd"] == "0.25"
    assert main(filled, "invoice", "--period", PERIOD, "--format", "json") == 0
    data = json.loads(capsys.readouterr().out)
    assert [(c["id"], c["amount_usd"]) for c in data["corrections"]] == [("inc-1", "-0.25")]


def test_adjust_invoice_only_and_json(filled: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """``--invoice-only`` leaves enforcement alone; ``--json`` prints the stored entry."""
    assert main(filled, "adjust", "--user", "bob", "--period", PERIOD, "--amount", "1.5",
                "--reason", "re-priced b1", "--model", "m", "--invoice-only", "--json") == 0
    entry = json.loads(capsys.readouterr().out)
    assert (entry["amount"], entry["counters"], entry["model"], entry["created"]) == (
        "1.5", False, "m", True)
    assert main(filled, "usage", "--period", PERIOD, "--user", "bob", "--json") == 0
    assert json.loads(capsys.readouterr().out)["users"][0]["spent_usd"] == "3"


@pytest.mark.parametrize(("args", "message"), [
    (("--amount", "0"), "zero"),
    (("--amount", "-1", "--id", "inc-1"), "already used"),
    (("--amount", "1e-12"), "more than 9 decimals"),
])
def test_adjust_refuses_bad_corrections(filled: Path, capsys: pytest.CaptureFixture[str],
                                        args: tuple[str, ...], message: str) -> None:
    """Exit 2 with the reason; nothing is recorded."""
    assert main(filled, "adjust", "--user", "bob", "--period", PERIOD, "--amount", "-2",
                "--reason", "first", "--id", "inc-1") == 0
    capsys.readouterr()
    assert main(filled, "adjust", "--user", "bob", "--period", PERIOD, "--reason", "x",
                *args) == 2
    assert message in capsys.readouterr().err


def test_adjust_refuses_users_the_org_does_not_know(filled: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    """Org "strict" lists only erin: a typo is not silently credited."""
    assert main(filled, "adjust", "--user", "erni", "--period", PERIOD, "--amount", "-1",
                "--reason", "x", org="strict") == 2
    assert 'unknown user "erni"' in capsys.readouterr().err


@pytest.mark.parametrize("fmt", ["text", "json", "csv", "md"])
def test_invoice_in_every_format(filled: Path, capsys: pytest.CaptureFixture[str],
                                 fmt: str) -> None:
    """Seats $110 + usage ($0.50 + $3.00 + $0.00) = $113.50; unpriced flagged."""
    assert main(filled, "invoice", "--period", PERIOD, "--format", fmt) == 0
    out = capsys.readouterr().out
    if fmt == "json":
        assert json.loads(out)["totals"]["total_usd"] == "113.50"
    elif fmt == "csv":
        rows = list(csv.DictReader(out.splitlines()))
        assert (rows[-1]["section"], rows[-1]["amount_usd"]) == ("total", "113.50")
        assert any(r["section"] == "unpriced" and r["model"] == "mystery" for r in rows)
    else:
        assert "$113.50" in out
        assert "NOT CHARGED" in out
        assert "mystery" in out


def test_invoice_to_a_file(filled: Path, tmp_path: Path,
                           capsys: pytest.CaptureFixture[str]) -> None:
    """``--output`` writes the file (atomically) and says so on stderr."""
    target = tmp_path / "acme-2026-11.md"
    assert main(filled, "invoice", "--period", PERIOD, "--format", "md",
                "--output", str(target)) == 0
    captured = capsys.readouterr()
    assert captured.out == ""
    assert str(target) in captured.err
    text = target.read_text(encoding="utf-8")
    assert text.startswith("# Invoice for acme, 2026-11")
    assert "| TOTAL | $113.50 |" in text
    assert list(tmp_path.glob(".acme-2026-11.md.*")) == []


def test_reconcile_exit_codes(filled: Path, tmp_path: Path,
                              capsys: pytest.CaptureFixture[str]) -> None:
    """1 with differences or unpriced usage (both listed), 0 when clean, 2 when unreadable."""
    report = tmp_path / "report.csv"
    report.write_text("request_id,user,model,input_tokens\na1,alice,five,100000\n"
                      "b1,bob,m,999999\nc1,carol,m,1000\nx1,dave,mystery,5\n",
                      encoding="utf-8")
    assert main(filled, "reconcile", "--period", PERIOD, "--provider-report", str(report)) == 1
    out = capsys.readouterr().out
    assert "tokens" in out
    assert "999999" in out
    assert "Unpriced usage" in out
    assert main(filled, "reconcile", "--period", PERIOD, "--provider-report", str(report),
                "--json") == 1
    data = json.loads(capsys.readouterr().out)
    assert [(d["kind"], d["request_id"]) for d in data["differences"]] == [("tokens", "b1")]
    assert [e["id"] for e in data["unpriced"]] == ["x1"]
    assert main(filled, "reconcile", "--period", "2026-10") == 0
    assert "Result: no differences" in capsys.readouterr().out
    assert main(filled, "reconcile", "--period", PERIOD, "--provider-report",
                str(tmp_path / "absent.csv")) == 2
    assert "cannot read provider report" in capsys.readouterr().err


@pytest.mark.parametrize(("args", "message"), [
    (("usage", "--org", "acm"), 'unknown org "acm"'),
    (("invoice", "--org", "acme", "--period", "2026-13"), "--period: period must look like"),
    (("reconcile", "--org", "acme", "--period", "11-2026"), "--period"),
])
def test_usage_errors_exit_2(filled: Path, capsys: pytest.CaptureFixture[str],
                             args: tuple[str, ...], message: str) -> None:
    """Unknown orgs (with a suggestion) and malformed periods."""
    assert cli.main([args[0], "--data-dir", str(filled), "--policy", str(POLICY_FILE),
                     *args[1:]]) == 2
    err = capsys.readouterr().err
    assert message in err
    if "acm" in args:
        assert "did you mean acme?" in err


def test_a_missing_ledger_or_broken_policy_exits_2(tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    """No data.mdb is created by a read command; a policy error is printed."""
    assert main(tmp_path / "nowhere", "invoice", "--period", PERIOD) == 2
    assert "no ledger in" in capsys.readouterr().err
    assert not (tmp_path / "nowhere").exists()
    broken = tmp_path / "broken.spend"
    broken.write_text('org "acme" {\n  plan "missing"\n}\n', encoding="utf-8")
    assert cli.main(["usage", "--data-dir", str(tmp_path), "--policy", str(broken),
                     "--org", "acme"]) == 2
    assert "broken.spend:" in capsys.readouterr().err


def test_late_usage_is_marked_in_the_text_invoice(tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    """On 2 December, November's late line says LATE and the invoice is provisional."""
    clock = FakeClock(dt.datetime(2026, 12, 2, tzinfo=dt.UTC))
    ledger = Ledger(tmp_path / "d", map_size=64 << 20, clock=clock, durable=False)
    try:
        ledger.record(load_policy(), request("l1", "bob", at=dt.datetime(
            2026, 11, 30, 23, 0, tzinfo=dt.UTC), input_tokens=1_000_000))
    finally:
        ledger.close()
    assert main(tmp_path / "d", "invoice", "--period", PERIOD) == 0
    out = capsys.readouterr().out
    assert "STANDARD, LATE" in out
    assert "of which late usage     $3.00" in out
    assert "provisional: late usage is accepted until 2026-12-04" in out
