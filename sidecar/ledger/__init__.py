"""The ledger: where money is counted (LMDB-backed, gRPC-free).

The narrow interface the servicer uses — :meth:`Ledger.authorize`,
:meth:`Ledger.record`, :meth:`Ledger.release` and the usage views — is what a
future shared-store ledger (Redis-held global counters with local leases)
would implement too.
"""

from __future__ import annotations

from sidecar.ledger.core import (
    AuthorizeResult,
    Clock,
    Ledger,
    LevelView,
    RecordResult,
    SystemClock,
)
from sidecar.ledger.store import Conflict, LedgerError, LedgerFull, LedgerUnavailable

__all__ = [
    "AuthorizeResult", "Clock", "Conflict", "Ledger", "LedgerError", "LedgerFull",
    "LedgerUnavailable", "LevelView", "RecordResult", "SystemClock",
]
