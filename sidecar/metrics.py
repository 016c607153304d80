"""Prometheus metrics: per-call counters and histograms, ledger figures at scrape time.

Per-call metrics bind their label children once (a dict lookup per call, no
label parsing). Spend figures come from the ledger through a custom collector
read at scrape time, so a restart never resets them.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from policy.decide import REASONS, Request
from sidecar.ledger import AuthorizeResult, Ledger, RecordResult
from sidecar.ledger.views import usage_report
from sidecar.service import PolicyHolder

__all__ = ["LedgerCollector", "Metrics", "serve_metrics"]

_NANOS = 10**9
_LATENCY_BUCKETS = (50e-6, 100e-6, 250e-6, 500e-6, 1e-3, 2.5e-3, 5e-3, 10e-3, 25e-3, 0.1, 1.0)
RPCS = ("Authorize", "Record", "Release", "GetUsage")


class Metrics:
    """The servicer's observer that counts decisions and times calls."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self.decisions = Counter("spendkeeper_decisions", "Authorize decisions",
                                 ["org", "decision", "reason", "shadow"], registry=registry)
        latency = Histogram("spendkeeper_rpc_duration_seconds", "RPC handling time", ["rpc"],
                            buckets=_LATENCY_BUCKETS, registry=registry)
        self.latency = {rpc: latency.labels(rpc) for rpc in RPCS}
        self.errors = Counter("spendkeeper_rpc_errors", "RPCs answered with an error status",
                              ["rpc", "code"], registry=registry)
        self.records = Counter("spendkeeper_records", "Records settled", ["org", "duplicate"],
                               registry=registry)
        self._decision_children: dict[tuple[str, bool, str, bool], Any] = {}
        self._record_children: dict[tuple[str, bool], Any] = {}

    def authorized(self, req: Request, result: AuthorizeResult, seconds: float) -> None:
        """Count the decision and time it."""
        key = (req.org, result.allowed, result.verdict, result.shadow)
        child = self._decision_children.get(key)
        if child is None:
            reason = result.verdict if result.verdict in REASONS else "OTHER"
            child = self.decisions.labels(req.org, "allow" if result.allowed else "deny", reason,
                                          "true" if result.shadow else "false")
            self._decision_children[key] = child
        child.inc()
        self.latency["Authorize"].observe(seconds)

    def recorded(self, req: Request, result: RecordResult, seconds: float) -> None:
        """Count the record and time it."""
        key = (req.org, result.duplicate)
        child = self._record_children.get(key)
        if child is None:
            child = self.records.labels(req.org, "true" if result.duplicate else "false")
            self._record_children[key] = child
        child.inc()
        self.latency["Record"].observe(seconds)

    def released(self, released: bool, seconds: float) -> None:
        """Time the release."""
        self.latency["Release"].observe(seconds)

    def usage_read(self, seconds: float) -> None:
        """Time the usage read."""
        self.latency["GetUsage"].observe(seconds)

    def failed(self, rpc: str, code: str, seconds: float) -> None:
        """Count an error status."""
        self.errors.labels(rpc, code).inc()
        if rpc in self.latency:
            self.latency[rpc].observe(seconds)


class LedgerCollector(Collector):
    """Current-period spend, reserved and limits per org and user type, from LMDB."""

    def __init__(self, ledger: Ledger, holder: PolicyHolder) -> None:
        self.ledger = ledger
        self.holder = holder

    def collect(self) -> Iterator[GaugeMetricFamily]:
        """Read one snapshot per org at scrape time."""
        spent = GaugeMetricFamily("spendkeeper_spend_usd", "Spent this period (USD)",
                                  labels=["org", "level", "scope"])
        reserved = GaugeMetricFamily("spendkeeper_reserved_usd", "Reserved now (USD)",
                                     labels=["org", "level", "scope"])
        limit = GaugeMetricFamily("spendkeeper_limit_usd", "Monthly limit (USD)",
                                  labels=["org", "level", "scope"])
        policy = self.holder.policy
        for org in policy.orgs.values():
            report = usage_report(self.ledger, policy, org)
            for line in (report.org_line, *report.types):
                labels = [org.name, line.level, line.scope]
                spent.add_metric(labels, line.spent / _NANOS)
                reserved.add_metric(labels, line.reserved / _NANOS)
                if line.limit is not None:
                    limit.add_metric(labels, line.limit / _NANOS)
        yield spent
        yield reserved
        yield limit


def serve_metrics(registry: CollectorRegistry, address: str) -> tuple[WSGIServer, threading.Thread]:
    """Serve /metrics on ``host:port`` in a background thread."""
    host, _, port = address.rpartition(":")
    server, thread = start_http_server(int(port), addr=host.strip("[]") or "127.0.0.1",
                                       registry=registry)
    return server, thread
