"""The example policies in examples/: they load, check, and hold what the docs promise."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from policy.compile import load, policy_files
from policy.model import Policy

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
SPEND_FILES = sorted(str(p.relative_to(EXAMPLES)) for p in policy_files([EXAMPLES]))

#: Every priced model row of the provider's table (reference section 1), with
#: its aliases. claude-mythos-preview has no known price and is left out.
PROVIDER_MODELS = {
    "claude-fable-5-2": (), "claude-mythos-5-2": (), "claude-fable-5-1": (),
    "claude-mythos-5-1": (), "claude-fable-5": (), "claude-mythos-5": (),
    "claude-opus-5-5": (), "claude-opus-5": (), "claude-opus-4-8": (), "claude-opus-4-7": (),
    "claude-opus-4-6": (), "claude-opus-4-5": ("claude-opus-4-5-20251101",),
    "claude-opus-4-1": ("claude-opus-4-1-20250805",),
    "claude-opus-4-0": ("claude-opus-4-20250514",),
    "claude-sonnet-5-5": (), "claude-sonnet-5": (), "claude-sonnet-4-6": (),
    "claude-sonnet-4-5": ("claude-sonnet-4-5-20250929",),
    "claude-sonnet-4-0": ("claude-sonnet-4-20250514",),
    "claude-haiku-5-5": (), "claude-haiku-4-5": ("claude-haiku-4-5-20251001",),
    "claude-3-5-haiku-20241022": ("claude-3-5-haiku-latest",),
    "claude-3-haiku-20240307": (), "claude-3-7-sonnet-20250219": (),
    "claude-3-opus-20240229": (),
}


@pytest.fixture(scope="module")
def policy() -> Policy:
    """The whole example policy set, loaded as `spendkeeper check examples` would."""
    start = time.perf_counter()
    loaded = load(EXAMPLES)
    print(f"examples/ loaded in {(time.perf_counter() - start) * 1000:.1f} ms")
    return loaded


def test_examples_directory_has_policy_files() -> None:
    """examples/ holds the rate table, the org policy and its tests."""
    assert {"rates/anthropic.spend", "acme.spend", "acme_test.spend"} <= set(SPEND_FILES)


@pytest.mark.parametrize("name", SPEND_FILES)
def test_every_example_file_parses_and_checks_on_its_own(name: str) -> None:
    """Each .spend file in examples/ loads by itself (following its includes)."""
    load(EXAMPLES / name, root=EXAMPLES)


def test_example_policy_loads_quickly(policy: Policy) -> None:
    """The example policy set loads (its load time is printed, not asserted)."""
    start = time.perf_counter()
    load(EXAMPLES)
    print(f"examples/ reloaded in {(time.perf_counter() - start) * 1000:.1f} ms")
    assert policy.version


def test_example_policy_has_several_orgs(policy: Policy) -> None:
    """One policy set serves several orgs: acme and globex at least."""
    assert {"acme", "globex"} <= set(policy.orgs)


def test_acme_uses_every_org_statement(policy: Policy) -> None:
    """acme exercises plan, rates, timezone, limits, notify, defaults, members, add-ons."""
    acme = policy.orgs["acme"]
    assert acme.timezone == "Europe/Berlin"
    assert acme.limit == 50_000 * 10**9
    assert [str(t) for t in acme.thresholds] == ["50", "80", "100"]
    assert acme.webhook == "https://hooks.example/spend"
    assert acme.type_limits == {"chat": 10_000 * 10**9, "chat_code": 40_000 * 10**9}
    assert acme.default_user_limit == 500 * 10**9
    assert acme.default_user_type == "chat"
    assert acme.per_user_metrics
    assert acme.grace_days == 5
    assert not acme.shadow
    assert acme.members["bob@acme.com"].addons == ("hipaa",)
    assert acme.members["carol@acme.com"].day_limit == 100 * 10**9
    assert acme.members["dave@acme.com"].month_limit is None
    assert policy.orgs["globex"].shadow
    assert policy.orgs["globex"].timezone == "UTC"


def test_plan_entitles_claude_code_only_to_chat_code(policy: Policy) -> None:
    """chat has chat, file creation and code execution; chat_code adds claude_code."""
    types = policy.plans["enterprise"].user_types
    assert types["chat"].products == {"chat", "file_creation", "code_execution"}
    assert types["chat_code"].products == types["chat"].products | {"claude_code"}
    assert policy.plans["enterprise"].addons["hipaa"].for_types == {"chat"}


def test_rate_table_carries_every_provider_model(policy: Policy) -> None:
    """Every priced model of the provider's table is in the example rate table, with aliases."""
    table = policy.rate_tables["anthropic"]
    assert set(table.canonical) == set(PROVIDER_MODELS)
    for name, aliases in PROVIDER_MODELS.items():
        assert table.models[name].aliases == aliases
    assert table.fallback is None  # unknown models are denied, not priced as another


def test_example_policy_tests_are_present(policy: Policy) -> None:
    """acme_test.spend holds the policy unit tests that `spendkeeper test` runs."""
    assert len(policy.tests) >= 20


@pytest.mark.parametrize(("model", "retires"), [
    ("claude-sonnet-4-5", "2026-11-30"), ("claude-opus-4-1", "2026-08-05"),
    ("claude-opus-4-0", "2026-06-15"), ("claude-sonnet-4-0", "2026-06-15"),
    ("claude-3-5-haiku-20241022", "2026-02-19"), ("claude-3-7-sonnet-20250219", "2026-02-19"),
    ("claude-3-opus-20240229", "2026-01-05"),
])
def test_retired_models_carry_their_retirement_date(policy: Policy, model: str,
                                                    retires: str) -> None:
    """Retired and retiring models are denied from 00:00 UTC on the provider's date."""
    when = policy.rate_tables["anthropic"].models[model].retires
    assert when is not None
    assert when.isoformat() == f"{retires}T00:00:00+00:00"


def test_example_policy_tests_pass(policy: Policy) -> None:
    """Every policy unit test in examples/ passes (what `spendkeeper test examples` runs)."""
    from policy.testing import run_tests

    results = run_tests(policy)
    assert results
    failures = [f"{r.location}: {r.name}: {r.message}" for r in results if not r.passed]
    assert failures == []
