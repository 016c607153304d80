"""Real requests priced from the example rate table, each worked out by hand.

Prices are USD per MTok (1,000,000 tokens) from examples/rates/anthropic.spend,
which carries the provider's table (../shared/reference/claude-api-prices-2026-11.md).
Every expected value is an exact decimal string; the arithmetic is in the
comments.
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pytest

from policy.compile import load
from policy.model import RateTable
from policy.pricing import Cost, Usage, price

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
NOV = dt.datetime(2026, 11, 15, 10, 0, tzinfo=dt.UTC)


@pytest.fixture(scope="module")
def table() -> RateTable:
    """The provider's rate table as the example policy defines it."""
    return load(EXAMPLES / "rates" / "anthropic.spend").rate_tables["anthropic"]


def usd(cost: Cost) -> str:
    """The exact cost as a plain decimal string (no exponent)."""
    return f"{cost.usd:f}"


def lines(cost: Cost) -> list[tuple[str, int, str]]:
    """Each line as (meter, quantity, unit USD per MTok, normalised)."""
    return [(line.meter, line.quantity, f"{line.unit_usd.normalize():f}") for line in cost.lines]


def test_haiku_5_5_long_prompt_prices_every_meter_at_the_tier(table: RateTable) -> None:
    """A Haiku 5.5 prompt of 100,001 tokens prices all five meters, output too, at tier rates."""
    usage = Usage(input_tokens=60_000, cache_read_tokens=30_000, cache_write_5m_tokens=8_000,
                  cache_write_1h_tokens=2_001, output_tokens=5_000)
    # prompt = 60,000 + 30,000 + 8,000 + 2,001 = 100,001 > 100,000
    #   input          60,000 x $0.50  / MTok = $0.03
    #   output          5,000 x $2.50  / MTok = $0.0125
    #   cache_write_5m  8,000 x $0.625 / MTok = $0.005
    #   cache_write_1h  2,001 x $1.00  / MTok = $0.002001
    #   cache_read     30,000 x $0.05  / MTok = $0.0015
    #   total                                   $0.051001
    cost = price(table, "claude-haiku-5-5", usage, NOV)
    assert usd(cost) == "0.051001"
    assert cost.tier == 100_000
    assert cost.label == "prompt > 100,000"
    assert lines(cost) == [("input", 60_000, "0.5"), ("output", 5_000, "2.5"),
                           ("cache_write_5m", 8_000, "0.625"),
                           ("cache_write_1h", 2_001, "1"), ("cache_read", 30_000, "0.05")]


def test_haiku_5_5_prompt_of_exactly_100k_uses_base_prices(table: RateTable) -> None:
    """At exactly 100,000 prompt tokens the base prices still apply ("up to 100,000")."""
    usage = Usage(input_tokens=60_000, cache_read_tokens=30_000, cache_write_5m_tokens=8_000,
                  cache_write_1h_tokens=2_000, output_tokens=5_000)
    #   60,000 x $0.10 + 5,000 x $0.50 + 8,000 x $0.125 + 2,000 x $0.20 + 30,000 x $0.01
    # = $0.006 + $0.0025 + $0.001 + $0.0004 + $0.0003 = $0.0102
    cost = price(table, "claude-haiku-5-5", usage, NOV)
    assert usd(cost) == "0.0102"
    assert cost.tier == 0


def test_batch_halves_tokens_including_cache_writes_and_reads(table: RateTable) -> None:
    """Batch is 50% off every token meter, cache writes and reads included."""
    usage = Usage(input_tokens=10_000, cache_read_tokens=200_000, cache_write_5m_tokens=4_000,
                  output_tokens=2_000)
    # Sonnet 4.6 standard:
    #   input      10,000 x $3    = $0.03
    #   output      2,000 x $15   = $0.03
    #   5m write    4,000 x $3.75 = $0.015
    #   cache read 200,000 x $0.30 = $0.06      standard $0.135, batch x 0.5 = $0.0675
    cost = price(table, "claude-sonnet-4-6", usage, NOV, service_tier="batch")
    assert usd(cost) == "0.0675"
    assert cost.modifiers == ("batch 50% off",)
    assert lines(cost) == [("input", 10_000, "1.5"), ("output", 2_000, "7.5"),
                           ("cache_write_5m", 4_000, "1.875"), ("cache_read", 200_000, "0.15")]


