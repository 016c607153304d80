"""Fixtures for the ledger tests: the test policy, a settable clock, a ledger in tmp_path.

The policy (``policy.spend`` beside this file) has small limits at every level
of org "acme" (user, user type, org, and a member with a daily limit),
thresholds at 50/80/100 %, a tool with a free monthly allowance and the
America/New_York time zone, so month boundaries are not UTC's.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from _ledger_support import FakeClock, load_policy

from policy.model import Policy
from sidecar.ledger import Ledger

#: Reservation TTL of the ``ledger`` fixture, in seconds.
TTL = 60.0


@pytest.fixture(scope="session")
def policy() -> Policy:
    """The compiled test policy."""
    return load_policy()


@pytest.fixture
def clock() -> FakeClock:
    """A clock at 2026-03-10T15:00Z whose wall and monotonic readings the test moves."""
    return FakeClock()


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    """A not-yet-existing directory for the LMDB environment."""
    return tmp_path / "ledger"


@pytest.fixture
def ledger(data_dir: Path, clock: FakeClock) -> Iterator[Ledger]:
    """A durable ledger on the fake clock with a 60 s reservation TTL."""
    led = Ledger(data_dir, map_size=64 << 20, reservation_ttl=TTL, clock=clock)
    yield led
    led.close()
