"""Reconciliation against provider reports (CSV, JSON lines) and Prometheus figures."""

from __future__ import annotations

import csv
import datetime as dt
import json
from pathlib import Path
from typing import Any

import pytest
from _money_support import PERIOD, FakeClock, request

from policy.model import Policy
from sidecar.ledger import Ledger
from sidecar.reconcile import (
    Difference,
    ReconcileError,
    compare_prometheus,
    read_report,
    reconcile,
    render_text,
)

NOV3 = dt.datetime(2026, 11, 3, 9, 30, tzinfo=dt.UTC)
COLUMNS = ("request_id", "user", "model", "input_tokens", "output_tokens",
           "cache_creation.ephemeral_5m_input_tokens", "cache_creation.ephemeral_1h_input_tokens",
           "cache_read_input_tokens", "server_tool_use.web_search_requests", "service_tier",
           "timestamp")


def write_csv(path: Path, rows: list[dict[str, Any]]) -> Path:
    with path.open("w", encoding="utf-8", newline="") as handle:
        writer = csv.DictWriter(handle, COLUMNS)
        writer.writeheader()
        for row in rows:
            writer.writerow({"timestamp": NOV3.isoformat().replace("+00:00", "Z"),
                             "service_tier": "standard", **row})
    return path


def run(ledger: Ledger, policy: Policy, report: Path | None = None,
        period: str = PERIOD, prometheus: str | None = None) -> list[tuple[str, ...]]:
    result = reconcile(ledger, policy, policy.orgs["acme"], period, report=report,
                       prometheus=prometheus)
    return sorted((d.kind, d.request_id, d.field, d.ledger, d.other) for d in result.differences)


@pytest.fixture
def traffic(ledger: Ledger, policy: Policy) -> Ledger:
    """Four requests on 3 November: tokens of every meter, a tool, a batch request."""
    ledger.record(policy, request("r1", "alice", "m", at=NOV3, input_tokens=100,
                                  output_tokens=50))
    ledger.record(policy, request("r2", "bob", "five", at=NOV3, input_tokens=10,
                                  output_tokens=900, cache_read_tokens=5000))
    ledger.record(policy, request("r3", "bob", "m", at=NOV3, input_tokens=7))
    ledger.record(policy, request("r4", "carol", "m", at=NOV3, tier="batch", input_tokens=3,
                                  cache_write_5m_tokens=40, cache_write_1h_tokens=60,
                                  web_search_requests=2))
    return ledger


def test_every_difference_with_the_provider_report_is_listed(
        traffic: Ledger, policy: Policy, tmp_path: Path) -> None:
    """Missing on either side, a token mismatch and a duplicate line; matches are silent."""
    report = write_csv(tmp_path / "report.csv", [
        {"request_id": "r1", "user": "alice", "model": "m", "input_tokens": 100,
         "output_tokens": 50},
        {"request_id": "r2", "user": "bob", "model": "five", "input_tokens": 10,
         "output_tokens": 901, "cache_read_input_tokens": 5000},
        # r3 is missing from the report
        {"request_id": "r4", "user": "carol", "model": "m", "input_tokens": 3,
         "cache_creation.ephemeral_5m_input_tokens": 40,
         "cache_creation.ephemeral_1h_input_tokens": 60,
         "server_tool_use.web_search_requests": 2, "service_tier": "batch"},
        {"request_id": "r9", "user": "dave", "model": "m", "input_tokens": 1},
        {"request_id": "r9", "user": "dave", "model": "m", "input_tokens": 1},
        {"request_id": "old", "user": "dave", "model": "m", "input_tokens": 1,
         "timestamp": "2026-10-31T23:59:59Z"},  # another month: not this reconcile's
    ])
    result = reconcile(traffic, policy, policy.orgs["acme"], PERIOD, report=report)
    assert sorted((d.kind, d.request_id, d.field, d.ledger, d.other)
                  for d in result.differences) == [
        ("duplicate_in_report", "r9", "", "", ""),
        ("missing_in_ledger", "r9", "", "", ""),
        ("missing_in_report", "r3", "", "", ""),
        ("tokens", "r2", "output_tokens", "900", "901"),
    ]
    assert result.checked == {"ledger_records": 4, "report_lines": 6,
                              "report_lines_outside_period": 1, "unpriced_records": 0}
    (r2,) = [d for d in result.differences if d.request_id == "r2"]
    assert (r2.user, r2.model, r2.day) == ("bob", "five", "2026-11-03")
    data = result.to_json()
    assert {"user": "bob", "model": "five", "day": "2026-11-03", "differences": 1,
            "net_tokens": {"output_tokens": 1}} in data["groups"]
    text = render_text(result)
    assert "missing_in_report" in text
    assert "Result: 4 difference(s)" in text


