"""Acceptance: a month of traffic through the real sidecar; every figure agrees exactly.

One sidecar (``create_server`` on 127.0.0.1:0, metrics on a free port, a
temporary LMDB) receives a few thousand Authorize/Record calls over gRPC,
spread over the current month (the metrics describe the current month), across
users, two models, standard and batch tiers and a price change on the 15th.
The invoice, GetUsage, the usage report and the scraped metrics must equal an
independent recomputation from the raw requests (``_e2e_support``), and
reconcile must find exactly the differences planted in a provider report and
in a stale Prometheus.
"""

from __future__ import annotations

import csv
import datetime as dt
import http.server
import json
import os
import shutil
import subprocess
import sys
import threading
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from _e2e_support import (
    ORG,
    POLICY,
    TYPES,
    Sent,
    World,
    expected_invoice_total,
    expected_lines,
    expected_spend,
    free_port,
    month_of,
    request_nanos,
    scrape_spend,
    traffic,
)
from _money_support import ROOT

from policy.compile import load
from sidecar.client import SpendKeeperClient, money_to_decimal
from sidecar.config import load_config
from sidecar.invoice import build_invoice
from sidecar.ledger.views import usage_report
from sidecar.reconcile import reconcile
from sidecar.server import create_server

pytestmark = pytest.mark.slow
REQUESTS = 2400


def usd(nanos: int) -> Decimal:
    return Decimal(nanos).scaleb(-9)


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    """The sidecar after a month of traffic (shared by this module's tests)."""
    now = dt.datetime.now(dt.UTC)
    _, _, end, _ = month_of(now)
    if end - now < dt.timedelta(minutes=3):  # the metrics' month must not turn mid-test
        time.sleep((end - now).total_seconds() + 1)
        now = dt.datetime.now(dt.UTC)
    period, start, end, mid = month_of(now)
    root = tmp_path_factory.mktemp("e2e")
    policy_path = root / "policy" / "acme.spend"
    policy_path.parent.mkdir()
    policy_path.write_text(POLICY.format(mid=mid.date().isoformat()), encoding="utf-8")
    metrics_port = free_port()
    config = load_config({"policy": str(policy_path), "data_dir": str(root / "data"),
                          "listen": "127.0.0.1:0", "metrics_listen": f"127.0.0.1:{metrics_port}",
                          "watch": False, "notify": False}, env={})
    sidecar, port = create_server(config)
    sidecar.start()
    world = World(sidecar, f"127.0.0.1:{port}", f"http://127.0.0.1:{metrics_port}/metrics",
                  policy_path, root / "data", period, mid)
    try:
        requests = traffic(REQUESTS, start, end, seed=20261128)
        costs = world.send(requests)
        world.extra["costs"] = dict(zip((s.request_id for s in requests), costs, strict=True))
        yield world
    finally:
        sidecar.stop(1.0)


def test_the_traffic_covers_the_cases(world: World) -> None:
    """Both sides of the price change, both tiers, both models, every user."""
    sent = world.sent
    assert len(sent) >= REQUESTS
    assert {s.at >= world.mid for s in sent} == {True, False}
    assert {s.tier for s in sent} == {"batch", "standard"}
    assert {s.model for s in sent} == {"alpha", "beta"}
    assert {s.user for s in sent} == set(TYPES)


def test_each_record_costs_the_price_rounded_up_to_the_nano(world: World) -> None:
    """Record's answer equals our own price of the request, rounded up to the nano-USD."""
    costs = world.extra["costs"]
    for s in world.sent:
        if s.request_id in costs:
            assert costs[s.request_id] == usd(request_nanos(s, world.mid)), s


def test_the_ledger_and_get_usage_agree_exactly(world: World) -> None:
    """GetUsage over gRPC and usage_report: the sums of the per-request costs, to the nano."""
    expected = expected_spend(world.sent, world.mid)
    policy = world.sidecar.holder.policy
    report = usage_report(world.sidecar.ledger, policy, policy.orgs[ORG], world.period)
    got = {(line.level, line.scope): line.spent
           for line in (report.org_line, *report.types, *report.users)}
    assert got == expected
    with SpendKeeperClient(world.target, timeout=10.0) as client:
        resp = client.usage(ORG, world.period, page_size=100)
    assert money_to_decimal(resp.org.spent) == usd(expected[("org", ORG)])
    assert {t.scope: money_to_decimal(t.spent) for t in resp.user_types} == {
        name: usd(expected[("user_type", name)]) for name in ("chat", "chat_code")}
    assert {u.scope: money_to_decimal(u.spent) for u in resp.users} == {
        user: usd(expected[("user", user)]) for user in TYPES}
    assert sum(u.requests for u in resp.users) == len(world.sent)


