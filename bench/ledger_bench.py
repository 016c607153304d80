"""Ledger benchmarks: in-process Authorize latency and durable Record throughput.

``python -m bench.ledger_bench [--quick] [--dir DIR]``

- Authorize: the full in-process decision (price, check user / user type / org,
  reserve at each) and its LMDB commit without fsync, timed call by call over N
  calls; 5 runs, each on a fresh environment; medians of p50/p99/p99.9 and their
  spread (min-max across runs).
- Record: durable acknowledgement (commit, then wait for the group fsync) with
  1, 8 and 32 threads recording at once: throughput, per-call p50/p99 and how
  many Records each fsync covered; 3 runs each, medians and spread.
- fsync: one bare ``env.sync(True)`` after a small commit, for reference.

The environment lives under ``--dir`` (default: the system temp dir); put it on
the disk the sidecar will use, since fsync cost is the disk's.
"""

from __future__ import annotations

import argparse
import datetime as dt
import shutil
import statistics
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from policy.compile import load_text
from policy.decide import Request
from policy.model import Policy
from policy.pricing import Usage
from sidecar.ledger import Ledger

__all__ = ["bench_records", "main", "run"]

POLICY = """
rates "bench" {
  model "m1" { input $3 / MTok  output $15 / MTok  cache_read $0.30 / MTok }
}
plan "p" {
  user_type chat { seat $20 / month  products chat }
}
org "bench" {
  plan "p"  rates "bench"
  limit $1,000,000,000 / month
  user_type chat limit $1,000,000,000 / month
  default user limit $1,000,000 / month
  default user_type chat
}
"""
AT = dt.datetime(2026, 11, 10, 12, tzinfo=dt.UTC)
USERS = 100
RUNS = 5


def _requests(prefix: str, count: int) -> list[Request]:
    usage = Usage(input_tokens=2_000, output_tokens=1_024, cache_read_tokens=10_000)
    return [Request(f"{prefix}-{i}", "bench", f"user{i % USERS}", "chat", "m1", usage, AT)
            for i in range(count)]


def _percentile(sorted_values: Sequence[float], pct: float) -> float:
    index = max(0, min(len(sorted_values) - 1, int(len(sorted_values) * pct / 100 + 0.5) - 1))
    return sorted_values[index]


def _authorize_run(root: Path, policy: Policy, calls: int, index: int) -> dict[str, float]:
    folder = root / f"authorize-{index}"
    ledger = Ledger(folder, map_size=1 << 30)
    try:
        for req in _requests(f"warm{index}", 1_000):
            ledger.authorize(policy, req)
        reqs = _requests(f"a{index}", calls)
        timings = []
        clock = time.perf_counter_ns
        for req in reqs:
            started = clock()
            ledger.authorize(policy, req)
            timings.append(clock() - started)
    finally:
        ledger.close()
        shutil.rmtree(folder, ignore_errors=True)
    timings.sort()
    return {"p50_us": _percentile(timings, 50) / 1e3, "p99_us": _percentile(timings, 99) / 1e3,
            "p999_us": _percentile(timings, 99.9) / 1e3,
            "mean_us": statistics.fmean(timings) / 1e3}


def bench_authorize(root: Path, policy: Policy, calls: int, runs: int = RUNS) -> dict[str, Any]:
    """Median and spread of Authorize latency percentiles over ``runs`` runs."""
    results = [_authorize_run(root, policy, calls, i) for i in range(runs)]
    out: dict[str, Any] = {"calls": calls, "runs": runs}
    for name in results[0]:
        values = [r[name] for r in results]
        out[name] = statistics.median(values)
        out[f"{name}_spread"] = (min(values), max(values))
    return out


def bench_record(root: Path, policy: Policy, threads: int, per_thread: int) -> dict[str, float]:
    """Durable Record throughput with ``threads`` concurrent writers."""
    folder = root / f"record-{threads}"
    ledger = Ledger(folder, map_size=1 << 30)
    latencies: list[int] = []
    lock = threading.Lock()
    barrier = threading.Barrier(threads + 1)

    def worker(t: int) -> None:
        reqs = _requests(f"r{t}", per_thread)
        mine = []
        clock = time.perf_counter_ns
        barrier.wait()
        for req in reqs:
            started = clock()
            ledger.record(policy, req)
            mine.append(clock() - started)
        with lock:
            latencies.extend(mine)

    try:
        workers = [threading.Thread(target=worker, args=(t,)) for t in range(threads)]
        for w in workers:
            w.start()
        assert ledger.group is not None
        syncs_before = ledger.group.syncs
        barrier.wait()
        started = time.perf_counter()
        for w in workers:
            w.join()
        elapsed = time.perf_counter() - started
        syncs = ledger.group.syncs - syncs_before
    finally:
        ledger.close()
        shutil.rmtree(folder, ignore_errors=True)
    latencies.sort()
    total = threads * per_thread
    return {"threads": threads, "records": total, "per_s": total / elapsed,
            "p50_ms": _percentile(latencies, 50) / 1e6, "p99_ms": _percentile(latencies, 99) / 1e6,
            "per_fsync": total / max(syncs, 1)}


