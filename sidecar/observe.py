"""What the servicer reports about each call, for metrics and the decision log.

The servicer calls an :class:`Observer` after every RPC; the Prometheus
metrics and the decision log implement it. Keeping this a small protocol keeps
``sidecar.service`` free of prometheus_client and of file I/O.
"""

from __future__ import annotations

from typing import Protocol

from policy.decide import Request
from sidecar.ledger import AuthorizeResult, RecordResult

__all__ = ["NullObserver", "Observer", "Observers"]


class Observer(Protocol):
    """Receives one call per finished RPC (must be cheap and never raise)."""

    def authorized(self, req: Request, result: AuthorizeResult, seconds: float) -> None:
        """An Authorize was answered (also for replays)."""

    def recorded(self, req: Request, result: RecordResult, seconds: float) -> None:
        """A Record was answered (``result.duplicate`` for replays)."""

    def released(self, released: bool, seconds: float) -> None:
        """A Release was answered."""

    def usage_read(self, seconds: float) -> None:
        """A GetUsage was answered."""

    def failed(self, rpc: str, code: str, seconds: float) -> None:
        """An RPC ended with a gRPC error status (``code`` is its name)."""


class NullObserver:
    """An observer that ignores everything."""

    def authorized(self, req: Request, result: AuthorizeResult, seconds: float) -> None:
        """Ignore."""

    def recorded(self, req: Request, result: RecordResult, seconds: float) -> None:
        """Ignore."""

    def released(self, released: bool, seconds: float) -> None:
        """Ignore."""

    def usage_read(self, seconds: float) -> None:
        """Ignore."""

    def failed(self, rpc: str, code: str, seconds: float) -> None:
        """Ignore."""


class Observers:
    """Fans each call out to several observers."""

    def __init__(self, *observers: Observer) -> None:
        self.observers = observers

    def authorized(self, req: Request, result: AuthorizeResult, seconds: float) -> None:
        """Tell every observer."""
        for obs in self.observers:
            obs.authorized(req, result, seconds)

    def recorded(self, req: Request, result: RecordResult, seconds: float) -> None:
        """Tell every observer."""
        for obs in self.observers:
            obs.recorded(req, result, seconds)

    def released(self, released: bool, seconds: float) -> None:
        """Tell every observer."""
        for obs in self.observers:
            obs.released(released, seconds)

    def usage_read(self, seconds: float) -> None:
        """Tell every observer."""
        for obs in self.observers:
            obs.usage_read(seconds)

    def failed(self, rpc: str, code: str, seconds: float) -> None:
        """Tell every observer."""
        for obs in self.observers:
            obs.failed(rpc, code, seconds)
