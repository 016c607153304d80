"""Metrics agree with the ledger across restarts, and counters never go backwards.

Six lives of one sidecar on one ledger (five restarts, alternately SIGTERM and
kill -9). In each life: load, with /metrics scraped throughout; every counter
sample (``*_total``, histogram ``_count``/``_sum``/``_bucket``) is >= its
previous value in that life; the spend gauges equal GetUsage to the nano-USD;
the per-process counters equal what the clients sent. Across a restart, every
ledger-backed figure reads the same before and after.
"""

from __future__ import annotations

import random
import threading
from pathlib import Path

import pytest
from _rel_support import (
    Samples,
    Server,
    Workers,
    authorize_msg,
    free_port,
    nanos,
    record_msg,
    report,
    scrape,
    serve_args,
    start_server,
)

from sidecar.api.v1 import spendkeeper_pb2 as pb

#: Families read from LMDB at scrape time: a restart must not change them.
LEDGER_FAMILIES = ("spendkeeper_spend_usd", "spendkeeper_spend_nano_usd",
                   "spendkeeper_reserved_usd", "spendkeeper_limit_usd",
                   "spendkeeper_reservations_outstanding",
                   "spendkeeper_ledger_conservation_drift_nano_usd")
ORGS = ("open", "pool")


def _is_counter(name: str) -> bool:
    return name.endswith(("_total", "_count", "_sum", "_bucket"))


def _ledger_part(samples: Samples) -> Samples:
    return {k: v for k, v in samples.items() if k[0] in LEDGER_FAMILIES}


def _sum(samples: Samples, name: str, **labels: str) -> float:
    return sum(v for (n, lbl), v in samples.items()
               if n == name and all((k, val) in lbl for k, val in labels.items()))


class Life:
    """One server process: its clients, a scraper watching counters, and their tallies."""

    def __init__(self, server: Server, port: int, first: Samples, seed: int,
                 index: int) -> None:
        self.server, self.port, self.seed, self.index = server, port, seed, index
        self.sent = {"authorize": 0, "allowed": 0, "record": 0}
        self.lock = threading.Lock()
        self.stop = threading.Event()
        self.last = first
        self.regressions: list[str] = []
        self.scrapes = 0

    def client(self, index: int, ops: int) -> None:
        """``ops`` Authorizes (now, no ``at``) on both orgs; 70 % of the allowed recorded."""
        stub = self.server.stub()
        local = random.Random(self.seed * 1000 + self.index * 100 + index)
        for i in range(ops):
            org = local.choice(ORGS)
            rid, user = f"l{self.index}-c{index}-{i}", f"user-{index}"
            tokens = local.randint(1, 3000)
            resp = stub.Authorize(authorize_msg(rid, org, user, tokens, at=None), timeout=30)
            with self.lock:
                self.sent["authorize"] += 1
                self.sent["allowed"] += resp.decision == pb.ALLOW
            if resp.decision == pb.ALLOW and local.random() < 0.7:
                stub.Record(record_msg(rid, org, user, local.randint(0, tokens), at=None),
                            timeout=30)
                with self.lock:
                    self.sent["record"] += 1

    def scraper(self) -> None:
        """Scrape until stopped; note any counter sample lower than in the scrape before."""
        while not self.stop.is_set():
            now = scrape(self.port)
            for key, value in now.items():
                before = self.last.get(key)
                if _is_counter(key[0]) and before is not None and value < before:
                    self.regressions.append(f"{key}: {before} -> {value}")
            self.last = now
            self.scrapes += 1


def metric_lives(tmp_path: Path, policy: Path, servers: list[Server], restarts: int,
                 ops: int, seed: int) -> None:
    """``restarts`` + 1 lives of one sidecar on one ledger, checked as the module says."""
    data = tmp_path / "data"
    port = free_port()
    previous: Samples | None = None
    totals = {"authorize": 0, "record": 0, "scrapes": 0}
    for index in range(restarts + 1):
        server = start_server(tmp_path / f"run{index}",
                              serve_args(policy, data, metrics=f"127.0.0.1:{port}"))
        servers.append(server)
        first = scrape(port)
        if previous is not None:
            assert _ledger_part(first) == _ledger_part(previous), (
                f"life {index}: a restart changed a ledger-backed metric")
        life = Life(server, port, first, seed, index)
        workers = Workers()
        for client in range(4):
            workers.spawn(life.client, client, ops)
        watcher = Workers()
        watcher.spawn(life.scraper)
        workers.join()
        life.stop.set()
        watcher.join()
        assert life.regressions == [], life.regressions[:5]
        samples = scrape(port)
        stub = server.stub()
        for org in ORGS:
            usage = stub.GetUsage(pb.GetUsageRequest(org=org), timeout=30)
            lines = [("org", usage.org), *(("user_type", t) for t in usage.user_types)]
            for level, line in lines:
                labels = frozenset({("org", org), ("level", level), ("scope", line.scope)})
                got = (samples.get(("spendkeeper_spend_nano_usd", labels)),
                       samples.get(("spendkeeper_reserved_usd", labels)))
                assert got == (nanos(line.spent), nanos(line.reserved) / 10**9), (org, level, got)
        # Per-process counters count exactly what this life's clients sent.
        sent = life.sent
        assert _sum(samples, "spendkeeper_decisions_total") == sent["authorize"]
        assert _sum(samples, "spendkeeper_decisions_total", decision="allow") == sent["allowed"]
        assert _sum(samples, "spendkeeper_records_total", duplicate="false") == sent["record"]
        assert _sum(samples, "spendkeeper_rpc_duration_seconds_count", rpc="Authorize") \
            == sent["authorize"]
        totals["authorize"] += sent["authorize"]
        totals["record"] += sent["record"]
        totals["scrapes"] += life.scrapes
        previous = scrape(port)
        if index % 2:
            server.kill()
        else:
            assert server.stop() == 0, server.stderr()
        server.close_channels()
    report(f"metrics: {restarts} restarts (SIGTERM / kill -9 alternately), "
           f"{totals['authorize']} Authorizes, {totals['record']} Records, "
           f"{totals['scrapes']} scrapes under load: spend gauges == GetUsage to the nano, "
           f"ledger gauges unchanged by every restart, 0 counter regressions")


@pytest.mark.slow
def test_metrics_equal_the_ledger_across_5_restarts(tmp_path: Path, policy_dir: Path,
                                                    servers: list[Server]) -> None:
    """5 restarts: gauges == GetUsage, unchanged by restarts; counters monotone per life."""
    metric_lives(tmp_path, policy_dir, servers, 5, 40, seed=random.randrange(2**32))


@pytest.mark.soak
@pytest.mark.timeout(900)
def test_metrics_soak(tmp_path: Path, policy_dir: Path, servers: list[Server]) -> None:
    """The same over 20 restarts with more load per life."""
    metric_lives(tmp_path, policy_dir, servers, 20, 200, seed=random.randrange(2**32))
