"""The README quick start: ``make serve`` serves the example policy."""

from __future__ import annotations

import os
import shutil
import signal
from pathlib import Path

import pytest
from _server_support import ROOT, new_id, start_server

from bench.procfs import descendants_of
from sidecar.api.v1 import spendkeeper_pb2 as pb


@pytest.mark.slow
def test_make_serve_answers_an_authorize_for_the_example_org(tmp_path: Path) -> None:
    """`make serve ARGS=...` from the repo root becomes SERVING and allows alice@acme.com
    (examples/acme.spend) a claude-opus-5-5 call; on SIGTERM the sidecar and make exit 0.

    ``-o .venv/.installed`` keeps make from reinstalling the shared .venv when
    pyproject.toml is newer than its stamp: installing is not what this test is
    about, and other tests run from the same .venv.
    """
    make = shutil.which("make")
    assert make is not None, "make is needed for the quick start"
    args = f"--listen 127.0.0.1:0 --metrics-listen off --data-dir {tmp_path / 'data'}"
    server = start_server(tmp_path / "run", [f"ARGS={args}"], cwd=ROOT,
                          command=[make, "--no-print-directory", "-o", ".venv/.installed",
                                   "serve"])
    sidecars: list[int] = []
    try:
        # The sidecar below make (and perhaps a shell): the process with "serve" as an argument.
        sidecars = [pid for pid in descendants_of(server.pid)
                    if b"serve" in Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")]
        assert len(sidecars) == 1, sidecars
        resp = server.stub().Authorize(pb.AuthorizeRequest(
            request_id=new_id(), org="acme", user="alice@acme.com", product="claude_code",
            model="claude-opus-5-5", estimate=pb.Usage(input_tokens=10_000,
                                                       output_tokens=4_000)), timeout=10)
        assert (resp.decision, resp.reason) == (pb.ALLOW, pb.WITHIN_LIMITS)
        # $4 / MTok input, $20 / MTok output (examples/rates/anthropic.spend)
        assert (resp.worst_case_cost.units, resp.worst_case_cost.nanos) == (0, 120_000_000)
        os.kill(sidecars[0], signal.SIGTERM)
        assert server.process.wait(timeout=30) == 0, server.stderr()
    finally:
        for pid in sidecars:  # never leave our sidecar running if make is stopped first
            if Path(f"/proc/{pid}").exists():
                os.kill(pid, signal.SIGTERM)
        server.stop()
