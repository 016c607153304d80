"""Fixtures for the observability tests: real sidecars with /metrics, a real webhook receiver.

``start_sidecar`` starts in-process sidecars (``create_server``) on
127.0.0.1:0 with a temporary ledger and their metrics listener on a free
loopback port; every sidecar it started is stopped afterwards. ``receiver``
is a real ``http.server`` on loopback that records webhook deliveries.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from _obs_support import Receiver, Running, StartSidecar, copy_policy, free_port

from sidecar.config import load_config
from sidecar.server import create_server


@pytest.fixture
def policy_path(tmp_path: Path) -> Path:
    """A private copy of ``policy.spend``."""
    return copy_policy(tmp_path / "policy")


@pytest.fixture
def start_sidecar(tmp_path: Path, policy_path: Path) -> Iterator[StartSidecar]:
    """Start sidecars (default: the test policy, ``tmp_path/data``); all stopped at the end."""
    running: list[Running] = []

    def start(policy: Path | None = None, data_dir: Path | None = None,
              **settings: Any) -> Running:
        metrics_port = free_port()
        flags = {"policy": str(policy or policy_path),
                 "data_dir": str(data_dir or tmp_path / "data"), "listen": "127.0.0.1:0",
                 "metrics_listen": f"127.0.0.1:{metrics_port}", "watch": False, **settings}
        sidecar, port = create_server(load_config(flags, env={}))
        sidecar.start()
        run = Running(sidecar, port, metrics_port)
        running.append(run)
        return run

    yield start
    for run in running:
        run.stop()


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    """A webhook receiver on loopback that answers 200."""
    rec = Receiver().start()
    yield rec
    rec.stop()
