"""``policy.testing``: the policy unit-test runner (``spendkeeper test``)."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pytest

from policy.compile import load, load_text
from policy.errors import PolicyError
from policy.testing import TestResult, format_usd, parse_count, parse_money, parse_time, run_tests

ROOT = Path(__file__).resolve().parents[2]

# input $5 / MTok and output $25 / MTok: 1,000 in + 4,000 out = $0.005 + $0.10 = $0.105.
POLICY = """\
rates "r" {
  model "m" { input $5 / MTok  output $25 / MTok }
  tool web_search $10 / 1000 requests
}
plan "p" {
  user_type chat { products chat }
  user_type coder { products chat, claude_code }
}
org "acme" {
  plan "p"  rates "r"
  limit $1,000 / month
  user_type chat limit $100 / month
  default user_type chat
  default user limit $5 / month
  member "alice" chat limit $2 / month
  member "carol" coder limit $1 / day
}
org "shadowy" {
  plan "p"  rates "r"
  limit $1 / month
  default user_type chat
  shadow
}
"""

REQUEST = """\
  org "acme"  user "alice"  product chat  model "m"  at 2026-11-15T10:00:00Z
  usage input 1000 output 4,000
"""


def _run(*tests: str) -> list[TestResult]:
    return run_tests(load_text(POLICY + "\n".join(tests), "p.spend"))


def _one(body: str, name: str = "t") -> TestResult:
    [result] = _run(f'test "{name}" {{\n{body}}}\n')
    return result


def test_a_matching_allow_passes() -> None:
    """Decision, reason and exact cost all match: the test passes with its decision."""
    result = _one(REQUEST + "  expect allow WITHIN_LIMITS cost $0.105\n")
    assert result.passed, result.message
    assert result.message == ""
    assert result.decision is not None
    assert result.decision.cost is not None
    assert result.decision.cost.nanos == 105_000_000


def test_a_wrong_expectation_fails_with_a_clear_message() -> None:
    """The failure says what was expected and what the policy decided."""
    result = _one(REQUEST + "  expect deny USER_LIMIT\n", name="alice over")
    assert not result.passed
    assert result.message == "expected deny USER_LIMIT, got allow WITHIN_LIMITS (cost $0.105)"
    assert result.name == "alice over"
    assert result.location == "p.spend:24:1"


def test_cost_is_compared_exactly_in_nanos() -> None:
    """One nano-USD off is a failure."""
    result = _one(REQUEST + "  expect allow cost $0.105000001\n")
    assert not result.passed
    assert result.message == ("expected allow cost $0.105000001, got allow WITHIN_LIMITS "
                              "(cost $0.105)")


def test_given_sets_the_counter_of_the_requests_own_scope() -> None:
    """``given user spent`` fills alice's monthly counter: $1.90 + $0.105 > $2."""
    result = _one(REQUEST + "  given user spent $1.90\n  expect deny USER_LIMIT cost $0.105\n")
    assert result.passed, result.message


def test_given_reserved_counts_too() -> None:
    """Reserved spend counts against the limit like spent."""
    ok = _one(REQUEST + "  given user spent $1 reserved $0.895\n  expect allow\n")
    over = _one(REQUEST + "  given user spent $1 reserved $0.895000001\n"
                "  expect deny USER_LIMIT\n")
    assert ok.passed, ok.message
    assert over.passed, over.message


def test_given_each_level() -> None:
    """org, user_type and user_day counters reach the levels they name."""
    org = _one(REQUEST + "  given org spent $999.90\n  expect deny ORG_LIMIT\n")
    user_type = _one(REQUEST + "  given user_type spent $99.90\n  expect deny USER_TYPE_LIMIT\n")
    day = _one('  org "acme" user "carol" product claude_code model "m" '
               "at 2026-11-15T10:00:00Z\n  usage output 4,000\n"
               "  given user_day spent $0.95\n  expect deny USER_LIMIT\n")
    for result in (org, user_type, day):
        assert result.passed, result.message


def test_the_deny_message_is_part_of_the_failure() -> None:
    """When the policy denies unexpectedly, its explanation is shown."""
    result = _one(REQUEST + "  given user spent $2\n  expect allow\n")
    assert not result.passed
    assert result.message.startswith(
        "expected allow, got deny USER_LIMIT (cost $0.105): user limit of acme/alice exceeded")


