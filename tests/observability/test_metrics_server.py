"""Metrics scraped from a real sidecar's /metrics after real gRPC calls."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
from _obs_support import (
    USD,
    Running,
    StartSidecar,
    parse,
    scrape,
    scrape_text,
    series,
    value,
    wait_for,
)

from sidecar.client import InvalidRequest
from sidecar.ledger import outbox

#: Alice's record: 200,000 input tokens ($0.20) and 10,000 output tokens ($0.02).
ALICE_NANOS = 220_000_000
#: The ledger-backed families (those a restart must not reset).
LEDGER_FAMILIES = ("spendkeeper_spend_usd", "spendkeeper_spend_nano_usd",
                   "spendkeeper_reserved_usd", "spendkeeper_limit_usd",
                   "spendkeeper_ledger_conservation_drift_nano_usd",
                   "spendkeeper_reservations_outstanding")


def traffic(run: Running) -> None:
    """Allowed, denied, unknown-org, duplicate, released, outstanding and invalid calls."""
    with run.client() as c:
        assert c.authorize("a1", "acme", "alice", "claude_code", "m1", input_tokens=200_000,
                           max_output_tokens=20_000).allowed
        c.record("a1", "acme", "alice", "claude_code", "m1", input_tokens=200_000,
                 output_tokens=10_000)
        assert c.record("a1", "acme", "alice", "claude_code", "m1", input_tokens=200_000,
                        output_tokens=10_000).duplicate
        denied = c.authorize("b1", "acme", "bob", "claude_code", "m1", input_tokens=10,
                             max_output_tokens=10)
        assert denied.reason == "PRODUCT_NOT_ENTITLED"
        assert c.authorize("x1", "nobody-knows", "u", "chat", "m1", input_tokens=10,
                           max_output_tokens=10).reason == "UNKNOWN_ORG"
        assert c.authorize("b2", "acme", "bob", "chat", "m1", input_tokens=1000,
                           max_output_tokens=1000).allowed  # held: $0.003
        assert c.authorize("b3", "acme", "bob", "chat", "m1", input_tokens=1000,
                           max_output_tokens=1000).allowed
        assert c.release("b3")
        c.record("z1", "beta", "zed", "chat", "m1", input_tokens=1000, output_tokens=0)
        c.record("x2", "made-up-org", "u", "chat", "m1", input_tokens=5)  # stored unpriced
        assert not c.record("u1", "acme", "bob", "chat", "mystery", input_tokens=42).priced
        c.usage("acme")
        with pytest.raises(InvalidRequest):
            c.authorize("", "acme", "bob", "chat", "m1", input_tokens=1, max_output_tokens=1)


def test_scrape_after_rpcs_shows_decisions_usage_latency_and_ledger_figures(
        start_sidecar: StartSidecar) -> None:
    """Every per-call and ledger-backed family reflects the calls just made."""
    run = start_sidecar()
    traffic(run)
    s = scrape(run.metrics_port)
    dec = "spendkeeper_decisions_total"
    assert value(s, dec, org="acme", decision="allow", reason="WITHIN_LIMITS", shadow="false") == 3
    assert value(s, dec, org="acme", decision="deny", reason="PRODUCT_NOT_ENTITLED",
                 shadow="false") == 1
    assert value(s, dec, org="(unknown)", decision="deny", reason="UNKNOWN_ORG",
                 shadow="false") == 1
    assert value(s, "spendkeeper_records_total", org="acme", duplicate="false") == 2
    assert value(s, "spendkeeper_records_total", org="acme", duplicate="true") == 1
    assert value(s, "spendkeeper_records_total", org="(unknown)", duplicate="false") == 1
    assert not series(s, "spendkeeper_records_total", org="made-up-org")
    assert value(s, "spendkeeper_releases_total", released="true") == 1
    assert value(s, "spendkeeper_rpc_errors_total", rpc="Authorize", code="INVALID_ARGUMENT") == 1
    tok = "spendkeeper_tokens_total"
    assert value(s, tok, org="acme", model="m1", meter="input") == 200_000
    assert value(s, tok, org="acme", model="m1", meter="output") == 10_000
    assert value(s, tok, org="beta", model="m1", meter="input") == 1000
    assert value(s, tok, org="acme", model="(unpriced)", meter="input") == 42
    assert value(s, "spendkeeper_cost_usd_total", org="acme", model="(unpriced)",
                 meter="input") == 0
    assert value(s, "spendkeeper_cost_usd_total", org="acme", model="m1", meter="input") == 0.2
    assert value(s, "spendkeeper_cost_usd_total", org="acme", model="m1", meter="output") == 0.02
    # Latency: 6 Authorize answers plus the invalid one; +Inf bucket equals the count.
    hist = "spendkeeper_rpc_duration_seconds"
    assert value(s, hist + "_count", rpc="Authorize") == 6
    assert value(s, hist + "_bucket", rpc="Authorize", le="+Inf") == 6
    assert value(s, hist + "_count", rpc="Record") == 5
    assert value(s, hist + "_count", rpc="GetUsage") == 1
    assert value(s, hist + "_count", rpc="Release") == 1
    # Ledger figures, read at scrape time.
    acme_org = {"org": "acme", "level": "org", "scope": "acme"}
    assert value(s, "spendkeeper_spend_usd", **acme_org) == ALICE_NANOS / USD
    assert value(s, "spendkeeper_spend_nano_usd", **acme_org) == ALICE_NANOS
    assert value(s, "spendkeeper_spend_usd", org="acme", level="user", scope="alice") == 0.22
    assert value(s, "spendkeeper_spend_usd", org="acme", level="user_type",
                 scope="chat_code") == 0.22
    assert value(s, "spendkeeper_reserved_usd", **acme_org) == 0.003  # b2 still held
    assert value(s, "spendkeeper_reserved_usd", org="acme", level="user", scope="bob") == 0.003
    assert value(s, "spendkeeper_limit_usd", **acme_org) == 1.0
    assert value(s, "spendkeeper_limit_usd", org="acme", level="user_type", scope="chat") == 0.5
    assert value(s, "spendkeeper_limit_usd", org="acme", level="user", scope="alice") == 0.3
    assert value(s, "spendkeeper_limit_usd", org="acme", level="user", scope="bob") == 0.2
    assert value(s, "spendkeeper_spend_nano_usd", org="beta", level="org",
                 scope="beta") == 1_000_000
    assert value(s, "spendkeeper_reservations_outstanding") == 1
    assert value(s, "spendkeeper_ledger_conservation_drift_nano_usd", org="acme") == 0
    assert value(s, "spendkeeper_ledger_conservation_drift_nano_usd", org="beta") == 0
    version = run.sidecar.holder.policy.version
    assert value(s, "spendkeeper_policy_info", version=version) == 1
    used = value(s, "spendkeeper_ledger_used_bytes")
    size = value(s, "spendkeeper_ledger_map_size_bytes")
    assert used is not None
    assert size is not None
    assert 0 < used < size
    # Alice crossed 50 % of her $0.30: acme has no webhook, so it is logged.
    logged = wait_for(lambda: value(scrape(run.metrics_port),
                                    "spendkeeper_notification_deliveries_total",
                                    result="logged") == 1)
    assert logged
    assert value(scrape(run.metrics_port), "spendkeeper_notifications_pending") == 0
    [entry] = outbox.entries(run.sidecar.ledger)
    assert (entry["scope"], entry["threshold_percent"]) == ("acme/alice", "50")
    assert (entry["delivered"], entry["delivered_as"]) == (True, "logged")


def test_per_user_series_only_where_the_policy_or_config_enables_them(
        start_sidecar: StartSidecar, tmp_path: Path) -> None:
    """Acme says per_user_metrics, beta does not; config per_user_metrics turns them on for all."""
    run = start_sidecar()
    traffic(run)
    s = scrape(run.metrics_port)
    assert series(s, "spendkeeper_spend_usd", org="acme", level="user")
    assert not series(s, "spendkeeper_spend_usd", org="beta", level="user")
    run.stop()
    every = start_sidecar(data_dir=tmp_path / "data", per_user_metrics=True)
    s = scrape(every.metrics_port)
    assert value(s, "spendkeeper_spend_usd", org="beta", level="user", scope="zed") == 0.001


def test_spend_figures_survive_a_restart(start_sidecar: StartSidecar, tmp_path: Path) -> None:
    """A new process on the same ledger exports the same spend, reserved and limit figures."""
    first = start_sidecar()
    traffic(first)
    before = {k: v for k, v in scrape(first.metrics_port).items() if k[0] in LEDGER_FAMILIES}
    first.stop()
    second = start_sidecar(data_dir=tmp_path / "data")
    after_all = scrape(second.metrics_port)
    after = {k: v for k, v in after_all.items() if k[0] in LEDGER_FAMILIES}
    assert after == before
    assert value(after, "spendkeeper_spend_nano_usd", org="acme", level="org",
                 scope="acme") == ALICE_NANOS
    # The per-call counters are this process's own: they start again from zero.
    assert not series(after_all, "spendkeeper_decisions_total")


def test_reload_results_and_policy_version_are_exported(start_sidecar: StartSidecar,
                                                        policy_path: Path) -> None:
    """A rejected reload counts as error and keeps the old version; a good one swaps it."""
    run = start_sidecar()
    old = run.sidecar.holder.policy.version
    good = policy_path.read_text(encoding="utf-8")
    policy_path.write_text(good + '\norg "broken" { plan "nope" }\n', encoding="utf-8")
    assert not run.sidecar.reload()
    s = scrape(run.metrics_port)
    assert value(s, "spendkeeper_policy_reloads_total", result="error") == 1
    assert value(s, "spendkeeper_policy_reloads_total", result="ok") == 0
    assert series(s, "spendkeeper_policy_info") == {frozenset({("version", old)}): 1}
    policy_path.write_text(good.replace("limit $10 / month", "limit $20 / month"),
                           encoding="utf-8")
    assert run.sidecar.reload()
    new = run.sidecar.holder.policy.version
    assert new != old
    s = scrape(run.metrics_port)
    assert value(s, "spendkeeper_policy_reloads_total", result="ok") == 1
    assert series(s, "spendkeeper_policy_info") == {frozenset({("version", new)}): 1}
    assert value(s, "spendkeeper_limit_usd", org="beta", level="org", scope="beta") == 20.0


def test_promtool_check_metrics_accepts_a_real_scrape(start_sidecar: StartSidecar) -> None:
    """promtool's linter finds nothing wrong with the exposition (names, units, help)."""
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool not found: apt-get install prometheus")
    run = start_sidecar()
    traffic(run)
    text = scrape_text(run.metrics_port)
    assert parse(text)
    done = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True,
                          text=True, check=False, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.strip() == "", done.stdout
