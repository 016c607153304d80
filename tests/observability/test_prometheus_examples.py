"""The shipped Prometheus config, alert rules and Grafana dashboard, checked by real tools.

promtool checks and unit-tests the rules; a real ``prometheus`` process on
loopback scrapes a real sidecar, evaluates the rules and answers the
dashboard's queries.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from _obs_support import EXAMPLES, StartSidecar, free_port, scrape_text, wait_for
from prometheus_client.parser import text_string_to_metric_families

from sidecar.client import SpendKeeperClient

PROMETHEUS_DIR = EXAMPLES / "prometheus"
DASHBOARD = EXAMPLES / "grafana" / "dashboard.json"
_NAME = re.compile(r"\bspendkeeper_[a-z_]+[a-z]")


def _tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.skip(f"{name} not found: apt-get install prometheus")
    return path


def _promtool(*args: str, cwd: Path = PROMETHEUS_DIR) -> str:
    done = subprocess.run([_tool("promtool"), *args], cwd=cwd, capture_output=True, text=True,
                          check=False, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def _dashboard_exprs() -> list[str]:
    dashboard = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", ())]
    exprs += [v["definition"] for v in dashboard["templating"]["list"] if "definition" in v]
    return exprs


def test_promtool_check_rules_passes_on_the_alert_rules() -> None:
    """alerts.yml is valid (spec: `promtool check rules` passes)."""
    assert "SUCCESS" in _promtool("check", "rules", "alerts.yml")


def test_promtool_unit_tests_of_the_alert_rules_pass() -> None:
    """Every alert fires when it should and not before (alerts_test.yml)."""
    assert "SUCCESS" in _promtool("test", "rules", "alerts_test.yml")


def test_promtool_check_config_passes_on_the_scrape_config() -> None:
    """prometheus.yml (and the rule file it names) is valid."""
    assert "SUCCESS" in _promtool("check", "config", "prometheus.yml")


def test_rules_and_dashboard_name_only_metrics_the_sidecar_exports(
        start_sidecar: StartSidecar) -> None:
    """No alert or panel queries a metric name the sidecar does not expose."""
    run = start_sidecar()
    with run.client() as c:
        c.record("r1", "acme", "alice", "chat", "m1", input_tokens=10)
    exported = set()
    for family in text_string_to_metric_families(scrape_text(run.metrics_port)):
        suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count")}
        exported |= {family.name + s for s in suffixes.get(family.type, ("",))}
    used = set(_NAME.findall((PROMETHEUS_DIR / "alerts.yml").read_text(encoding="utf-8")))
    for expr in _dashboard_exprs():
        used |= set(_NAME.findall(expr))
    assert used, "no metric names found"
    assert used - exported == set()


def _get(port: int, path: str, **params: str) -> dict[str, Any]:
    url = f"http://127.0.0.1:{port}{path}"
    if params:
        url += "?" + urllib.parse.urlencode(params)
    with urllib.request.urlopen(url, timeout=10) as resp:
        answer: dict[str, Any] = json.loads(resp.read())
    return answer


@pytest.fixture
def prometheus(tmp_path: Path,
               start_sidecar: StartSidecar) -> Iterator[tuple[int, SpendKeeperClient]]:
    """A real prometheus on loopback scraping a real sidecar every second, with alerts.yml."""
    binary = _tool("prometheus")
    run = start_sidecar()
    workdir = tmp_path / "prometheus"
    workdir.mkdir()
    shutil.copy(PROMETHEUS_DIR / "alerts.yml", workdir / "alerts.yml")
    (workdir / "prometheus.yml").write_text(
        "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n"
        "rule_files:\n  - alerts.yml\n"
        "scrape_configs:\n  - job_name: spendkeeper\n    static_configs:\n"
        f"      - targets: ['127.0.0.1:{run.metrics_port}']\n", encoding="utf-8")
    port = free_port()
    log = (workdir / "prometheus.log").open("w", encoding="utf-8")
    process = subprocess.Popen(
        [binary, f"--config.file={workdir / 'prometheus.yml'}",
         f"--storage.tsdb.path={workdir / 'data'}", f"--web.listen-address=127.0.0.1:{port}"],
        stdout=log, stderr=subprocess.STDOUT, cwd=workdir)
    try:
        def ready() -> bool:
            if process.poll() is not None:
                raise AssertionError((workdir / "prometheus.log").read_text(encoding="utf-8"))
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/-/ready", timeout=2):
                    return True
            except OSError:
                return False

        wait_for(ready, timeout=60, interval=0.2)
        with run.client() as client:
            yield port, client
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        log.close()


def test_a_real_prometheus_scrapes_the_spend_and_evaluates_the_rules(
        prometheus: tuple[int, SpendKeeperClient]) -> None:
    """Prometheus sees the ledger's spend, the recording rule's ratio, and loads every rule."""
    port, client = prometheus
    client.record("r1", "acme", "alice", "claude_code", "m1", input_tokens=200_000,
                  output_tokens=10_000)  # $0.22 of acme's $1

    def spend() -> list[Any]:
        answer = _get(port, "/api/v1/query",
                      query='spendkeeper_spend_usd{org="acme",level="org",scope="acme"} > 0')
        result: list[Any] = answer["data"]["result"]
        return result

    result = wait_for(spend, timeout=60, interval=0.5)
    assert float(result[0]["value"][1]) == 0.22

    def ratio() -> list[Any]:
        answer = _get(port, "/api/v1/query",
                      query='spendkeeper:spend_limit_ratio{org="acme",level="org"} > 0')
        found: list[Any] = answer["data"]["result"]
        return found

    assert float(wait_for(ratio, timeout=60, interval=0.5)[0]["value"][1]) == 0.22
    groups = _get(port, "/api/v1/rules")["data"]["groups"]
    rules = [rule for group in groups for rule in group["rules"]]
    assert len(rules) == 8
    assert all(rule["health"] in ("ok", "unknown") for rule in rules), rules
    up = _get(port, "/api/v1/query", query='up{job="spendkeeper"}')["data"]["result"]
    assert up[0]["value"][1] == "1"


def test_every_dashboard_query_runs_on_a_real_prometheus(
        prometheus: tuple[int, SpendKeeperClient]) -> None:
    """Grafana's queries (variables filled in) are valid PromQL that Prometheus evaluates."""
    port, _client = prometheus
    for expr in _dashboard_exprs():
        query = expr.replace("$__rate_interval", "1m").replace("$org", ".*")
        if query.startswith("label_values("):
            name = query.removeprefix("label_values(").split(",")[0]
            answer = _get(port, "/api/v1/series", **{"match[]": name})
        else:
            answer = _get(port, "/api/v1/query", query=query)
        assert answer["status"] == "success", (expr, answer)