def bench_records(root: Path, policy: Policy, threads: int, per_thread: int,
                  runs: int = 3) -> dict[str, Any]:
    """Median and spread of :func:`bench_record` figures over ``runs`` runs."""
    results = [bench_record(root, policy, threads, per_thread) for _ in range(runs)]
    out: dict[str, Any] = {"threads": threads, "records": results[0]["records"], "runs": runs}
    for name in ("per_s", "p50_ms", "p99_ms", "per_fsync"):
        values = [r[name] for r in results]
        out[name] = statistics.median(values)
        out[f"{name}_spread"] = (min(values), max(values))
    return out


def bench_fsync(root: Path, count: int) -> float:
    """Median microseconds of one fsync after a small commit."""
    folder = root / "fsync"
    ledger = Ledger(folder, map_size=1 << 26, durable=False)
    timings = []
    try:
        for i in range(count):
            with ledger.env.begin(write=True) as txn:
                txn.put(b"k%d" % i, b"v" * 64, db=ledger.dbs["meta"])
            started = time.perf_counter_ns()
            ledger.env.sync(True)
            timings.append(time.perf_counter_ns() - started)
    finally:
        ledger.close()
        shutil.rmtree(folder, ignore_errors=True)
    return statistics.median(timings) / 1e3


def run(quick: bool = False, directory: str | Path | None = None,
        record_runs: int = 3) -> dict[str, Any]:
    """Run every ledger benchmark, print a table and return the figures."""
    policy = load_text(POLICY, "bench.spend")
    root = Path(tempfile.mkdtemp(prefix="ledger-bench-", dir=directory))
    try:
        authorize = bench_authorize(root, policy, 3_000 if quick else 20_000)
        records = [bench_records(root, policy, threads, (200 if quick else 2_000) // threads
                                 if threads > 1 else (100 if quick else 500), record_runs)
                   for threads in (1, 8, 32)]
        fsync_us = bench_fsync(root, 20 if quick else 200)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    result = {"authorize": authorize, "record": records, "fsync_us": fsync_us}
    _print(result)
    return result


def _print(result: dict[str, Any]) -> None:
    a = result["authorize"]
    print(f"Authorize in-process (decision + LMDB commit, no fsync): {a['calls']:,} calls x "
          f"{a['runs']} runs; median [min-max] across runs")
    for name, label in (("p50_us", "p50"), ("p99_us", "p99"), ("p999_us", "p99.9"),
                        ("mean_us", "mean")):
        low, high = a[f"{name}_spread"]
        print(f"  {label:>6}  {a[name]:8.1f} us   [{low:.1f}-{high:.1f}]")
    print("Record, durable (group commit); medians of runs, rec/s and p99 with [min-max]:")
    print(f"  {'threads':>7}  {'records':>7}  {'rec/s':>20}  {'p50 ms':>7}  {'p99 ms':>19}  "
          f"{'rec/fsync':>9}")
    for r in result["record"]:
        low, high = r.get("per_s_spread", (r["per_s"], r["per_s"]))
        p99_low, p99_high = r.get("p99_ms_spread", (r["p99_ms"], r["p99_ms"]))
        rate = f"{r['per_s']:,.0f} [{low:,.0f}-{high:,.0f}]"
        p99 = f"{r['p99_ms']:.2f} [{p99_low:.2f}-{p99_high:.2f}]"
        print(f"  {r['threads']:>7}  {r['records']:>7}  {rate:>20}  {r['p50_ms']:>7.2f}  "
              f"{p99:>19}  {r['per_fsync']:>9.1f}")
    print(f"One bare fsync (env.sync) after a small commit: {result['fsync_us']:.0f} us (median)")


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.ledger_bench",
                                     description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="fewer calls (a smoke run)")
    parser.add_argument("--dir", default=None, help="where to put the LMDB environments")
    args = parser.parse_args(argv)
    run(args.quick, args.dir)


if __name__ == "__main__":
    main()
