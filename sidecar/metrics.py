"""Prometheus metrics: per-call counters and histograms, ledger figures at scrape time.

Per-call figures (decisions, latency, records, tokens, cost) are kept by each
handler thread in its own plain-int cells — a thread-local shard — and summed
at scrape time. The hot path takes no lock, does no label lookup and keeps
money as integers: prometheus_client's own ``Counter.inc`` and
``Histogram.observe`` cost 0.7 and 1.5 µs each on a 2-vCPU VM, more than the
whole 1 µs per call the spec allows. Shards are only added to (never reset),
so the counters are true Prometheus counters for the life of the process.

Spend figures come from the ledger through :class:`LedgerCollector`, read at
scrape time, so a restart never resets them. Money leaves the app as floats
only in the exposition: ``*_usd`` gauges for dashboards and integer-valued
``spendkeeper_spend_nano_usd`` for exact reconciliation (exact below 2**53
nano-USD, about 9 million USD per series). See docs/observability.md.
"""

from __future__ import annotations

import logging
import threading
from bisect import bisect_left
from collections.abc import Iterable, Iterator, Mapping
from typing import Any
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector

from policy.decide import REASONS, Request
from policy.model import ATTO_PER_USD, METERS, NANOS_PER_USD
from sidecar.ledger import AuthorizeResult, Ledger, RecordResult, outbox
from sidecar.ledger.audit import Auditor
from sidecar.ledger.views import usage_report
from sidecar.notify import Notifier
from sidecar.service import PolicyHolder

__all__ = ["RPCS", "LedgerCollector", "Metrics", "serve_metrics"]

_log = logging.getLogger("spendkeeper.metrics")
_BUCKETS = (50e-6, 100e-6, 250e-6, 500e-6, 1e-3, 2.5e-3, 5e-3, 10e-3, 25e-3, 0.1, 1.0)
_LE = (*(repr(b) for b in _BUCKETS), "+Inf")
RPCS = ("Authorize", "Record", "Release", "GetUsage")
_AUTH, _REC, _REL, _USAGE = range(4)
#: Label values standing in for names a request made up (bounded cardinality).
UNKNOWN_ORG = "(unknown)"
UNPRICED_MODEL = "(unpriced)"
_TOOL_UNITS = {"code_execution": "seconds"}


class _Shard:
    """One thread's counts; only its own thread writes them.

    The collector reads them from another thread: copying a dict or reading an
    int is atomic under CPython's GIL, and a scrape that misses an increment
    in flight sees it next time.
    """

    __slots__ = ("decisions", "errors", "latency", "records", "releases", "sums", "usage")

    def __init__(self) -> None:
        self.decisions: dict[tuple[str, bool, str, bool], int] = {}
        self.records: dict[tuple[str, bool], int] = {}
        #: (org, model) -> meter -> [quantity, atto-USD]
        self.usage: dict[tuple[str, str], dict[str, list[int]]] = {}
        self.errors: dict[tuple[str, str], int] = {}
        self.releases = [0, 0]
        self.latency = [[0] * (len(_BUCKETS) + 1) for _ in RPCS]
        self.sums = [0.0] * len(RPCS)