def test_haiku_5_5_batch_matches_the_published_batch_prices(table: RateTable) -> None:
    """Haiku 5.5 batch is $0.05 / $0.25 per MTok up to 100K and $0.25 / $1.25 over it."""
    small = price(table, "claude-haiku-5-5", Usage(input_tokens=100_000, output_tokens=1_000_000),
                  NOV, service_tier="batch")
    # 100,000 x $0.05 + 1,000,000 x $0.25 = $0.005 + $0.25
    assert usd(small) == "0.255"
    large = price(table, "claude-haiku-5-5", Usage(input_tokens=1_000_000, output_tokens=1_000_000),
                  NOV, service_tier="batch")
    # 1,000,000 x $0.25 + 1,000,000 x $1.25
    assert usd(large) == "1.5"


@pytest.mark.parametrize(("at", "expected"), [
    # 1,234,567 x $0.20 / MTok = $0.2469134
    (dt.datetime(2026, 10, 6, 23, 59, 59, 999_999, tzinfo=dt.UTC), "0.2469134"),
    # 1,234,567 x $0.10 / MTok = $0.1234567
    (dt.datetime(2026, 10, 7, 0, 0, tzinfo=dt.UTC), "0.1234567"),
    # 01:30 in UTC+2 is still 2026-10-06 23:30 UTC: the old price
    (dt.datetime(2026, 10, 7, 1, 30, tzinfo=dt.timezone(dt.timedelta(hours=2))), "0.2469134"),
    (NOV, "0.1234567"),
])
def test_sonnet_5_5_cache_read_price_change_on_2026_10_07(table: RateTable, at: dt.datetime,
                                                          expected: str) -> None:
    """Sonnet 5.5 cache reads cost $0.20 / MTok before 2026-10-07 00:00 UTC, $0.10 from it."""
    cost = price(table, "claude-sonnet-5-5", Usage(cache_read_tokens=1_234_567), at)
    assert usd(cost) == expected


def test_sonnet_5_5_price_change_leaves_other_meters_alone(table: RateTable) -> None:
    """The dated change touches only cache reads: input, output and writes keep their prices."""
    usage = Usage(input_tokens=1_000, output_tokens=1_000, cache_write_5m_tokens=1_000,
                  cache_write_1h_tokens=1_000)
    before = price(table, "claude-sonnet-5-5", usage, dt.datetime(2026, 10, 1, tzinfo=dt.UTC))
    after = price(table, "claude-sonnet-5-5", usage, NOV)
    # 1,000 x ($2 + $10 + $2.50 + $4) / MTok = $0.0185
    assert usd(before) == usd(after) == "0.0185"


def test_fast_mode_doubles_every_opus_5_5_meter(table: RateTable) -> None:
    """Fast mode on Opus 5.5 is 2x on input, output and cache meters."""
    usage = Usage(input_tokens=12_345, output_tokens=6_789, cache_read_tokens=1_000,
                  cache_write_1h_tokens=500)
    #   input    12,345 x $4    = $0.04938
    #   output    6,789 x $20   = $0.13578
    #   1h write    500 x $8    = $0.004
    #   read      1,000 x $0.20 = $0.0002       standard $0.18936, fast x2 = $0.37872
    standard = price(table, "claude-opus-5-5", usage, NOV)
    fast = price(table, "claude-opus-5-5", usage, NOV, speed="fast")
    assert usd(standard) == "0.18936"
    assert usd(fast) == "0.37872"
    assert fast.modifiers == ("fast 2x",)


def test_geo_us_is_1_1x_on_opus_5_5(table: RateTable) -> None:
    """US-only inference costs 1.1x on a model released after 2026-02-05."""
    usage = Usage(input_tokens=10_000, output_tokens=1_000)
    # 10,000 x $4 + 1,000 x $20 = $0.04 + $0.02 = $0.06; x 1.1 = $0.066
    cost = price(table, "claude-opus-5-5", usage, NOV, geo="us")
    assert usd(cost) == "0.066"
    assert cost.modifiers == ("geo us 1.1x",)


