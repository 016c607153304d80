"""``spendkeeper diff OLD NEW``: every money-relevant change, and who is over the new limits."""

from __future__ import annotations

from pathlib import Path

import pytest
from _ops_support import HERE, run, run_json

#: (old text, new text) edits that turn policy.spend into the proposed policy.
EDITS = (
    ('member "alice@acme.com" chat_code limit $2 / month',
     'member "alice@acme.com" chat_code limit $0.10 / month'),
    ("default user limit $1 / month", "default user limit $0.04 / month"),
    ('member "carol@acme.com" chat limit $0.05 / month',
     'member "carol@acme.com" chat limit $0.25 / month'),
    ("user_type chat limit $50 / month", "user_type chat limit unlimited"),
    ("limit $100 / month", "limit $0.20 / month"),
    ('member "bob@acme.com"   chat',
     'member "bob@acme.com" chat_code\n  member "erin@acme.com" chat'),
    ("products chat, file_creation, code_execution }", "products chat, file_creation }"),
    ("seat $25 / month", "seat $30 / month"),
    ("input $3 / MTok  output $15 / MTok", "input $2 / MTok  output $15 / MTok"),
    ('model "claude-haiku-4-5"', 'model "claude-opus-4-5"'),
)


@pytest.fixture
def new_policy(tmp_path: Path) -> Path:
    """The proposed policy: lower limits, a new member, a type change, new prices."""
    text = (HERE / "policy.spend").read_text(encoding="utf-8")
    for old, new in EDITS:
        assert old in text, old
        text = text.replace(old, new, 1)
    target = tmp_path / "new"
    target.mkdir()
    (target / "policy.spend").write_text(text, encoding="utf-8")
    return target


def _changes(report: dict[str, object]) -> set[tuple[str, str, str, str | None, str | None]]:
    return {(c["section"], c["subject"], c["field"], c["old"], c["new"])  # type: ignore[index]
            for c in report["changes"]}  # type: ignore[attr-defined]


def test_diff_lists_limit_member_entitlement_seat_and_price_changes(
        capsys: pytest.CaptureFixture[str], policy_dir: Path, new_policy: Path) -> None:
    """Limits old -> new (members' effective ones too), types, products, seats, prices."""
    report = run_json(capsys, "diff", str(policy_dir), str(new_policy))
    assert report["headroom"] is None
    assert report["over_now"] is None
    assert _changes(report) == {
        ("limits", "acme", "org limit", "$100", "$0.20"),
        ("limits", "acme/chat", "user type limit", "$50", "unlimited"),
        ("limits", "acme", "default user limit", "$1", "$0.04"),
        ("limits", "acme/alice@acme.com", "user limit", "$2", "$0.10"),
        ("limits", "acme/bob@acme.com", "user limit", "$1", "$0.04"),
        ("limits", "acme/carol@acme.com", "user limit", "$0.05", "$0.25"),
        ("limits", "acme/erin@acme.com", "user limit", "$1", "$0.04"),
        ("members", "acme/erin@acme.com", "member", None, "added"),
        ("members", "acme/bob@acme.com", "user type", "chat", "chat_code"),
        ("plans", "enterprise/chat", "product code_execution", "entitled", None),
        ("plans", "enterprise/chat_code", "seat", "$25", "$30"),
        ("prices", "test/claude-sonnet-4-6", "input", "$3 / MTok", "$2 / MTok"),
        # Cache-write prices follow input (the language derives them when not written).
        ("prices", "test/claude-sonnet-4-6", "cache_write_5m", "$3.75 / MTok", "$2.50 / MTok"),
        ("prices", "test/claude-sonnet-4-6", "cache_write_1h", "$6 / MTok", "$4 / MTok"),
        ("prices", "test/claude-haiku-4-5", "model", "present", None),
        ("prices", "test/claude-opus-4-5", "model", None, "added"),
    }


def test_diff_with_a_ledger_shows_headroom_and_who_is_over_now(
        capsys: pytest.CaptureFixture[str], policy_dir: Path, new_policy: Path,
        ledger: Path) -> None:
    """Spend recorded through the server against the new limits, scope by scope."""
    report = run_json(capsys, "diff", str(policy_dir), str(new_policy), "--data-dir",
                      str(ledger))
    rows = {h["scope"]: h for h in report["headroom"]}
    assert set(report["over_now"]) == {"acme", "acme/alice@acme.com", "acme/bob@acme.com",
                                       "acme/dave@acme.com", "globex/hank@globex.com"}
    alice = rows["acme/alice@acme.com"]
    assert (alice["used_usd"], alice["old_limit_usd"], alice["new_limit_usd"],
            alice["old_remaining_usd"], alice["new_remaining_usd"], alice["change_usd"]) == \
        ("0.10503", "2", "0.1", "1.89497", "-0.00503", "-1.9")
    carol = rows["acme/carol@acme.com"]
    assert (carol["used_usd"], carol["change_usd"], carol["over_now"]) == ("0.036", "0.2", False)
    assert rows["acme/chat"]["new_limit_usd"] is None
    assert rows["acme/chat"]["change_usd"] is None
    assert rows["acme/erin@acme.com"]["note"] == "newly listed (was a default user_type user)"
    assert rows["acme/bob@acme.com"]["note"].startswith("type chat -> chat_code")
    assert rows["acme"]["used_usd"] == "0.255158334"
    # hank's limit did not change, but he is over it (shadow mode let him through).
    assert rows["globex/hank@globex.com"]["note"] == "over the old limit too"


def test_diff_human_output(capsys: pytest.CaptureFixture[str], policy_dir: Path,
                           new_policy: Path, ledger: Path) -> None:
    """Sections with + / - / ~ lines, then the headroom table and the over-now line."""
    _, out = run(capsys, "diff", str(policy_dir), str(new_policy), "--data-dir", str(ledger))
    assert "  ~ acme/alice@acme.com: user limit $2 -> $0.10" in out
    assert "  + acme/erin@acme.com: member added" in out
    assert "  - enterprise/chat: product code_execution removed (was entitled)" in out
    assert "  ~ test/claude-sonnet-4-6: input $3 / MTok -> $2 / MTok" in out
    assert "OVER NOW" in out
    assert out.rstrip().endswith("over their new limit right now: acme, acme/alice@acme.com, "
                                 "acme/bob@acme.com, acme/dave@acme.com, globex/hank@globex.com")


def test_diff_of_identical_policies_is_empty(capsys: pytest.CaptureFixture[str],
                                             policy_dir: Path, ledger: Path) -> None:
    """No changes, and only scopes already over their (unchanged) limit in the table."""
    report = run_json(capsys, "diff", str(policy_dir), str(policy_dir), "--data-dir",
                      str(ledger))
    assert report["changes"] == []
    assert report["over_now"] == ["globex/hank@globex.com"]
