"""``spendkeeper explain``: the decision and every step behind it, from a real ledger."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from _ops_support import SONNET, run, run_json, spendkeeper

CAROL = ("--org", "acme", "--user", "carol@acme.com", "--product", "chat", "--model", SONNET,
         "--input", "1000", "--output", "1000")


def test_explain_names_the_narrowest_failing_level_with_ledger_counters(
        capsys: pytest.CaptureFixture[str], policy_dir: Path, ledger: Path) -> None:
    """carol spent $0.036 of $0.05: another $0.018 fails at her member line's limit."""
    report = run_json(capsys, "explain", "--policy", str(policy_dir), "--data-dir", str(ledger),
                      *CAROL)
    assert (report["decision"], report["reason"], report["verdict"]) == \
        ("DENY", "USER_LIMIT", "USER_LIMIT")
    assert report["member"]["entry"] == "member line"
    assert report["member"]["where"].endswith("policy.spend:28")
    assert report["user_type"]["entitled"] is True
    user, user_type, org = report["limits"]
    assert user == {"level": "user", "scope": "acme/carol@acme.com", "limit_usd": "0.05",
                    "source": "member line", "where": user["where"], "spent_usd": "0.036",
                    "reserved_usd": "0", "this_request_usd": "0.018", "remaining_usd": "0.014",
                    "fits": False}
    assert (user_type["source"], user_type["limit_usd"], user_type["fits"]) == \
        ("user type limit", "50", True)
    assert (org["source"], org["limit_usd"]) == ("org limit", "100")
    assert report["failing_levels"] == ["user"]
    assert report["narrowest_failing"] == "user"
    assert report["price"]["worst_case_usd"] == "0.018"
    assert [(ln["meter"], ln["quantity"], ln["unit_usd"], ln["cost_usd"])
            for ln in report["price"]["lines"]] == [("input", 1000, "3", "0.003"),
                                                    ("output", 1000, "15", "0.015")]
    assert report["reserve_usd"] == "0"


def test_explain_human_output_walks_every_step(
        capsys: pytest.CaptureFixture[str], policy_dir: Path, ledger: Path) -> None:
    """The text form names the member line, the price lines and the failing level."""
    _, out = run(capsys, "explain", "--policy", str(policy_dir), "--data-dir", str(ledger),
                 *CAROL)
    lines = out.splitlines()
    assert lines[0].startswith("DENY USER_LIMIT: user limit of acme/carol@acme.com exceeded")
    assert "1. org \"acme\"" in out
    assert "2. member \"carol@acme.com\": listed (member line" in out
    assert "3. user type chat (seat $20/month)" in out
    assert "chat is entitled" in out
    assert "worst case" in out
    assert "$0.018" in out
    user_row = next(line for line in lines if line.startswith("user "))
    assert user_row.split()[-1] == "NO"
    assert "$0.036" in user_row
    assert "$0.014" in user_row
    assert lines[-1] == "6. failing levels: user; the narrowest, user, gives the reason USER_LIMIT"


def test_explain_without_a_ledger_uses_zero_counters_and_default_entries(
        capsys: pytest.CaptureFixture[str], policy_dir: Path) -> None:
    """An unlisted user gets the default user type and the default user limit."""
    report = run_json(capsys, "explain", "--policy", str(policy_dir), "--org", "acme",
                      "--user", "zed@acme.com", "--product", "chat", "--model", SONNET,
                      "--input", "1000", "--output", "1000")
    assert report["decision"] == "ALLOW"
    assert report["counters_from"] is None
    assert report["member"]["entry"] == "default user_type"
    assert report["member"]["user_type"] == "chat"
    user = report["limits"][0]
    assert (user["source"], user["limit_usd"], user["spent_usd"]) == \
        ("default user limit", "1", "0")
    assert report["reserve_usd"] == "0.018"