def test_json_lines_with_nested_usage_and_aliases(traffic: Ledger, policy: Policy,
                                                  tmp_path: Path) -> None:
    """The Messages API's nested ``usage`` object; an alias names the same model."""
    lines = [
        {"id": "r1", "model": "m", "user": "alice", "timestamp": NOV3.isoformat(),
         "usage": {"input_tokens": 100, "output_tokens": 50, "cache_creation_input_tokens": 0,
                   "cache_read_input_tokens": 0}},
        {"id": "r2", "model": "five-latest", "user": "bob", "timestamp": NOV3.timestamp(),
         "usage": {"input_tokens": 10, "output_tokens": 900, "cache_read_input_tokens": 5000}},
        {"id": "r3", "model": "five", "user": "bob", "timestamp": NOV3.isoformat(),
         "usage": {"input_tokens": 7}},
        {"id": "r4", "model": "m", "user": "dave", "service_tier": "standard",
         "timestamp": NOV3.isoformat(),
         "usage": {"input_tokens": 3, "cache_creation": {"ephemeral_5m_input_tokens": 40,
                                                         "ephemeral_1h_input_tokens": 6},
                   "server_tool_use": {"web_search_requests": 2}}},
    ]
    path = tmp_path / "report.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in lines), encoding="utf-8")
    assert run(traffic, policy, path) == [
        ("model", "r3", "model", "m", "five"),
        ("service_tier", "r4", "service_tier", "batch", "standard"),
        ("tokens", "r4", "cache_write_1h_tokens", "60", "6"),
        ("user", "r4", "user", "carol", "dave"),
    ]


def test_a_json_array_and_a_byte_order_mark_are_read(traffic: Ledger, policy: Policy,
                                                     tmp_path: Path) -> None:
    """A ``.json`` array of requests; a CSV exported with a BOM."""
    array = tmp_path / "report.json"
    array.write_text(json.dumps([{"id": "r3", "usage": {"input_tokens": 8}}]), encoding="utf-8")
    assert [d for d in run(traffic, policy, array) if d[0] == "tokens"] == [
        ("tokens", "r3", "input_tokens", "7", "8")]
    bom = tmp_path / "report.csv"
    bom.write_text("\ufeffrequest_id,input_tokens\nr3,7\n", encoding="utf-8")
    assert [d for d in run(traffic, policy, bom) if d[1] == "r3"] == []


def test_cache_writes_without_the_split_count_as_five_minute(traffic: Ledger, policy: Policy,
                                                             tmp_path: Path) -> None:
    """``cache_creation_input_tokens`` alone is the provider's default (5-minute) write."""
    path = tmp_path / "report.csv"
    path.write_text("id,cache_creation_input_tokens,input_tokens\nr4,40,3\n", encoding="utf-8")
    lines, meters = read_report(path)
    assert lines[0].usage["cache_write_5m_tokens"] == 40
    assert meters == {"cache_write_5m_tokens", "input_tokens"}
    # Only the columns the report has are compared: r4's 1h writes are not a difference.
    assert [d for d in run(traffic, policy, path) if d[1] == "r4"] == []


def test_late_usage_recorded_in_another_month_is_explained(
        ledger: Ledger, policy: Policy, clock: FakeClock, tmp_path: Path) -> None:
    """November usage that arrived after the grace window was counted in December."""
    clock.set(dt.datetime(2026, 12, 10, tzinfo=dt.UTC))
    ledger.record(policy, request("late", "bob", at=NOV3, input_tokens=5))
    report = write_csv(tmp_path / "nov.csv", [{"request_id": "late", "user": "bob",
                                                "model": "m", "input_tokens": 5}])
    result = reconcile(ledger, policy, policy.orgs["acme"], PERIOD, report=report)
    (diff,) = result.differences
    assert (diff.kind, diff.note) == ("other_period", "recorded in 2026-12 (late usage)")
    december = reconcile(ledger, policy, policy.orgs["acme"], "2026-12")
    assert december.differences == []  # no report given: only unpriced usage is checked
    empty = write_csv(tmp_path / "dec.csv", [])
    (missing,) = reconcile(ledger, policy, policy.orgs["acme"], "2026-12",
                           report=empty).differences
    assert missing.kind == "missing_in_report"
    assert "late usage from 2026-11" in missing.note