def test_allow_clamp_and_max_output() -> None:
    """With headroom $0.10: $0.005 of input leaves 3,800 output tokens at $25 / MTok."""
    result = _one(REQUEST + "  allow_clamp\n  given user spent $1.90\n"
                  "  expect allow WITHIN_LIMITS cost $0.10 max_output 3,800\n")
    assert result.passed, result.message
    wrong = _one(REQUEST + "  allow_clamp\n  given user spent $1.90\n"
                 "  expect allow max_output 3,801\n")
    assert wrong.message == ("expected allow max_output 3,801, got allow WITHIN_LIMITS "
                             "(cost $0.10, max_output 3,800)")


def test_tools_tier_and_date_only_at() -> None:
    """Tool usage is priced; ``at`` may be a date (midnight UTC); batch needs a discount."""
    result = _one('  org "acme" user "alice" product chat model "m" at 2026-11-15\n'
                  "  usage web_search 2 input 1000\n  tier standard speed standard\n"
                  "  expect allow cost $0.025\n")
    assert result.passed, result.message


def test_unknown_user_product_and_model_are_decisions() -> None:
    """These are answers of the policy, tested like any other."""
    product = _one(REQUEST.replace("product chat", "product claude_code")
                   + "  expect deny PRODUCT_NOT_ENTITLED\n")
    model = _one(REQUEST.replace('model "m"', 'model "nope"') + "  expect deny UNKNOWN_MODEL\n")
    assert product.passed, product.message
    assert model.passed, model.message


def test_an_unknown_org_may_be_expected() -> None:
    """``expect deny UNKNOWN_ORG`` tests the answer for an org the policy does not know."""
    result = _one(REQUEST.replace('"acme"', '"nobody"') + "  expect deny UNKNOWN_ORG\n")
    assert result.passed, result.message


def test_shadow_orgs_answer_allow_with_the_reason() -> None:
    """In shadow mode a would-be deny is answered allow, with the deny's reason."""
    body = REQUEST.replace('"acme"', '"shadowy"') + "  given org spent $1\n"
    assert _one(body + "  expect allow ORG_LIMIT cost $0.105\n").passed
    denied = _one(body + "  expect deny ORG_LIMIT\n")
    assert denied.message.startswith("expected deny ORG_LIMIT, got allow ORG_LIMIT (cost $0.105): "
                                     "shadow mode: would deny: org limit of shadowy exceeded")


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (REQUEST.replace('"acme"', '"acme2"') + "  expect allow\n",
         'test "t" at p.spend:25:3: unknown org "acme2"; did you mean acme?'),
        (REQUEST, 'test "t" at p.spend:24:1: missing expect'),
        (REQUEST.replace(" at 2026-11-15T10:00:00Z", "") + "  expect allow\n",
         'test "t" at p.spend:24:1: missing at (e.g. at 2026-11-15T10:00:00Z: a test needs '
         "a fixed time)"),
        (REQUEST + "  usage inptu 5\n  expect allow\n",
         "test \"t\" at p.spend:27:3: unknown usage key 'inptu'; did you mean input?"),
        (REQUEST + "  usage input 5\n  expect allow\n",
         'test "t" at p.spend:27:3: usage input is given twice'),
        (REQUEST + "  usage web_search 1.5\n  expect allow\n",
         "test \"t\" at p.spend:27:3: usage web_search: '1.5' is not a whole number of zero "
         "or more"),
        (REQUEST + "  expect allow cost $0.0000000001\n",
         'test "t" at p.spend:27:3: expect: $0.0000000001 is not a whole number of nano-USD '
         "(at most 9 decimals)"),
        (REQUEST + "  given user spent $0.0000000001\n  expect allow\n",
         'test "t" at p.spend:27:3: given user: $0.0000000001 is not a whole number of '
         "nano-USD (at most 9 decimals)"),
        (REQUEST + "  given user spent $1\n  given user spent $1\n  expect allow\n",
         'test "t" at p.spend:28:3: given user appears twice'),
        (REQUEST + "  given user_day spent $1\n  expect allow\n",
         'test "t" at p.spend:27:3: given user_day: user "alice" has no daily limit, so '
         "there is no user_day counter"),
        (REQUEST + "  expect deny USER_LIMT\n",
         "test \"t\" at p.spend:27:3: unknown reason 'USER_LIMT'; did you mean USER_LIMIT?"),
        (REQUEST + "  tier fast\n  expect allow\n",
         "test \"t\" at p.spend:27:3: tier must be one of standard, batch, priority, not 'fast'"),
        (REQUEST + "  org \"acme\"\n  expect allow\n",
         'test "t" at p.spend:27:3: org is given twice (first at p.spend:25:3)'),
        (REQUEST.replace("2026-11-15T10:00:00Z", "2026-11-15T10:00") + "  expect allow\n",
         'test "t" at p.spend:25:54: time 2026-11-15T10:00 has no zone: add Z (UTC) or an '
         "offset like +01:00"),
        (REQUEST.replace("2026-11-15T10:00:00Z", "2026-02-30") + "  expect allow\n",
         "test \"t\" at p.spend:25:54: not a valid date or time: '2026-02-30' (write e.g. "
         "2026-11-15 or 2026-11-15T10:00:00Z)"),
    ],
    ids=["unknown-org", "missing-expect", "missing-at", "bad-usage-key", "usage-twice",
         "fractional-count", "inexact-cost", "inexact-given", "given-twice", "no-day-counter",
         "unknown-reason", "bad-tier", "duplicate-field", "naive-time", "bad-date"],
)
def test_malformed_tests_fail_with_their_name_and_place(body: str, message: str) -> None:
    """A malformed test is a failing result that names the test and the spot."""
    result = _one(body)
    assert not result.passed
    assert result.decision is None
    assert result.message == message