def test_geo_us_is_standard_on_opus_4_5(table: RateTable) -> None:
    """Opus 4.5 (released 2025-11-24) is not under the geo rule: standard price."""
    usage = Usage(input_tokens=10_000, output_tokens=1_000)
    # 10,000 x $5 + 1,000 x $25 = $0.05 + $0.025 = $0.075
    cost = price(table, "claude-opus-4-5", usage, NOV, geo="us")
    assert usd(cost) == "0.075"
    assert cost.modifiers == ()


@pytest.mark.parametrize(("model", "factor_applies"), [
    ("claude-opus-4-6", True),     # released 2026-02-05: the first one
    ("claude-sonnet-4-6", True),   # 2026-02-17
    ("claude-haiku-5-5", True),
    ("claude-fable-5-2", True),
    ("claude-haiku-4-5", False),   # 2025-10-01
    ("claude-sonnet-4-5", False),  # 2025-09-29
])
def test_geo_rule_follows_release_dates(table: RateTable, model: str,
                                        factor_applies: bool) -> None:
    """The geo multiplier covers Opus 4.6, Sonnet 4.6 and later, not 4.5 and earlier."""
    usage = Usage(input_tokens=1_000_000)
    standard = price(table, model, usage, NOV)
    us = price(table, model, usage, NOV, geo="us")
    assert us.atto * 10 == standard.atto * (11 if factor_applies else 10)


def test_batch_fast_and_geo_multiply(table: RateTable) -> None:
    """Modifiers combine by multiplication: 0.5 x 2 x 1.1 on Opus 5.5."""
    usage = Usage(input_tokens=10_000, output_tokens=1_000)
    # $0.06 x 0.5 x 2 x 1.1 = $0.066
    cost = price(table, "claude-opus-5-5", usage, NOV, service_tier="batch", speed="fast",
                 geo="us")
    assert usd(cost) == "0.066"
    assert cost.modifiers == ("batch 50% off", "fast 2x", "geo us 1.1x")


def test_web_search_fee_at_standard_price(table: RateTable) -> None:
    """Web searches cost $10 per 1,000, on top of tokens, untouched by batch."""
    usage = Usage(input_tokens=1_000, web_search_requests=7, web_fetch_requests=5)
    # input 1,000 x $4 / MTok = $0.004; 7 searches x $10 / 1,000 = $0.07; fetches $0
    cost = price(table, "claude-opus-5-5", usage, NOV)
    assert usd(cost) == "0.074"
    assert [(ln.meter, f"{ln.usd:f}") for ln in cost.lines] == [
        ("input", "0.004"), ("tool:web_search", "0.07"), ("tool:web_fetch", "0")]
    batch = price(table, "claude-opus-5-5", usage, NOV, service_tier="batch")
    # input halved to $0.002; the search fee stays $0.07
    assert usd(batch) == "0.072"


def test_code_execution_with_the_free_allowance_partly_used(table: RateTable) -> None:
    """Only the time beyond the org's remaining free hours is charged ($0.05 / hour)."""
    usage = Usage(code_execution_seconds=5_400)  # 1.5 hours
    # half an hour of the 1,550 free hours is left: 5,400 - 1,800 = 3,600 s = 1 hour = $0.05
    cost = price(table, "claude-opus-5-5", usage, NOV,
                 free_remaining={"code_execution": 1_800})
    assert usd(cost) == "0.05"
    (line,) = cost.lines
    assert (line.meter, line.quantity, line.free) == ("tool:code_execution", 5_400, 1_800)


