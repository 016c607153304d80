"""Fixtures for the server integration tests: real ``spendkeeper serve`` child processes.

``shared_server`` is one sidecar for the whole session, serving a temporary
copy of ``policy/limits.spend`` on 127.0.0.1 (an ephemeral port) with a
temporary ledger. Tests that share it keep out of each other's way by using
their own users (or orgs no other test charges), so the order they run in
does not matter. Tests that need their own flags, signals or restarts start
their own server with :func:`_server_support.start_server`.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from _server_support import Certs, Server, copy_policy, make_certs, serve_args, start_server

from sidecar.api.v1 import spendkeeper_pb2_grpc as pb_grpc


@pytest.fixture(scope="session")
def shared_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """One sidecar for the session; it must exit 0 on SIGTERM at the end."""
    root = tmp_path_factory.mktemp("shared")
    server = start_server(root / "run", serve_args(copy_policy(root / "policy"), root / "data"))
    yield server
    assert server.stop() == 0, server.stderr()


@pytest.fixture
def stub(shared_server: Server) -> pb_grpc.SpendKeeperStub:
    """A SpendKeeper stub on a fresh channel to the shared server."""
    return shared_server.stub()


@pytest.fixture(scope="session")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certs:
    """A test CA with server and client certificates (made once per session)."""
    return make_certs(tmp_path_factory.mktemp("certs"))


@pytest.fixture
def policy_copy(tmp_path: Path) -> Path:
    """A private copy of the test policy directory."""
    return copy_policy(tmp_path / "policy")
