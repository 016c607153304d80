"""``spendkeeper check | fmt | test | price``: exit codes and output, in and out of process."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from sidecar import cli

ROOT = Path(__file__).resolve().parents[2]

RATES = """\
rates "r" {
  model "m" alias "m-1" { input $3 / MTok  output $15 / MTok }
  model "tiny" { input $0.0001 / MTok  output $1 / MTok }
  tool web_search $10 / 1000 requests
  batch 50% off
}
"""

ACME = """\
include "rates.spend"
plan "p" { user_type chat { products chat } }
org "acme" {
  plan "p"  rates "r"
  limit $100 / month
  default user_type chat
}
"""

# 1,000 input tokens at $3 / MTok = $0.003.
PASSING_TEST = """\
test "a small call is allowed" {
  org "acme"  user "u"  product chat  model "m"  at 2026-11-15T10:00:00Z
  usage input 1000
  expect allow WITHIN_LIMITS cost $0.003
}
"""


@pytest.fixture
def policy_dir(tmp_path: Path) -> Path:
    """A policy set of two files: a rate table and an org including it."""
    root = tmp_path / "policy"
    root.mkdir()
    (root / "rates.spend").write_text(RATES, encoding="utf-8")
    (root / "acme.spend").write_text(ACME, encoding="utf-8")
    return root


def run_cli(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    """``python -m sidecar.cli ARGS`` in a fresh interpreter."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "sidecar.cli", *args], cwd=ROOT, env=env,
                          input=stdin, capture_output=True, text=True, timeout=60, check=False)


# ---------------------------------------------------------------- main and registration
def test_no_subcommand_prints_help_and_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    """Bare ``spendkeeper`` is a usage error that lists the subcommands."""
    assert cli.main([]) == 2
    err = capsys.readouterr().err
    for name in ("check", "fmt", "test", "price"):
        assert name in err


def test_help_and_version_exit_0(capsys: pytest.CaptureFixture[str]) -> None:
    """``--help`` and ``--version`` return 0 instead of exiting the process."""
    assert cli.main(["--help"]) == 0
    assert cli.main(["price", "--help"]) == 0
    assert cli.main(["--version"]) == 0
    assert "spendkeeper " in capsys.readouterr().out


