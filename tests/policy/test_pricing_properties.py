"""Properties of the pricing arithmetic over the example rate table (hypothesis).

Any model of the provider's table, any time in 2026, any token counts: the
exact cost adds up, grows with usage, is never negative, rounds up to the
nano-USD, and the batch / geo factors hold exactly, without a float anywhere.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
from pathlib import Path

from hypothesis import given
from hypothesis import strategies as st

from policy.compile import load
from policy.model import ATTO_PER_NANO, RateTable
from policy.pricing import Usage, price

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
TABLE: RateTable = load(EXAMPLES / "rates" / "anthropic.spend").rate_tables["anthropic"]
MODELS = TABLE.canonical
#: Models whose prices have no prompt-length tier: their cost is linear in usage.
UNTIERED = tuple(m for m in MODELS if not any(p.tiers for p in TABLE.models[m].periods))
TOKEN_FIELDS = ("input_tokens", "output_tokens", "cache_write_5m_tokens",
                "cache_write_1h_tokens", "cache_read_tokens")
PROMPT_FIELDS = ("input_tokens", "cache_write_5m_tokens", "cache_write_1h_tokens",
                 "cache_read_tokens")
ALIASED = tuple(m for m in MODELS if TABLE.models[m].aliases)
GEO_SINCE = dt.date(2026, 2, 5)

counts = st.integers(min_value=0, max_value=2_000_000)
times = st.datetimes(min_value=dt.datetime(2026, 1, 1), max_value=dt.datetime(2026, 12, 31),
                     timezones=st.just(dt.UTC))
token_usages = st.builds(Usage, input_tokens=counts, output_tokens=counts,
                         cache_write_5m_tokens=counts, cache_write_1h_tokens=counts,
                         cache_read_tokens=counts)
usages = st.builds(Usage, input_tokens=counts, output_tokens=counts,
                   cache_write_5m_tokens=counts, cache_write_1h_tokens=counts,
                   cache_read_tokens=counts, web_search_requests=st.integers(0, 10_000),
                   web_fetch_requests=st.integers(0, 10_000),
                   code_execution_seconds=st.integers(0, 10**7))
tiers = st.sampled_from(("standard", "batch", "priority"))
geos = st.sampled_from(("", "us", "eu"))


def _speed(model: str, fast: bool) -> str:
    speed_mod = TABLE.speeds["fast"]
    return "fast" if fast and speed_mod.applies_to(TABLE.models[model]) else "standard"


@given(st.sampled_from(UNTIERED), token_usages, token_usages, times, tiers, geos, st.booleans())
def test_cost_is_additive_over_usage(model: str, a: Usage, b: Usage, at: dt.datetime,
                                     tier: str, geo: str, fast: bool) -> None:
    """Without a prompt tier, the cost of a + b is exactly cost(a) + cost(b) in atto-USD."""
    both = Usage(*(x + y for x, y in zip(dataclasses.astuple(a), dataclasses.astuple(b),
                                         strict=True)))
    kw = {"service_tier": tier, "geo": geo, "speed": _speed(model, fast)}
    assert price(TABLE, model, both, at, **kw).atto == (
        price(TABLE, model, a, at, **kw).atto + price(TABLE, model, b, at, **kw).atto)


@given(st.sampled_from(UNTIERED), token_usages, times, tiers, geos)
def test_cost_is_the_sum_of_single_meter_costs(model: str, usage: Usage, at: dt.datetime,
                                               tier: str, geo: str) -> None:
    """Without a prompt tier, each meter is priced on its own and the parts add up."""
    total = 0
    for name in TOKEN_FIELDS:
        alone = Usage(**{name: getattr(usage, name)})
        total += price(TABLE, model, alone, at, service_tier=tier, geo=geo).atto
    assert price(TABLE, model, usage, at, service_tier=tier, geo=geo).atto == total


@given(st.sampled_from(MODELS), usages, times, tiers, geos, st.booleans(),
       st.integers(0, 10**7))
def test_cost_is_the_sum_of_its_lines(model: str, usage: Usage, at: dt.datetime, tier: str,
                                      geo: str, fast: bool, free: int) -> None:
    """Whatever the tier, the total is exactly the sum of the priced lines, never negative."""
    cost = price(TABLE, model, usage, at, service_tier=tier, geo=geo, speed=_speed(model, fast),
                 free_remaining={"code_execution": free})
    assert cost.atto == sum(line.atto for line in cost.lines)
    assert cost.atto >= 0
    assert all(line.atto >= 0 for line in cost.lines)


@given(st.sampled_from(MODELS), usages, times, tiers, geos, st.booleans(),
       st.sampled_from((*TOKEN_FIELDS, "web_search_requests", "code_execution_seconds")),
       st.integers(1, 500_000))
def test_cost_is_monotone_in_every_count(model: str, usage: Usage, at: dt.datetime, tier: str,
                                         geo: str, fast: bool, field: str, more: int) -> None:
    """Using more of any meter never costs less (prompt tiers only ever raise prices)."""
    bigger = dataclasses.replace(usage, **{field: getattr(usage, field) + more})
    kw = {"service_tier": tier, "geo": geo, "speed": _speed(model, fast)}
    assert price(TABLE, model, bigger, at, **kw).atto >= price(TABLE, model, usage, at, **kw).atto


@given(st.sampled_from(MODELS), usages, times, tiers, geos, st.booleans())
def test_enforcement_nanos_round_the_exact_cost_up(model: str, usage: Usage, at: dt.datetime,
                                                   tier: str, geo: str, fast: bool) -> None:
    """nanos is the least whole nano-USD at or above the exact cost."""
    cost = price(TABLE, model, usage, at, service_tier=tier, geo=geo, speed=_speed(model, fast))
    assert cost.nanos * ATTO_PER_NANO >= cost.atto > (cost.nanos - 1) * ATTO_PER_NANO
    assert cost.nanos >= 0


@given(st.sampled_from(MODELS), token_usages, times, geos, st.booleans())
def test_batch_is_exactly_half(model: str, usage: Usage, at: dt.datetime, geo: str,
                               fast: bool) -> None:
    """Twice the batch cost of any token usage is exactly the standard cost."""
    speed = _speed(model, fast)
    standard = price(TABLE, model, usage, at, geo=geo, speed=speed)
    batch = price(TABLE, model, usage, at, service_tier="batch", geo=geo, speed=speed)
    assert batch.atto * 2 == standard.atto
    assert batch.usd * 2 == standard.usd


@given(st.sampled_from(MODELS), token_usages, times, tiers)
def test_geo_us_factor_is_exact(model: str, usage: Usage, at: dt.datetime, tier: str) -> None:
    """geo "us" is exactly 11/10 of the price on models released since 2026-02-05, else 1."""
    rates = TABLE.models[model]
    standard = price(TABLE, model, usage, at, service_tier=tier)
    us = price(TABLE, model, usage, at, service_tier=tier, geo="us")
    newer = rates.released is not None and rates.released >= GEO_SINCE
    assert us.atto * 10 == standard.atto * (11 if newer else 10)


@given(st.sampled_from(MODELS), token_usages, times)
def test_fast_is_exactly_double_where_offered(model: str, usage: Usage, at: dt.datetime) -> None:
    """Fast mode is exactly 2x on the models that offer it and changes nothing elsewhere."""
    offered = TABLE.speeds["fast"].applies_to(TABLE.models[model])
    standard = price(TABLE, model, usage, at)
    fast = price(TABLE, model, usage, at, speed="fast")
    assert fast.atto == standard.atto * (2 if offered else 1)


@given(st.lists(st.integers(0, 100_000), min_size=3, max_size=3),
       st.integers(0, 1_000_000), times, tiers, geos)
def test_prompt_tier_boundary(cuts: list[int], output: int, at: dt.datetime, tier: str,
                              geo: str) -> None:
    """A Haiku 5.5 prompt of exactly 100,000 tokens uses base prices; one more uses the tier.

    The prompt is split at random across input, cache writes and cache reads:
    the tier looks at their sum, not at input alone.
    """
    a, b, c = sorted(cuts)
    parts = dict(zip(PROMPT_FIELDS, (a, b - a, c - b, 100_000 - c), strict=True))
    at_threshold = Usage(output_tokens=output, **parts)
    assert at_threshold.prompt_tokens == 100_000
    base = price(TABLE, "claude-haiku-5-5", at_threshold, at, service_tier=tier, geo=geo)
    assert base.tier == 0
    for name in PROMPT_FIELDS:
        over = dataclasses.replace(at_threshold, **{name: getattr(at_threshold, name) + 1})
        cost = price(TABLE, "claude-haiku-5-5", over, at, service_tier=tier, geo=geo)
        assert cost.tier == 100_000
        # The tier is exactly 5x the base price on every Haiku 5.5 meter, so one
        # more prompt token costs 5x the base request plus that token at the tier.
        one = price(TABLE, "claude-haiku-5-5", Usage(**{name: 1}), at, service_tier=tier,
                    geo=geo).atto
        assert cost.atto == 5 * (base.atto + one)


@given(st.integers(0, 10**7), st.integers(0, 10**7), times)
def test_free_allowance_never_raises_the_cost(seconds: int, free: int, at: dt.datetime) -> None:
    """More free code-execution time left never makes a request cost more."""
    usage = Usage(code_execution_seconds=seconds)
    with_free = price(TABLE, "claude-opus-5-5", usage, at, free_remaining={"code_execution": free})
    without = price(TABLE, "claude-opus-5-5", usage, at, free_remaining={"code_execution": 0})
    assert with_free.atto <= without.atto
    if free >= seconds:
        assert with_free.atto == 0


@given(st.sampled_from(ALIASED), token_usages, times)
def test_aliases_price_like_their_model(model: str, usage: Usage, at: dt.datetime) -> None:
    """Every alias of a model prices every usage exactly like the model."""
    for alias in TABLE.models[model].aliases:
        assert price(TABLE, alias, usage, at).atto == price(TABLE, model, usage, at).atto