class Metrics:
    """The servicer's observer: counts decisions, records and usage, times calls."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self._local = threading.local()
        self._shards: list[_Shard] = []
        self._shards_lock = threading.Lock()
        registry.register(_CallCollector(self))

    def _shard(self) -> _Shard:
        shard = _Shard()
        with self._shards_lock:
            self._shards.append(shard)
        self._local.shard = shard
        return shard

    def shards(self) -> list[_Shard]:
        """Every thread's shard (for the collector)."""
        with self._shards_lock:
            return list(self._shards)

    # -------------------------------------------------------------- observer
    def authorized(self, req: Request, result: AuthorizeResult, seconds: float) -> None:
        """Count the decision and time it."""
        try:
            shard: _Shard = self._local.shard
        except AttributeError:
            shard = self._shard()
        verdict = result.verdict
        key = (req.org if verdict != "UNKNOWN_ORG" else UNKNOWN_ORG, result.allowed, verdict,
               result.shadow)
        try:  # subscripting beats .get() on the hot path; a miss happens once per key
            shard.decisions[key] += 1
        except KeyError:
            shard.decisions[key] = 1
        shard.latency[_AUTH][bisect_left(_BUCKETS, seconds)] += 1
        shard.sums[_AUTH] += seconds

    def recorded(self, req: Request, result: RecordResult, seconds: float) -> None:
        """Count the record and its usage by model and meter, and time it."""
        try:
            shard: _Shard = self._local.shard
        except AttributeError:
            shard = self._shard()
        # A known org always has levels; an unknown one's made-up name is not a label.
        org = req.org if result.levels else UNKNOWN_ORG
        key = (org, result.duplicate)
        try:
            shard.records[key] += 1
        except KeyError:
            shard.records[key] = 1
        detail = result.detail
        if detail is not None:
            usage = shard.usage
            if detail.priced:
                try:
                    meters = usage[org, detail.model]
                except KeyError:
                    meters = usage[org, detail.model] = {}
                for line in detail.lines:
                    try:
                        cell = meters[line.meter]
                    except KeyError:
                        cell = meters[line.meter] = [0, 0]
                    cell[0] += line.quantity
                    cell[1] += line.atto
            else:
                self._unpriced(shard, org, req)
        shard.latency[_REC][bisect_left(_BUCKETS, seconds)] += 1
        shard.sums[_REC] += seconds

    @staticmethod
    def _unpriced(shard: _Shard, org: str, req: Request) -> None:
        """Usage of a model the table does not know: tokens count, cost is zero."""
        meters = shard.usage.setdefault((org, UNPRICED_MODEL), {})
        for meter, quantity in zip(METERS, req.usage.tokens(), strict=True):
            if quantity:
                meters.setdefault(meter, [0, 0])[0] += quantity

    def released(self, released: bool, seconds: float) -> None:
        """Count and time the release."""
        try:
            shard: _Shard = self._local.shard
        except AttributeError:
            shard = self._shard()
        shard.releases[released] += 1
        shard.latency[_REL][bisect_left(_BUCKETS, seconds)] += 1
        shard.sums[_REL] += seconds

    def usage_read(self, seconds: float) -> None:
        """Time the usage read."""
        try:
            shard: _Shard = self._local.shard
        except AttributeError:
            shard = self._shard()
        shard.latency[_USAGE][bisect_left(_BUCKETS, seconds)] += 1
        shard.sums[_USAGE] += seconds

    def failed(self, rpc: str, code: str, seconds: float) -> None:
        """Count an error status (and time it)."""
        try:
            shard: _Shard = self._local.shard
        except AttributeError:
            shard = self._shard()
        key = (rpc, code)
        shard.errors[key] = shard.errors.get(key, 0) + 1
        if rpc in RPCS:
            index = RPCS.index(rpc)
            shard.latency[index][bisect_left(_BUCKETS, seconds)] += 1
            shard.sums[index] += seconds


def _merge(dicts: Iterable[dict[Any, int]]) -> dict[Any, int]:
    total: dict[Any, int] = {}
    for cells in dicts:
        for key, value in list(cells.items()):  # a copy: the owner thread may add keys
            total[key] = total.get(key, 0) + value
    return total