def test_a_registered_command_is_reachable(monkeypatch: pytest.MonkeyPatch,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    """Adding a subcommand is one Command in COMMANDS: arguments, run, exit code."""
    def add_arguments(parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--who", default="world")

    def run(args: argparse.Namespace) -> int:
        if args.who == "nobody":
            args.command_parser.error("nobody is not a name")
        print(f"hello {args.who}")
        return 3

    command = cli.Command("hello", "say hello", add_arguments, run)
    monkeypatch.setattr(cli, "COMMANDS", [*cli.COMMANDS, command])
    assert cli.main(["hello", "--who", "ops"]) == 3
    assert capsys.readouterr().out == "hello ops\n"
    assert cli.main(["hello", "--who", "nobody"]) == 2
    assert "spendkeeper hello: error: nobody is not a name" in capsys.readouterr().err


def test_module_runs_as_a_script() -> None:
    """``python -m sidecar.cli`` works and returns main's exit code."""
    done = run_cli("--version")
    assert done.returncode == 0
    assert done.stdout.startswith("spendkeeper ")
    assert run_cli().returncode == 2


# ---------------------------------------------------------------- check
def test_check_ok_summarises(policy_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A good policy: one summary line, exit 0."""
    assert cli.main(["check", str(policy_dir)]) == 0
    assert capsys.readouterr().out == "ok: 2 files, 1 org, 2 models\n"


def test_check_reports_every_error_and_exits_1(policy_dir: Path) -> None:
    """Each diagnostic is rendered with file, line, caret and a hint; exit 1."""
    (policy_dir / "acme.spend").write_text(ACME.replace('rates "r"', 'rates "rr"')
                                           .replace("user_type chat\n", "user_type chta\n"))
    done = run_cli("check", str(policy_dir))
    assert done.returncode == 1
    assert done.stdout == ""
    assert ':4:13: unknown-rate-table: unknown rate table "rr"' in done.stderr
    assert "did you mean r?" in done.stderr
    assert "unknown user type \"chta\"" in done.stderr
    assert "  plan \"p\"  rates \"rr\"\n" in done.stderr
    assert done.stderr.rstrip().endswith("2 errors")


def test_check_syntax_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A syntax error names what was expected."""
    bad = tmp_path / "bad.spend"
    bad.write_text('org "o" {\n  limit 50 / month\n}\n')
    assert cli.main(["check", str(bad)]) == 1
    err = capsys.readouterr().err
    assert "bad.spend:2:9: syntax: unexpected '50'" in err
    assert "expected one of:" in err


# ---------------------------------------------------------------- fmt
UGLY = 'org "o" {   # the org\n  plan "p"  rates "r"\n    limit $50000 / month\n}\n'
PRETTY = 'org "o" {  # the org\n  plan "p"\n  rates "r"\n  limit $50,000 / month\n}\n'


def test_fmt_rewrites_in_place_keeping_the_mode(tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    """Files are rewritten to canonical text, their permissions kept, no temp file left."""
    path = tmp_path / "o.spend"
    path.write_text(UGLY)
    path.chmod(0o640)
    assert cli.main(["fmt", str(tmp_path)]) == 0
    assert path.read_text() == PRETTY
    assert path.stat().st_mode & 0o777 == 0o640
    assert [p.name for p in tmp_path.iterdir()] == ["o.spend"]
    captured = capsys.readouterr()
    assert captured.out == f"reformatted {path}\n"
    assert captured.err == "1 file reformatted, 0 unchanged\n"
    assert cli.main(["fmt", str(path)]) == 0
    assert capsys.readouterr().err == "0 files reformatted, 1 unchanged\n"


def test_fmt_check_lists_files_and_writes_nothing(tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    """``--check`` exits 1 naming each file that would change; none is written."""
    ugly, pretty = tmp_path / "a.spend", tmp_path / "b.spend"
    ugly.write_text(UGLY)
    pretty.write_text(PRETTY)
    assert cli.main(["fmt", "--check", str(tmp_path)]) == 1
    assert capsys.readouterr().out == f"would reformat {ugly}\n"
    assert ugly.read_text() == UGLY
    assert cli.main(["fmt", "--check", str(pretty)]) == 0


def test_fmt_diff_shows_the_change_and_writes_nothing(tmp_path: Path) -> None:
    """``--diff`` prints a unified diff; with ``--check`` it also exits 1."""
    path = tmp_path / "a.spend"
    path.write_text(UGLY)
    done = run_cli("fmt", "--diff", "--check", str(path))
    assert done.returncode == 1
    assert f"--- {path}\n+++ {path} (formatted)\n" in done.stdout
    assert "-    limit $50000 / month\n" in done.stdout
    assert "+  limit $50,000 / month\n" in done.stdout
    assert path.read_text() == UGLY
    assert run_cli("fmt", "--diff", str(path)).returncode == 0


def test_fmt_stdin_to_stdout() -> None:
    """``fmt -`` formats standard input to standard output."""
    done = run_cli("fmt", "-", stdin=UGLY)
    assert (done.returncode, done.stdout) == (0, PRETTY)
    assert run_cli("fmt", "--check", "-", stdin=UGLY).returncode == 1


def test_fmt_refuses_invalid_files(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A file that does not parse is reported and left alone; exit 1."""
    path = tmp_path / "bad.spend"
    path.write_text('org "o" {\n  limit 5\n}\n')
    assert cli.main(["fmt", str(path)]) == 1
    assert f"{path}:2:9: syntax: unexpected '5'" in capsys.readouterr().err
    assert path.read_text() == 'org "o" {\n  limit 5\n}\n'


def test_fmt_without_files_is_an_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """An empty directory is probably a mistake."""
    assert cli.main(["fmt", str(tmp_path)]) == 1
    assert "no .spend files" in capsys.readouterr().err


# ---------------------------------------------------------------- test
def test_test_passes(policy_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Passing tests: PASS lines and the summary; exit 0. ``-v`` shows the decision."""
    (policy_dir / "acme_test.spend").write_text(PASSING_TEST)
    assert cli.main(["test", str(policy_dir)]) == 0
    out = capsys.readouterr().out
    assert out == (f"PASS {_shown(policy_dir)}/acme_test.spend:1:1: a small call is allowed\n"
                   "1 passed, 0 failed\n")
    assert cli.main(["test", "-v", str(policy_dir)]) == 0
    assert "     allow WITHIN_LIMITS (cost $0.003)\n" in capsys.readouterr().out


def _shown(path: Path) -> str:
    """How the loader names files: relative to the working directory."""
    return os.path.relpath(path)


def test_test_failures_exit_1_with_the_reason(policy_dir: Path) -> None:
    """A failing test prints FAIL, the expectation and the decision; exit 1."""
    (policy_dir / "acme_test.spend").write_text(
        PASSING_TEST + PASSING_TEST.replace("a small call is allowed", "wrong")
        .replace("expect allow WITHIN_LIMITS", "expect deny ORG_LIMIT"))
    done = run_cli("test", str(policy_dir))
    assert done.returncode == 1
    assert "acme_test.spend:6:1: wrong\n" in done.stdout
    assert ("     expected deny ORG_LIMIT cost $0.003, got allow WITHIN_LIMITS (cost $0.003)\n"
            in done.stdout)
    assert done.stdout.endswith("1 passed, 1 failed\n")


def test_test_without_tests_exits_1(policy_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """No test blocks is a failure, and the output says so."""
    assert cli.main(["test", str(policy_dir)]) == 1
    assert "no tests found in" in capsys.readouterr().err


def test_test_on_a_broken_policy_exits_1(policy_dir: Path,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    """Tests do not run against a policy that does not check."""
    (policy_dir / "acme.spend").write_text(ACME.replace('plan "p"  ', 'plan "q"  '))
    assert cli.main(["test", str(policy_dir)]) == 1
    assert 'unknown plan "q"' in capsys.readouterr().err


@pytest.mark.skipif(not (ROOT / "examples").is_dir(), reason="examples/ is not there yet")
def test_examples_check_and_test() -> None:
    """The shipped examples check and their tests pass, through the real entry point."""
    assert run_cli("check", "examples").returncode == 0
    done = run_cli("test", "examples")
    assert done.returncode == 0, done.stdout + done.stderr
    assert ", 0 failed" in done.stdout


# ---------------------------------------------------------------- price
def _price_json(capsys: pytest.CaptureFixture[str], *args: str) -> dict[str, object]:
    assert cli.main(["price", "--json", *args]) == 0
    result: dict[str, object] = json.loads(capsys.readouterr().out)
    return result


def test_price_json_is_exact(policy_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """1,000,000 input at $3 / MTok + 500,000 output at $15 / MTok = "10.5" exactly."""
    report = _price_json(capsys, "--policy", str(policy_dir), "--model", "m",
                         "--input", "1,000,000", "--output", "500k", "--at", "2026-11-15")
    assert report["cost_usd"] == "10.5"
    assert report["cost_nanos"] == 10_500_000_000
    assert (report["model"], report["priced"], report["tier"], report["modifiers"]) == (
        "m", True, 0, [])
    assert report["lines"] == [
        {"meter": "input", "quantity": 1_000_000, "unit_usd": "3", "per": 1_000_000,
         "cost_usd": "3", "free": 0},
        {"meter": "output", "quantity": 500_000, "unit_usd": "15", "per": 1_000_000,
         "cost_usd": "7.5", "free": 0}]


def test_price_json_modifiers_tools_and_sub_nano_rounding(
        policy_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Batch halves tokens; tools are per 1,000; a tenth of a nano-USD enforces as 1 nano."""
    report = _price_json(capsys, "--policy", str(policy_dir), "--model", "m-1", "--input",
                         "1000", "--web-search", "3", "--tier", "batch", "--at", "2026-11-15")
    # 1,000 x $1.50 / MTok = $0.0015; 3 searches x $10 / 1,000 = $0.03.
    assert report["cost_usd"] == "0.0315"
    assert report["modifiers"] == ["batch 50% off"]
    assert report["model"] == "m"
    tiny = _price_json(capsys, "--policy", str(policy_dir), "--model", "tiny", "--input", "1")
    assert (tiny["cost_usd"], tiny["cost_nanos"]) == ("0.0000000001", 1)


def test_price_human_table(policy_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """People get a table, the exact total and the enforcement nanos."""
    assert cli.main(["price", "--policy", str(policy_dir), "--model", "m", "--input", "1000000",
                     "--output", "500000", "--at", "2026-11-15T12:00:00+01:00"]) == 0
    out = capsys.readouterr().out
    assert out.startswith('m in rate table "r" at 2026-11-15T12:00:00+01:00: standard prices\n')
    for cell in ("input", "1,000,000", "$3 / MTok", "$3.00", "output", "$15 / MTok", "$7.50",
                 "total", "$10.50"):
        assert cell in out
    assert "exact cost: $10.5 USD\n" in out
    assert "enforcement cost: 10,500,000,000 nano-USD (rounded up)\n" in out


def test_price_human_table_without_rich(policy_dir: Path, monkeypatch: pytest.MonkeyPatch,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    """Without rich the table is plain aligned text with the same cells."""
    for name in ("rich", "rich.console", "rich.table"):
        monkeypatch.setitem(sys.modules, name, None)
    assert cli.main(["price", "--policy", str(policy_dir), "--model", "m", "--output", "2,000",
                     "--web-search", "1", "--at", "2026-11-15"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[1].split() == ["meter", "quantity", "unit", "price", "cost"]
    assert lines[2].split() == ["output", "2,000", "$15", "/", "MTok", "$0.03"]
    assert lines[3].split() == ["tool:web_search", "1", "$10", "/", "1,000", "requests", "$0.01"]
    assert lines[4].split() == ["total", "$0.04"]


def test_price_picks_the_org_rate_table(policy_dir: Path,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    """``--org`` prices under that org's table; a second table needs a choice."""
    (policy_dir / "more.spend").write_text(RATES.replace('rates "r"', 'rates "r2"'))
    args = ["price", "--policy", str(policy_dir), "--model", "m", "--input", "1"]
    assert cli.main(args) == 2
    assert ("the policy has 2 rate tables (r, r2): choose one with --rates NAME or --org ORG"
            in capsys.readouterr().err)
    assert cli.main([*args, "--org", "acme"]) == 0
    assert cli.main([*args, "--rates", "r2"]) == 0
    assert cli.main([*args, "--rates", "r3"]) == 2
    assert 'unknown rate table "r3"; did you mean r?' in capsys.readouterr().err
    assert cli.main([*args, "--org", "acme2"]) == 2
    assert 'unknown org "acme2"; did you mean acme?' in capsys.readouterr().err


@pytest.mark.parametrize(
    ("extra", "message"),
    [(["--input", "-5"], "argument --input: must be a whole number of zero or more"),
     (["--output", "1.5"], "argument --output: must be a whole number of zero or more"),
     (["--at", "2026-13-01"], "argument --at: not a valid date or time: '2026-13-01'"),
     (["--tier", "fast"], "argument --tier: invalid choice: 'fast'"),
     (["--model", "mm"], 'unknown model "mm" in rate table "r"; did you mean m?')],
    ids=["negative", "fraction", "bad-date", "bad-tier", "unknown-model"])
def test_price_bad_input_exits_2(policy_dir: Path, capsys: pytest.CaptureFixture[str],
                                 extra: list[str], message: str) -> None:
    """Bad counts, dates, tiers and models are usage errors with a clear message."""
    assert cli.main(["price", "--policy", str(policy_dir), "--model", "m", *extra]) == 2
    assert message in capsys.readouterr().err


def test_price_notes_what_authorize_would_refuse(policy_dir: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    """Fast mode the table does not price is noted (Authorize denies it)."""
    report = _price_json(capsys, "--policy", str(policy_dir), "--model", "m", "--input", "1",
                         "--speed", "fast", "--geo", "eu")
    assert report["notes"] == [
        'rate table "r" prices no fast for "m": Authorize denies it (MODEL_NOT_ALLOWED)',
        'no geo "eu" modifier applies to "m": standard prices apply']


def test_price_through_the_entry_point(policy_dir: Path) -> None:
    """The subprocess path prints the same exact JSON."""
    done = run_cli("price", "--policy", str(policy_dir), "--model", "m", "--input", "1000000",
                   "--output", "500000", "--json")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["cost_usd"] == "10.5"
    bad = run_cli("price", "--policy", str(policy_dir), "--model", "m", "--input", "-1")
    assert bad.returncode == 2
    assert ("--input: must be a whole number of zero or more (1000, 4,000 or 200k), not '-1'"
            in bad.stderr)