def test_the_scraped_metrics_agree_exactly(world: World) -> None:
    """``spendkeeper_spend_usd`` renders each exact nano-USD figure without loss."""
    expected = expected_spend(world.sent, world.mid)
    scraped = scrape_spend(world.metrics_url)
    for key in (("org", ORG), ("user_type", "chat"), ("user_type", "chat_code")):
        assert Decimal(scraped[key]) == usd(expected[key]), key


def test_the_invoice_agrees_exactly(world: World) -> None:
    """Every price line and total equals our own per-line, half-up arithmetic."""
    policy = world.sidecar.holder.policy
    inv = build_invoice(world.sidecar.ledger, policy, policy.orgs[ORG], world.period)
    got = {(u.user, u.model, u.meter, u.unit_usd.normalize(), u.label): (u.quantity, u.amount)
           for u in inv.usage}
    assert got == expected_lines(world.sent, world.mid)
    usage_total, total = expected_invoice_total(world.sent, world.mid)
    assert (inv.subtotal("usage"), inv.total) == (usage_total, total)
    # Per-line rounding is not per-request rounding: the test would be weak if they agreed.
    per_request = sum((usd(request_nanos(s, world.mid)).quantize(Decimal("0.01"))
                       for s in world.sent), Decimal(0))
    assert per_request != usage_total
    # The cache_write_1h price did not change on the 15th: one line spans the change.
    spans = {(u.user, u.model) for u in inv.usage if u.meter == "cache_write_1h"
             and u.model == "alpha" and u.label == "standard"}
    assert spans
    # The same invoice through the CLI, in another process (LMDB is shared safely).
    out = subprocess.run(
        [sys.executable, "-m", "sidecar.cli", "invoice", "--data-dir", str(world.data_dir),
         "--policy", str(world.policy_path), "--org", ORG, "--period", world.period,
         "--format", "json"], capture_output=True, text=True, check=True, cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=60)
    data = json.loads(out.stdout)
    assert Decimal(data["totals"]["total_usd"]) == total
    assert Decimal(data["totals"]["usage_usd"]) == usage_total


def provider_row(s: Sent) -> dict[str, Any]:
    """A request in the provider's usage-report field names."""
    u = s.usage
    return {"request_id": s.request_id, "user": s.user, "model": s.model,
            "input_tokens": u["input_tokens"], "output_tokens": u["output_tokens"],
            "cache_creation.ephemeral_5m_input_tokens": u.get("cache_write_5m_tokens", 0),
            "cache_creation.ephemeral_1h_input_tokens": u.get("cache_write_1h_tokens", 0),
            "cache_read_input_tokens": u.get("cache_read_tokens", 0),
            "server_tool_use.web_search_requests": u.get("web_search_requests", 0),
            "service_tier": s.tier, "timestamp": s.at.isoformat()}


def test_reconcile_lists_the_planted_provider_differences(world: World, tmp_path: Path) -> None:
    """One request missing from the report, one token mismatch, one the ledger never saw."""
    rows = [provider_row(s) for s in world.sent]
    dropped = rows.pop(17)
    rows[42]["output_tokens"] += 7
    phantom = {**rows[5], "request_id": "never-recorded"}
    rows.append(phantom)
    path = tmp_path / "provider.csv"
    with path.open("w", encoding="utf-8", newline="") as handle:
        writer = csv.DictWriter(handle, list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    policy = world.sidecar.holder.policy
    result = reconcile(world.sidecar.ledger, policy, policy.orgs[ORG], world.period, report=path)
    got = sorted((d.kind, d.request_id, d.field, d.ledger, d.other) for d in result.differences)
    out = rows[42]["output_tokens"]
    assert got == [
        ("missing_in_ledger", "never-recorded", "", "", ""),
        ("missing_in_report", dropped["request_id"], "", "", ""),
        ("tokens", rows[42]["request_id"], "output_tokens", str(out - 7), str(out)),
    ]
    assert result.checked["report_lines"] == len(world.sent)
    assert result.unpriced == []


class _Proxy(http.server.ThreadingHTTPServer):
    """Forwards Prometheus's scrapes to the sidecar, or replays a frozen copy."""

    upstream: str
    frozen: bytes | None = None


class _Forward(http.server.BaseHTTPRequestHandler):
    server: _Proxy

    def do_GET(self) -> None:
        body = self.server.frozen
        if body is None:
            with urllib.request.urlopen(self.server.upstream, timeout=5) as response:
                body = response.read()
        self.send_response(200)
        self.send_header("Content-Type", "text/plain; version=0.0.4; charset=utf-8")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: Any) -> None:
        pass


def _query(base: str, query: str) -> list[dict[str, Any]]:
    url = f"{base}/api/v1/query?{urllib.parse.urlencode({'query': query})}"
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            result: list[dict[str, Any]] = json.loads(response.read())["data"]["result"]
            return result
    except OSError:
        return []


