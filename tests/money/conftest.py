"""Fixtures for the money tests: the policy, a settable clock, a ledger in tmp_path."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from _money_support import FakeClock, load_policy

from policy.model import Policy
from sidecar.ledger import Ledger


@pytest.fixture(scope="session")
def policy() -> Policy:
    """The compiled ``money.spend``."""
    return load_policy()


@pytest.fixture
def clock() -> FakeClock:
    """A clock at 2026-11-20T12:00Z."""
    return FakeClock()


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    """Where the ledger lives."""
    return tmp_path / "ledger"


@pytest.fixture
def ledger(data_dir: Path, clock: FakeClock) -> Iterator[Ledger]:
    """A real LMDB ledger on the fake clock (fsync per record is not under test here)."""
    led = Ledger(data_dir, map_size=64 << 20, clock=clock, durable=False)
    yield led
    led.close()
