"""Fixtures for the operations tests: real sidecars on 127.0.0.1:0 over a temporary ledger.

``make_sidecar(**settings)`` starts an in-process sidecar (``create_server``)
on a copy of ``policy.spend`` beside this file with a decision log in the
temporary directory; ``ledger`` is a data directory filled by
:func:`_ops_support.standard_traffic` through such a sidecar, then stopped,
so the CLI reads a real ledger.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from _ops_support import HERE, MakeSidecar, standard_traffic, stop

from sidecar.client import SpendKeeperClient
from sidecar.config import load_config
from sidecar.server import Sidecar, create_server


@pytest.fixture
def policy_dir(tmp_path: Path) -> Path:
    """A temporary copy of the test policy, in a directory of its own."""
    target = tmp_path / "policy"
    target.mkdir()
    shutil.copy(HERE / "policy.spend", target / "policy.spend")
    return target


@pytest.fixture
def make_sidecar(policy_dir: Path, tmp_path: Path) -> Iterator[MakeSidecar]:
    """Start sidecars on ephemeral ports; every one is stopped at the end."""
    started: list[Sidecar] = []

    def make(**settings: Any) -> tuple[Sidecar, str]:
        flags: dict[str, Any] = {
            "policy": str(policy_dir), "data_dir": str(tmp_path / "data"),
            "listen": "127.0.0.1:0", "metrics_listen": "off", "watch": False,
            "decision_log": str(tmp_path / "decisions.jsonl")}
        flags.update(settings)
        sidecar, port = create_server(load_config(flags, env={}))
        sidecar.start()
        started.append(sidecar)
        return sidecar, f"127.0.0.1:{port}"

    yield make
    for sidecar in started:
        stop(sidecar)


@pytest.fixture
def ledger(make_sidecar: MakeSidecar, tmp_path: Path) -> Path:
    """A data directory holding :func:`standard_traffic`, its sidecar stopped."""
    sidecar, target = make_sidecar()
    with SpendKeeperClient(target, timeout=5.0) as client:
        standard_traffic(client)
    stop(sidecar)
    return tmp_path / "data"