class _CallCollector(Collector):
    """Sums every thread's shard into Prometheus families at scrape time."""

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics

    def collect(self) -> Iterator[Any]:
        """The per-call families."""
        shards = self.metrics.shards()
        decisions = CounterMetricFamily("spendkeeper_decisions", "Authorize decisions",
                                        labels=["org", "decision", "reason", "shadow"])
        for (org, allowed, verdict, shadow), n in sorted(
                _merge(s.decisions for s in shards).items()):
            decisions.add_metric([org, "allow" if allowed else "deny",
                                  verdict if verdict in REASONS else "OTHER",
                                  "true" if shadow else "false"], n)
        yield decisions
        records = CounterMetricFamily("spendkeeper_records", "Records answered (duplicate: "
                                      "a replay that changed nothing)", labels=["org", "duplicate"])
        for (org, dup), n in sorted(_merge(s.records for s in shards).items()):
            records.add_metric([org, "true" if dup else "false"], n)
        yield records
        yield from self._usage(shards)
        releases = CounterMetricFamily("spendkeeper_releases", "Releases answered",
                                       labels=["released"])
        for index, name in enumerate(("false", "true")):
            releases.add_metric([name], sum(s.releases[index] for s in shards))
        yield releases
        errors = CounterMetricFamily("spendkeeper_rpc_errors", "RPCs answered with an error "
                                     "status", labels=["rpc", "code"])
        for (rpc, code), n in sorted(_merge(s.errors for s in shards).items()):
            errors.add_metric([rpc, code], n)
        yield errors
        latency = HistogramMetricFamily("spendkeeper_rpc_duration_seconds", "RPC handling time",
                                        labels=["rpc"])
        for index, rpc in enumerate(RPCS):
            counts = [sum(s.latency[index][i] for s in shards) for i in range(len(_LE))]
            cumulative, buckets = 0, []
            for le, n in zip(_LE, counts, strict=True):
                cumulative += n
                buckets.append((le, float(cumulative)))
            latency.add_metric([rpc], buckets, sum(s.sums[index] for s in shards))
        yield latency

    @staticmethod
    def _usage(shards: list[_Shard]) -> Iterator[CounterMetricFamily]:
        tokens = CounterMetricFamily("spendkeeper_tokens", "Tokens recorded by model and meter",
                                     labels=["org", "model", "meter"])
        tools = CounterMetricFamily("spendkeeper_tool_units", "Tool use recorded (requests; "
                                    "seconds for code_execution)", labels=["org", "model", "tool"])
        cost = CounterMetricFamily("spendkeeper_cost_usd", "Cost recorded by model and meter "
                                   "(USD, exact sums converted at scrape time)",
                                   labels=["org", "model", "meter"])
        merged: dict[tuple[str, str, str], list[int]] = {}
        for shard in shards:
            for (org, model), meters in list(shard.usage.items()):
                for meter, cell in list(meters.items()):
                    total = merged.setdefault((org, model, meter), [0, 0])
                    total[0] += cell[0]
                    total[1] += cell[1]
        for (org, model, meter), (quantity, atto) in sorted(merged.items()):
            if meter.startswith("tool:"):
                tools.add_metric([org, model, meter.removeprefix("tool:")], quantity)
            else:
                tokens.add_metric([org, model, meter], quantity)
            cost.add_metric([org, model, meter], atto / ATTO_PER_USD)
        yield tokens
        yield tools
        yield cost


