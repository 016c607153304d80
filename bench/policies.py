"""Policies the benchmarks serve: a small one for the hot path, a big one for loading.

``write_small`` is the in-process ledger benchmark's policy (one org "bench",
users ``user0``..``user99`` with $1M each, model "m1"), so nothing is ever
denied for lack of budget. ``write_big`` generates a policy set of ``members``
members and ``models`` models: one rate table file and one file per org of
up to 1,000 members, with a mix of member limits and user types.
"""

from __future__ import annotations

from pathlib import Path

from bench.ledger_bench import POLICY

__all__ = ["BIG_MEMBERS_PER_ORG", "big_request", "write_big", "write_small"]

BIG_MEMBERS_PER_ORG = 10_000


def write_small(directory: Path) -> Path:
    """The small policy in ``directory`` (created); returns the directory."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "bench.spend").write_text(POLICY, encoding="utf-8")
    return directory


def _rates(models: int) -> str:
    lines = ['rates "big" {']
    for m in range(models):
        cents = 100 + m  # $1.00 .. $1.99 per MTok input; output 5x
        lines.append(f'  model "model-{m:03d}" {{\n'
                     f"    input ${cents // 100}.{cents % 100:02d} / MTok\n"
                     f"    output ${5 * cents // 100}.{5 * cents % 100:02d} / MTok\n"
                     f"    cache_read $0.10 / MTok\n  }}")
    lines.append("}")
    lines.append('plan "big" {\n'
                 "  user_type chat { seat $20 / month  products chat, file_creation }\n"
                 "  user_type coder { seat $30 / month  products chat, file_creation, "
                 "claude_code }\n}")
    return "\n".join(lines) + "\n"


def _org(index: int, members: int) -> str:
    lines = [f'org "org{index}" {{', '  plan "big"  rates "big"',
             "  limit $100,000,000 / month",
             "  user_type chat limit $50,000,000 / month",
             "  user_type coder limit unlimited",
             "  default user limit $100,000 / month",
             "  default user_type chat"]
    for m in range(members):
        kind = "coder" if m % 3 == 0 else "chat"
        limit = f" limit ${1_000 + m:,} / month" if m % 2 == 0 else ""
        daily = " limit $500 / day" if m % 10 == 0 else ""
        lines.append(f'  member "member{m}@org{index}.example" {kind}{limit}{daily}')
    lines.append("}")
    return "\n".join(lines) + "\n"


def write_big(directory: Path, members: int = 10_000, models: int = 100) -> Path:
    """Generate the big policy set in ``directory`` (created); returns the directory."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "rates.spend").write_text(_rates(models), encoding="utf-8")
    index = 0
    left = members
    while left > 0:
        count = min(left, BIG_MEMBERS_PER_ORG)
        (directory / f"org{index:03d}.spend").write_text(_org(index, count), encoding="utf-8")
        left -= count
        index += 1
    return directory


def big_request(i: int) -> tuple[str, str, str]:
    """(org, user, model) of the ``i``-th request against the big policy (org0's members)."""
    return "org0", f"member{i % BIG_MEMBERS_PER_ORG}@org0.example", f"model-{i % 100:03d}"
