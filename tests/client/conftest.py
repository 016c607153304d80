"""Fixtures for the client tests: real sidecars on 127.0.0.1:0 with a temporary ledger.

``server`` runs the sidecar in this process (``create_server``); ``subprocess_server``
runs it in a child process (``create_server`` + ``main_loop``) so a test can
SIGSTOP it to stall the sidecar without killing its connections. Both serve a
temporary copy of ``policy.spend`` beside this file: org "acme" priced by one
model, "claude-sonnet-4-6" at $3 / $15 per MTok, with no release or retirement
date, so the tests do not depend on today's date.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from _client_support import HERE, ROOT, ChildServer

from sidecar.client import SpendKeeperClient
from sidecar.config import load_config
from sidecar.server import create_server

_CHILD = """
import sys
from sidecar.config import load_config
from sidecar.server import create_server, main_loop
config = load_config({"policy": sys.argv[1], "data_dir": sys.argv[2],
                      "listen": "127.0.0.1:0", "metrics_listen": "off", "watch": False})
sidecar, _ = create_server(config)
sys.exit(main_loop(sidecar))
"""


@pytest.fixture
def policy_path(tmp_path: Path) -> Path:
    """A temporary copy of the test policy."""
    target = tmp_path / "policy" / "policy.spend"
    target.parent.mkdir()
    shutil.copy(HERE / "policy.spend", target)
    return target


@pytest.fixture
def server(policy_path: Path, tmp_path: Path) -> Iterator[str]:
    """An in-process sidecar on an ephemeral port; yields its target."""
    config = load_config({"policy": str(policy_path), "data_dir": str(tmp_path / "data"),
                          "listen": "127.0.0.1:0", "metrics_listen": "off", "watch": False})
    sidecar, port = create_server(config)
    sidecar.start()
    try:
        yield f"127.0.0.1:{port}"
    finally:
        sidecar.stop(0.5)


@pytest.fixture
def client(server: str) -> Iterator[SpendKeeperClient]:
    """A client of ``server`` with a generous deadline (these tests are not about timing)."""
    with SpendKeeperClient(server, timeout=5.0) as c:
        yield c


@pytest.fixture
def subprocess_server(policy_path: Path, tmp_path: Path) -> Iterator[ChildServer]:
    """A sidecar in a child process; stopped with SIGCONT + SIGTERM afterwards."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    log = (tmp_path / "server.log").open("w", encoding="utf-8")
    process = subprocess.Popen(
        [sys.executable, "-c", _CHILD, str(policy_path), str(tmp_path / "child-data")],
        stdout=subprocess.PIPE, stderr=log, text=True, cwd=ROOT, env=env)
    try:
        assert process.stdout is not None
        line = process.stdout.readline()
        match = re.search(r"\(port (\d+)\)", line)
        if match is None:
            process.kill()
            log.close()
            pytest.fail(f"sidecar did not start: {line!r}\n"
                        + (tmp_path / "server.log").read_text(encoding="utf-8"))
        yield ChildServer(process, int(match.group(1)))
    finally:
        if process.poll() is None:
            os.kill(process.pid, signal.SIGCONT)
            process.terminate()
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        if process.stdout is not None:
            process.stdout.close()
        log.close()