class LedgerCollector(Collector):
    """Figures read from LMDB (and the process) at scrape time.

    Current-period spend, reserved and limit per org and user type (per user
    where the org's policy says ``per_user_metrics`` or ``per_user`` is set),
    reservations, map usage, conservation drift, notification backlog, the
    policy version and reload results.
    """

    def __init__(self, ledger: Ledger, holder: PolicyHolder, *, per_user: bool = False,
                 reloads: Mapping[str, int] | None = None,
                 notifier: Notifier | None = None) -> None:
        self.ledger = ledger
        self.holder = holder
        self.per_user = per_user
        self.reloads = reloads
        self.notifier = notifier
        self.auditor = Auditor(ledger)
        self.errors = 0

    def collect(self) -> Iterator[Any]:
        """Read one snapshot per org at scrape time."""
        yield from self._spend()
        yield from self._ledger()
        yield from self._notifications()
        yield from self._policy()

    def _spend(self) -> Iterator[GaugeMetricFamily]:
        labels = ["org", "level", "scope"]
        spent = GaugeMetricFamily("spendkeeper_spend_usd", "Spent this period (USD)", labels=labels)
        nanos = GaugeMetricFamily("spendkeeper_spend_nano_usd", "Spent this period (integer "
                                  "nano-USD, for exact reconciliation)", labels=labels)
        reserved = GaugeMetricFamily("spendkeeper_reserved_usd", "Reserved now (USD)",
                                     labels=labels)
        limit = GaugeMetricFamily("spendkeeper_limit_usd", "Monthly limit (USD)", labels=labels)
        drift = GaugeMetricFamily("spendkeeper_ledger_conservation_drift_nano_usd",
                                  "Largest difference between the sums over users and over user "
                                  "types, the org counter and the journal plus corrections this "
                                  "period, in nano-USD (0: the books balance)",
                                  labels=["org"])
        policy = self.holder.policy
        for org in policy.orgs.values():
            try:
                report = usage_report(self.ledger, policy, org)
                balance = self.auditor.balance(org.name, report.period)
            except Exception:
                self.errors += 1
                _log.exception("reading org %s for metrics failed", org.name)
                continue
            users = report.users if self.per_user or org.per_user_metrics else ()
            for line in (report.org_line, *report.types, *users):
                values = [org.name, line.level, line.scope]
                spent.add_metric(values, line.spent / NANOS_PER_USD)
                nanos.add_metric(values, line.spent)
                reserved.add_metric(values, line.reserved / NANOS_PER_USD)
                if line.limit is not None:
                    limit.add_metric(values, line.limit / NANOS_PER_USD)
            drift.add_metric([org.name], balance.drift)
        yield from (spent, nanos, reserved, limit, drift)

    def _ledger(self) -> Iterator[Any]:
        env = self.ledger.env
        info, stat = env.info(), env.stat()
        yield GaugeMetricFamily("spendkeeper_ledger_map_size_bytes", "LMDB map size (the most "
                                "the ledger can hold)", value=info["map_size"])
        yield GaugeMetricFamily("spendkeeper_ledger_used_bytes", "LMDB pages in use (bytes)",
                                value=(info["last_pgno"] + 1) * stat["psize"])
        yield GaugeMetricFamily("spendkeeper_reservations_outstanding", "Live reservations "
                                "(neither recorded, released nor expired)",
                                value=self.ledger.outstanding())
        yield CounterMetricFamily("spendkeeper_reservations_expired", "Reservations this process "
                                  "expired after their TTL", value=self.ledger.expired_total)
        yield CounterMetricFamily("spendkeeper_collector_errors", "Scrape-time ledger reads "
                                  "that failed (logged)", value=self.errors)

    def _notifications(self) -> Iterator[Any]:
        try:
            backlog = outbox.stats(self.ledger)
        except Exception:
            self.errors += 1
            _log.exception("reading the outbox for metrics failed")
            backlog = outbox.OutboxStats(0, 0)
        yield GaugeMetricFamily("spendkeeper_notifications_pending", "Threshold notifications "
                                "not yet delivered", value=backlog.pending)
        yield GaugeMetricFamily("spendkeeper_notifications_retrying", "Pending notifications "
                                "whose delivery failed at least once", value=backlog.retrying)
        deliveries = CounterMetricFamily("spendkeeper_notification_deliveries", "Notification "
                                         "delivery attempts by this process, by result",
                                         labels=["result"])
        note = self.notifier
        for result, n in (("delivered", note.delivered if note else 0),
                          ("logged", note.logged if note else 0),
                          ("failed", note.failed if note else 0)):
            deliveries.add_metric([result], n)
        yield deliveries

    def _policy(self) -> Iterator[Any]:
        info = GaugeMetricFamily("spendkeeper_policy_info", "The policy version in force "
                                 "(content hash)", labels=["version"])
        info.add_metric([self.holder.policy.version], 1)
        yield info
        reloads = CounterMetricFamily("spendkeeper_policy_reloads", "Policy reloads by result "
                                      "(error: rejected, the last good policy kept serving)",
                                      labels=["result"])
        for result in ("ok", "error"):
            reloads.add_metric([result], (self.reloads or {}).get(result, 0))
        yield reloads


def serve_metrics(registry: CollectorRegistry, address: str) -> tuple[WSGIServer, threading.Thread]:
    """Serve /metrics on ``host:port`` in a background thread."""
    host, _, port = address.rpartition(":")
    server, thread = start_http_server(int(port), addr=host.strip("[]") or "127.0.0.1",
                                       registry=registry)
    return server, thread