def test_explain_shows_unlimited_levels_and_product_entitlement(
        capsys: pytest.CaptureFixture[str], policy_dir: Path) -> None:
    """A chat member asking for claude_code: PRODUCT_NOT_ENTITLED, limits not the reason."""
    report = run_json(capsys, "explain", "--policy", str(policy_dir), "--org", "acme",
                      "--user", "bob@acme.com", "--product", "claude_code", "--model", SONNET)
    assert (report["decision"], report["reason"]) == ("DENY", "PRODUCT_NOT_ENTITLED")
    assert report["user_type"]["entitled"] is False
    _, out = run(capsys, "explain", "--policy", str(policy_dir), "--org", "alice",
                 "--user", "x", "--product", "chat", "--model", SONNET)
    assert "is not in the policy -> UNKNOWN_ORG" in out
    alice = run_json(capsys, "explain", "--policy", str(policy_dir), "--org", "acme",
                     "--user", "alice@acme.com", "--product", "claude_code", "--model", SONNET)
    user_type = alice["limits"][1]
    assert user_type["limit_usd"] is None
    assert user_type["source"] == "unlimited (no limit for user type chat_code)"


def test_explain_shadow_org_reports_the_would_be_verdict(
        capsys: pytest.CaptureFixture[str], policy_dir: Path, ledger: Path) -> None:
    """globex is in shadow mode: ALLOW, with the policy's USER_LIMIT verdict beside it."""
    report = run_json(capsys, "explain", "--policy", str(policy_dir), "--data-dir", str(ledger),
                      "--org", "globex", "--user", "hank@globex.com", "--product", "chat",
                      "--model", SONNET, "--input", "1000", "--output", "1000")
    assert (report["decision"], report["verdict"], report["shadow"]) == \
        ("ALLOW", "USER_LIMIT", True)
    assert report["limits"][0]["spent_usd"] == "0.072"


def test_explain_reads_an_authorize_request_as_json(
        capsys: pytest.CaptureFixture[str], policy_dir: Path, tmp_path: Path) -> None:
    """--json-request takes the AuthorizeRequest's proto JSON (batch tier, clamp)."""
    request = {"request_id": "r1", "org": "acme", "user": "carol@acme.com", "product": "chat",
               "model": SONNET, "estimate": {"input_tokens": 2000, "output_tokens": 10000},
               "service_tier": "batch", "at": "2026-11-20T10:00:00Z", "allow_clamp": True}
    path = tmp_path / "request.json"
    path.write_text(json.dumps(request), encoding="utf-8")
    report = run_json(capsys, "explain", "--policy", str(policy_dir), "--json-request",
                      str(path))
    # The test table prices no batch discount: 2,000 x $3 + 10,000 x $15 per MTok = $0.156,
    # over carol's $0.05, so the output is clamped: (0.05 - 0.006) / 0.000015 = 2,933 tokens.
    assert report["request"]["service_tier"] == "batch"
    assert report["price"]["worst_case_usd"] == "0.156"
    assert report["price"]["modifiers"] == []
    assert report["request"]["at"] == "2026-11-20T10:00:00+00:00"
    assert (report["decision"], report["max_output_tokens"]) == ("ALLOW", 2933)
    assert report["reserve_usd"] == "0.049995"
    assert report["failing_levels"] == []


def test_explain_usage_errors_exit_2(capsys: pytest.CaptureFixture[str], policy_dir: Path,
                                     tmp_path: Path) -> None:
    """Missing request flags, a bad JSON request or a missing ledger are reported."""
    assert spendkeeper(*["explain", "--policy", str(policy_dir), "--org", "acme"]) == 2
    assert "--user, --product, --model required" in capsys.readouterr().err
    bad = tmp_path / "bad.json"
    bad.write_text('{"org": "acme", "estimate": {"input_tokens": -1}}', encoding="utf-8")
    assert spendkeeper(*["explain", "--policy", str(policy_dir), "--json-request", str(bad)]) == 2
    assert "--json-request" in capsys.readouterr().err
    assert spendkeeper(*["explain", "--policy", str(policy_dir), "--data-dir",
                     str(tmp_path / "none"), *CAROL]) == 1
    assert "no ledger in" in capsys.readouterr().err


def test_cli_discovers_the_operations_commands() -> None:
    """``spendkeeper --help`` (a fresh interpreter) lists explain, diff and replay."""
    root = Path(__file__).resolve().parents[2]
    done = subprocess.run([sys.executable, "-m", "sidecar.cli", "--help"], cwd=root,
                          env={**os.environ, "PYTHONPATH": str(root)}, capture_output=True,
                          text=True, check=True, timeout=60)
    for name in ("explain", "diff", "replay"):
        assert f"\n    {name} " in done.stdout