def _wait_for(base: str, nanos: int, log: Path, timeout: float = 40.0) -> None:
    """Until Prometheus's org spend equals ``nanos`` (it has scraped the current value)."""
    deadline = time.monotonic() + timeout
    query = f'spendkeeper_spend_usd{{org="{ORG}",level="org"}}'
    while time.monotonic() < deadline:
        found = _query(base, query)
        if found and Decimal(found[0]["value"][1]) == usd(nanos):
            return
        time.sleep(0.2)
    pytest.fail(f"Prometheus never showed {usd(nanos)}: {_query(base, query)}\n"
                + log.read_text(encoding="utf-8")[-3000:])


@pytest.fixture
def prometheus(world: World, tmp_path: Path) -> Iterator[tuple[str, _Proxy, Path]]:
    """A real Prometheus on loopback scraping the sidecar every second through a proxy."""
    binary = shutil.which("prometheus") or ("/usr/bin/prometheus"
                                            if Path("/usr/bin/prometheus").exists() else None)
    if binary is None:
        pytest.skip("prometheus is not installed (apt-get install prometheus)")
    proxy = _Proxy(("127.0.0.1", 0), _Forward)
    proxy.upstream = world.metrics_url
    threading.Thread(target=proxy.serve_forever, daemon=True).start()
    config = tmp_path / "prometheus.yml"
    config.write_text(
        "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n"
        "scrape_configs:\n  - job_name: spendkeeper\n    static_configs:\n"
        f"      - targets: ['127.0.0.1:{proxy.server_address[1]}']\n", encoding="utf-8")
    port = free_port()
    log = tmp_path / "prometheus.log"
    with log.open("w", encoding="utf-8") as handle:
        process = subprocess.Popen(
            [binary, f"--config.file={config}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
             f"--web.listen-address=127.0.0.1:{port}", "--log.level=warn"],
            stdout=handle, stderr=subprocess.STDOUT, cwd=tmp_path)
    try:
        yield f"http://127.0.0.1:{port}", proxy, log
    finally:
        process.terminate()
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        proxy.shutdown()
        proxy.server_close()


def test_reconcile_against_a_real_prometheus(world: World,
                                             prometheus: tuple[str, _Proxy, Path]) -> None:
    """No difference once scraped; a stale value is reported, then agreement again."""
    base, proxy, log = prometheus
    policy = world.sidecar.holder.policy
    org = policy.orgs[ORG]
    _wait_for(base, expected_spend(world.sent, world.mid)[("org", ORG)], log)
    clean = reconcile(world.sidecar.ledger, policy, org, world.period, prometheus=base)
    assert clean.differences == []
    assert clean.checked["prometheus_series"] == 3
    assert any("within 0.000001 USD" in note for note in clean.notes)
    cli = subprocess.run(
        [sys.executable, "-m", "sidecar.cli", "reconcile", "--data-dir", str(world.data_dir),
         "--policy", str(world.policy_path), "--org", ORG, "--period", world.period,
         "--prometheus", base], check=False, capture_output=True, text=True, cwd=ROOT,
        timeout=60,
        env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert cli.returncode == 0, cli.stdout + cli.stderr
    assert "Result: no differences" in cli.stdout

    # Freeze what Prometheus sees, then spend more: its figures are now stale.
    before = expected_spend(world.sent, world.mid)
    with urllib.request.urlopen(world.metrics_url, timeout=10) as response:
        proxy.frozen = response.read()
    _, start, end, _ = month_of(dt.datetime.now(dt.UTC))
    more = [Sent(s.request_id, "u2", s.model, s.tier, s.at, s.usage)
            for s in traffic(20, start, end, seed=7, prefix="late-scrape")]
    world.send(more)
    after = expected_spend(world.sent, world.mid)
    time.sleep(1.5)  # at least one more scrape, of the frozen figures
    stale = reconcile(world.sidecar.ledger, policy, org, world.period, prometheus=base)
    assert sorted((d.kind, d.field, Decimal(d.ledger), Decimal(d.other))
                  for d in stale.differences) == [
        ("value", "org acme", usd(after[("org", ORG)]), usd(before[("org", ORG)])),
        ("value", "user_type chat_code", usd(after[("user_type", "chat_code")]),
         usd(before[("user_type", "chat_code")])),
    ]

    proxy.frozen = None
    _wait_for(base, after[("org", ORG)], log)
    assert reconcile(world.sidecar.ledger, policy, org, world.period,
                     prometheus=base).differences == []


def test_the_policy_under_test_has_the_price_change(world: World) -> None:
    """The rate table really changes alpha's prices on the 15th (and not cache_write_1h)."""
    policy = load(world.policy_path)
    alpha = policy.rate_tables["t"].models["alpha"]
    assert [p.start for p in alpha.periods] == [None, world.mid]
    assert alpha.periods[0].base.usd_per_mtok[3] == alpha.periods[1].base.usd_per_mtok[3]