def test_unpriced_usage_is_reported(ledger: Ledger, policy: Policy) -> None:
    """Usage the rate table cannot price makes the run unclean even without differences."""
    ledger.record(policy, request("u1", "bob", "mystery", at=NOV3, input_tokens=5))
    result = reconcile(ledger, policy, policy.orgs["acme"], PERIOD)
    assert result.differences == []
    assert not result.clean
    assert [(e["id"], e["model"]) for e in result.unpriced] == [("u1", "mystery")]
    assert "Unpriced usage" in render_text(result)


@pytest.mark.parametrize(("content", "message"), [
    ("request_id,input_tokens\nr1,12x\n", "report.csv:2: input_tokens is not a whole number"),
    ("request_id,input_tokens\nr1,-4\n", "report.csv:2: input_tokens is negative"),
    ("model,input_tokens\nm,4\n", "report.csv:2: no request_id"),
    ("request_id,timestamp\nr1,yesterday\n", "timestamp 'yesterday' is not ISO 8601"),
])
def test_a_bad_report_is_refused_with_its_line(ledger: Ledger, policy: Policy, tmp_path: Path,
                                               content: str, message: str) -> None:
    """Nothing is compared when the report cannot be read; the error names file and line."""
    path = tmp_path / "report.csv"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(ReconcileError, match=message):
        reconcile(ledger, policy, policy.orgs["acme"], PERIOD, report=path)


def series(level: str, scope: str, value: str, instance: str = "a:1") -> tuple[dict[str, str],
                                                                             str]:
    return {"org": "acme", "level": level, "scope": scope, "instance": instance}, value


def test_prometheus_values_are_compared_within_a_micro_dollar() -> None:
    """Float64 gauges against exact nano-USD: |difference| <= 1e-6 USD is agreement."""
    expected = {("org", "acme"): 12_345_678_901, ("user_type", "chat"): 5 * 10**9,
                ("user_type", "chat_code"): 0}
    diffs = compare_prometheus(expected, [
        series("org", "acme", "12.345679901"),  # exactly 1e-6 above: agrees
        series("user_type", "chat", "5.0000010001"),  # just over 1e-6: differs
        series("user_type", "gone", "1"),  # not in the ledger
    ], {("user", "alice"): 1})
    assert diffs == [
        Difference("prometheus", "value", field="user_type chat", ledger="5",
                   other="5.0000010001", note="scraped from a:1"),
        Difference("prometheus", "not_in_ledger", field="user_type gone", other="1",
                   note="series of a:1"),
        Difference("prometheus", "missing_in_prometheus", field="user_type chat_code",
                   ledger="0"),
    ]


def test_per_user_series_are_compared_when_exported() -> None:
    """With per-user metrics on, each user's gauge is checked and missing ones listed."""
    users = {("user", "alice"): 1_500_000_000, ("user", "bob"): 2}
    diffs = compare_prometheus({("org", "acme"): 1_500_000_002}, [
        series("org", "acme", "1.500000002"), series("user", "alice", "1.5")], users)
    # bob's 2 nano-USD are within the tolerance, but a missing series is always listed.
    assert [(d.kind, d.field) for d in diffs] == [("missing_in_prometheus", "user bob")]


def test_prometheus_is_only_compared_for_the_current_month(ledger: Ledger,
                                                          policy: Policy) -> None:
    """The gauges describe the current month: another month is not queried, and says so."""
    result = reconcile(ledger, policy, policy.orgs["acme"], "2026-10",
                       prometheus="http://127.0.0.1:9")
    assert result.differences == []
    assert any("current month (2026-11) only" in note for note in result.notes)


def test_an_unreachable_prometheus_is_an_error(ledger: Ledger, policy: Policy) -> None:
    """No silent pass: a query that fails stops the run."""
    with pytest.raises(ReconcileError, match="cannot query Prometheus"):
        reconcile(ledger, policy, policy.orgs["acme"], PERIOD, prometheus="http://127.0.0.1:9")
    with pytest.raises(ReconcileError, match="http"):
        reconcile(ledger, policy, policy.orgs["acme"], PERIOD, prometheus="file:///etc/passwd")