def test_code_execution_fully_free_and_fully_charged(table: RateTable) -> None:
    """Within the allowance code execution is free; with none left every second counts."""
    usage = Usage(code_execution_seconds=100)
    free = price(table, "claude-opus-5-5", usage, NOV, free_remaining={"code_execution": 10**9})
    assert usd(free) == "0"
    # 100 s x $0.05 / 3,600 s = $0.00138888...; the line is rounded up to the atto-USD
    charged = price(table, "claude-opus-5-5", usage, NOV, free_remaining={"code_execution": 0})
    assert usd(charged) == "0.001388888888888889"
    assert charged.nanos == 1_388_889


def test_the_allowance_is_1550_hours(table: RateTable) -> None:
    """The table's code-execution allowance is 1,550 hours, counted in seconds."""
    assert table.tools["code_execution"].free_per_month == 1_550 * 3_600


@pytest.mark.parametrize(("alias", "model"), [
    ("claude-haiku-4-5-20251001", "claude-haiku-4-5"),
    ("claude-3-5-haiku-latest", "claude-3-5-haiku-20241022"),
    ("claude-opus-4-20250514", "claude-opus-4-0"),
])
def test_alias_prices_as_its_model(table: RateTable, alias: str, model: str) -> None:
    """A dated id or alias is priced as the model it names (and reported by that name)."""
    usage = Usage(input_tokens=1_000_000, output_tokens=100_000)
    by_alias = price(table, alias, usage, NOV)
    assert by_alias.model == model
    assert by_alias.atto == price(table, model, usage, NOV).atto


def test_haiku_4_5_dated_id(table: RateTable) -> None:
    """claude-haiku-4-5-20251001: 1M input at $1 plus 100k output at $5 = $1.50."""
    cost = price(table, "claude-haiku-4-5-20251001",
                 Usage(input_tokens=1_000_000, output_tokens=100_000), NOV)
    assert usd(cost) == "1.5"


def test_enforcement_cost_rounds_a_fractional_nano_up(table: RateTable) -> None:
    """The exact cost keeps fractions of a nano-USD; enforcement rounds up to the next one."""
    # 3 x $0.125 / MTok x 0.5 (batch) x 1.1 (geo) = $0.00000020625 = 206.25 nano-USD
    cost = price(table, "claude-haiku-5-5", Usage(cache_write_5m_tokens=3), NOV,
                 service_tier="batch", geo="us")
    assert usd(cost) == "0.00000020625"
    assert cost.atto == 206_250_000_000
    assert cost.nanos == 207


def test_enforcement_cost_of_a_whole_nano_is_not_rounded(table: RateTable) -> None:
    """A cost that is a whole number of nano-USD is enforced as is."""
    # 1 x $4 / MTok = $0.000004 = 4,000 nano-USD
    cost = price(table, "claude-opus-5-5", Usage(input_tokens=1), NOV)
    assert (usd(cost), cost.nanos) == ("0.000004", 4_000)


def test_sonnet_4_5_historical_long_context_tier(table: RateTable) -> None:
    """Sonnet 4.5 over 200K prompt tokens: $6 in / $22.50 out for the whole request."""
    over = price(table, "claude-sonnet-4-5",
                 Usage(input_tokens=200_001, output_tokens=1_000), NOV)
    # 200,001 x $6 = $1.200006; 1,000 x $22.50 = $0.0225   total $1.222506
    assert usd(over) == "1.222506"
    at = price(table, "claude-sonnet-4-5", Usage(input_tokens=200_000, output_tokens=1_000), NOV)
    # 200,000 x $3 = $0.60; 1,000 x $15 = $0.015   total $0.615
    assert usd(at) == "0.615"


def test_fable_5_1_cache_read_is_0_025x(table: RateTable) -> None:
    """Fable 5.1 cache reads cost $0.25 / MTok (0.025x its $10 input)."""
    cost = price(table, "claude-fable-5-1", Usage(cache_read_tokens=1_000_000), NOV)
    assert usd(cost) == "0.25"


def test_unknown_model_is_unpriced(table: RateTable) -> None:
    """A model the table does not know (no fallback) gives an unpriced, zero cost."""
    cost = price(table, "claude-opus-9", Usage(input_tokens=1_000), NOV)
    assert (cost.priced, cost.atto, cost.nanos, cost.lines) == (False, 0, 0, ())
