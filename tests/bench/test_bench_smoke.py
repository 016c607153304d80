"""``python -m bench --quick`` runs every section and writes every figure (no timing checks).

Timing belongs to the benchmarks themselves; this only guards that ``make
bench`` keeps working: the command exits 0 and its JSON holds each figure the
suite promises, as a positive median / min / max.
"""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent.parent

FIGURES = [
    # ledger (in-process)
    "inproc_authorize_p50_us", "inproc_authorize_p99_us", "inproc_authorize_p999_us",
    *(f"inproc_record_c{c}_{m}" for c in (1, 8, 32) for m in ("per_s", "p99_ms")),
    # metrics and policy
    "metrics_authorized_us", "metrics_recorded_us", "policy_load_s",
    # server model sweep and the servicer's own cost
    *(f"server_{m}_authorize_per_s" for m in ("sync4", "sync8", "sync16", "aio")),
    "servicer_authorize_inproc_cpu_us", "servicer_request_from_cpu_us",
    "servicer_ledger_authorize_cpu_us",
    # gRPC closed loop against the bare echo server
    *(f"grpc_{k}_c{c}_{m}" for c in (1, 8, 32) for k in ("authorize", "echo", "record")
      for m in ("per_s", "p50_ms", "p99_ms")),
    *(f"grpc_authorize_vs_echo_c{c}_ratio" for c in (1, 8, 32)),
    "grpc_record_vs_authorize_c32_ratio", "grpc_authorize_vs_echo_cpu_ratio",
    *(f"grpc_{k}_server_cpu_us_per_call" for k in ("authorize", "echo", "record")),
    # open loop, workers, reload
    *(f"openloop_{r}_{m}" for r in ("1k", "3k") for m in ("p50_ms", "p99_ms")),
    "workers1_authorize_per_s", "workers2_authorize_per_s", "workers_scaling_ratio",
    "workers_cpu_efficiency_ratio",
    "reload_duration_ms", "reload_steady_p99_ms", "reload_window_p99_ms", "reload_p99_ratio",
]


@pytest.mark.slow
def test_quick_bench_writes_every_figure(tmp_path: Path) -> None:
    output = tmp_path / "results.json"
    proc = subprocess.run([sys.executable, "-m", "bench", "--quick", "--output", str(output),
                           "--dir", str(tmp_path)],
                          cwd=ROOT, capture_output=True, text=True, timeout=240, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert re.search(r"figure +\| measured +\| target +\| met\?", proc.stdout), proc.stdout[-3000:]
    data = json.loads(output.read_text(encoding="utf-8"))
    figures = data["figures"]
    missing = [key for key in FIGURES if key not in figures]
    assert not missing, missing
    for key in FIGURES:
        fig = figures[key]
        for field in ("median", "min", "max"):
            value = fig[field]
            assert isinstance(value, int | float), (key, field, value)
            assert math.isfinite(value), (key, field, value)
            assert value > 0, (key, field, value)
        assert fig["runs"] >= 1, key
        assert fig["met"] in (True, False, None), key
    assert data["meta"]["quick"] is True
    # Nothing is left behind: servers stopped, temporary directories removed.
    assert not list(tmp_path.glob("spendkeeper-bench-*"))