def test_given_for_an_unknown_member_is_malformed() -> None:
    """Counters need a member to belong to."""
    text = (POLICY.replace("  default user_type chat\n", "") + 'test "t" {\n'
            + REQUEST.replace('"alice"', '"zed"')
            + "  given user spent $1\n  expect deny UNKNOWN_USER\n}\n")
    [result] = run_tests(load_text(text, "p.spend"))
    assert result.message.startswith('test "t" at p.spend:')
    assert 'given needs a member: user "zed" is not in org "acme"' in result.message


def test_one_broken_test_does_not_hide_the_others() -> None:
    """Results come in source order, malformed ones included, without exceptions."""
    results = _run('test "a" {\n' + REQUEST + "  expect allow\n}",
                   'test "b" {\n  org "zz"\n}',
                   'test "c" {\n' + REQUEST + "  expect deny\n}")
    assert [(r.name, r.passed) for r in results] == [("a", True), ("b", False), ("c", False)]


def test_no_tests_gives_no_results() -> None:
    """A policy without test blocks has nothing to run."""
    assert run_tests(load_text(POLICY)) == []


def test_duplicate_test_names_are_a_policy_error() -> None:
    """Two tests with one name are caught by the checker, before running."""
    with pytest.raises(PolicyError, match="duplicate test"):
        load_text(POLICY + 'test "a" {}\ntest "a" {}\n')


@pytest.mark.parametrize(("text", "value"), [("1000", 1000), ("4,000", 4000), ("200k", 200_000),
                                             ("1.5m", 1_500_000), ("0", 0), ("2K", 2000)])
def test_parse_count(text: str, value: int) -> None:
    """Counts are written as in the language."""
    assert parse_count(text) == value


@pytest.mark.parametrize("text", ["-1", "1.5", "abc", "", "1e3x", "nan"])
def test_parse_count_rejects(text: str) -> None:
    """Negative, fractional or malformed counts are refused."""
    with pytest.raises(ValueError, match=r"."):
        parse_count(text)


def test_money_and_time_helpers() -> None:
    """Exact nano-USD in, exact dollars out; dates are midnight UTC."""
    assert parse_money("$1,999.5") == 1_999_500_000_000
    assert format_usd(105_000_000) == "$0.105"
    assert format_usd(10_500_000_000) == "$10.50"
    assert format_usd(1_234_000_000_000) == "$1,234.00"
    assert format_usd(1) == "$0.000000001"
    assert parse_time("2026-11-15") == dt.datetime(2026, 11, 15, tzinfo=dt.UTC)
    assert parse_time("2026-11-15T10:00", naive_utc=True) == dt.datetime(2026, 11, 15, 10,
                                                                          tzinfo=dt.UTC)
    assert parse_time("2026-11-15T10:00:00+01:00").utcoffset() == dt.timedelta(hours=1)


@pytest.mark.skipif(not (ROOT / "examples").is_dir(), reason="examples/ is not there yet")
def test_every_example_policy_test_passes() -> None:
    """The tests shipped in examples/ pass against the example policy."""
    results = run_tests(load(ROOT / "examples"))
    assert results
    assert [r.message for r in results if not r.passed] == []
