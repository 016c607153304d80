"""Helpers for the money tests (imported by name; conftest fixtures use them too).

A settable clock, request builders for ``money.spend`` and small readers, so
each test states its traffic and its hand-computed expectations plainly.
"""

from __future__ import annotations

import datetime as dt
from decimal import Decimal
from pathlib import Path

from policy.compile import load
from policy.decide import Request
from policy.model import Policy
from policy.pricing import Usage
from sidecar.ledger import Clock, Ledger

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
POLICY_FILE = HERE / "money.spend"
PERIOD = "2026-11"
#: Mid-November: well inside the month, no late usage.
T0 = dt.datetime(2026, 11, 20, 12, 0, tzinfo=dt.UTC)


class FakeClock(Clock):
    """A clock the test sets (wall time; monotonic time moves with it)."""

    def __init__(self, wall: dt.datetime = T0) -> None:
        self.wall = wall
        self.mono = 10**12

    def now(self) -> dt.datetime:
        return self.wall

    def monotonic_ns(self) -> int:
        return self.mono

    def set(self, wall: dt.datetime) -> None:
        """Move the wall clock (and the monotonic one by the same amount)."""
        self.mono += max(int((wall - self.wall).total_seconds() * 1e9), 0)
        self.wall = wall


def load_policy() -> Policy:
    """The compiled ``money.spend``."""
    return load(POLICY_FILE)


def request(request_id: str, user: str, model: str = "m", *, org: str = "acme",
            at: dt.datetime = T0, tier: str = "standard", **usage: int) -> Request:
    """A chat request with the given usage fields."""
    return Request(request_id, org, user, "chat", model, Usage(**usage), at, service_tier=tier)


def record_many(ledger: Ledger, policy: Policy, prefix: str, count: int, user: str,
                model: str = "m", **usage: int) -> None:
    """Record ``count`` identical requests."""
    for i in range(count):
        ledger.record(policy, request(f"{prefix}-{i}", user, model, **usage))


def usd(text: str) -> Decimal:
    """A Decimal from text (readable expected values)."""
    return Decimal(text)
