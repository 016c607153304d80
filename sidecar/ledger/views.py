"""Read-only views of the ledger: the month's spend per org, user type and user.

These back ``GetUsage``, ``spendkeeper usage`` and the metrics collector. They
read one LMDB snapshot, so every figure in a report is from the same instant.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

from policy.model import OrgPolicy, Policy
from policy.periods import month_bounds, period_key
from sidecar.ledger.core import Ledger
from sidecar.ledger.store import COUNTER, decode_key, iter_prefix

__all__ = ["UsageLine", "UsageReport", "usage_report"]


@dataclass(frozen=True, slots=True)
class UsageLine:
    """One scope's month: nano-USD spent and reserved against its limit."""

    level: str  # "org", "user_type", "user"
    scope: str  # org name, user type name or user id
    user_type: str
    spent: int
    reserved: int
    limit: int | None
    requests: int

    @property
    def remaining(self) -> int | None:
        """Headroom left, never negative; None when unlimited."""
        return None if self.limit is None else max(self.limit - self.spent - self.reserved, 0)

    @property
    def used_fraction(self) -> tuple[int, int] | None:
        """(spent + reserved, limit) for drawing a bar; None when unlimited."""
        return None if self.limit is None else (self.spent + self.reserved, self.limit)


@dataclass(frozen=True, slots=True)
class UsageReport:
    """An org's month: the org line, one per user type, one per user."""

    org: str
    period: str
    resets_at: dt.datetime
    org_line: UsageLine
    types: tuple[UsageLine, ...]
    users: tuple[UsageLine, ...]
    policy_version: str


def usage_report(ledger: Ledger, policy: Policy, org: OrgPolicy, period: str | None = None,
                 now: dt.datetime | None = None) -> UsageReport:
    """Every member's (and listed type's) spend in ``period`` (default: this month)."""
    when = now or ledger.clock.now()
    period = period or period_key(when, org.tz)
    resets = month_bounds(period, org.tz)[1]
    with ledger.read() as txn:
        def read(key: tuple[str, ...]) -> tuple[int, int, int]:
            return ledger.counter(txn, key)

        spent, reserved, count = read((period, "org", org.name))
        org_line = UsageLine("org", org.name, "", spent, reserved, org.limit, count)
        types = []
        for name in org.plan.user_types:
            spent, reserved, count = read((period, "type", org.name, name))
            types.append(UsageLine("user_type", name, name, spent, reserved,
                                   org.type_limits.get(name), count))
        users: dict[str, UsageLine] = {}
        for user, member in org.members.items():
            spent, reserved, count = read((period, "user", org.name, user))
            users[user] = UsageLine("user", user, member.user_type, spent, reserved,
                                    member.month_limit, count)
        for key, value in iter_prefix(txn, ledger.dbs["counters"], (period, "user", org.name)):
            user = decode_key(key, value[COUNTER.size:])[3]
            if user not in users:
                spent, reserved, count = COUNTER.unpack_from(value)
                found = org.member(user)
                users[user] = UsageLine("user", user, found.user_type if found else "",
                                        spent, reserved,
                                        found.month_limit if found else None, count)
    ordered = sorted(users.values(), key=lambda u: (-u.spent - u.reserved, u.scope))
    return UsageReport(org.name, period, resets, org_line, tuple(types), tuple(ordered),
                       policy.version)
