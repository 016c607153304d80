"""Golden files for the policy language: ``golden/*.spend`` in, exact text out.

Each ``golden/NAME.spend`` is loaded on its own (the policy directory is
``golden/``; helper files for includes live in ``golden/inc/``) and the result
is compared with ``golden/NAME.expected``: the exact rendered error text for a
policy that fails to load, or a short deterministic dump of the compiled model
(:func:`dump`) for a valid one. To accept new output after a deliberate
change, run with ``SPEND_GOLDEN_UPDATE=1`` and review the diff.
"""

from __future__ import annotations

import os
from decimal import Decimal
from pathlib import Path

import pytest

from policy.compile import load
from policy.errors import PolicyError
from policy.model import METERS, Multiplier, Policy, PriceSheet, RateTable

GOLDEN = Path(__file__).resolve().parent / "golden"
CASES = sorted(p.name for p in GOLDEN.glob("*.spend"))
_UPDATE = os.environ.get("SPEND_GOLDEN_UPDATE") == "1"


def _usd_nanos(nanos: int | None) -> str:
    return "unlimited" if nanos is None else f"${Decimal(nanos) / 10**9:f}"


def _sheet(sheet: PriceSheet) -> str:
    return " ".join(f"{m}=${u:f}" for m, u in zip(METERS, sheet.usd_per_mtok, strict=True))


def _mod(mod: Multiplier) -> str:
    scope = "all models"
    if mod.models is not None:
        scope = "models " + ", ".join(sorted(mod.models))
    elif mod.released_since is not None:
        scope = f"models released >= {mod.released_since}"
    region = f" {mod.region}" if mod.region else ""
    return f"{mod.kind}{region} x{mod.factor:f} for {scope}"


def _table(table: RateTable) -> list[str]:
    out = [f"rates {table.name}: {len(table.canonical)} models"]
    for name in table.canonical:
        model = table.models[name]
        head = f"  model {name}"
        if model.aliases:
            head += " alias " + ", ".join(model.aliases)
        if model.released:
            head += f" released {model.released}"
        if model.retires:
            head += f" retires {model.retires.isoformat()}"
        out.append(head)
        for period in model.periods:
            start = period.start.isoformat() if period.start else "start"
            out.append(f"    from {start}: {_sheet(period.base)}")
            out.extend(f"      prompt > {threshold}: {_sheet(sheet)}"
                       for threshold, sheet in period.tiers)
    mods = [table.batch, *(table.speeds[k] for k in sorted(table.speeds)),
            *(table.geos[k] for k in sorted(table.geos))]
    out.extend(f"  {_mod(m)}" for m in mods if m is not None)
    for name in sorted(table.tools):
        tool = table.tools[name]
        out.append(f"  tool {name} ${tool.usd:f} per {tool.per} {tool.unit} "
                   f"(usage unit {tool.seconds_per_unit}s, free {tool.free_per_month})")
    if table.fallback:
        out.append(f"  fallback {table.fallback}")
    return out


def dump(policy: Policy) -> str:
    """A compiled policy as stable text: tables, plans, orgs, tests."""
    out: list[str] = []
    for name in sorted(policy.rate_tables):
        out.extend(_table(policy.rate_tables[name]))
    for name in sorted(policy.plans):
        plan = policy.plans[name]
        out.append(f"plan {name}")
        for t in plan.user_types.values():
            out.append(f"  user_type {t.name} seat ${t.seat_usd:f} products "
                       + ", ".join(sorted(t.products)))
        for a in plan.addons.values():
            out.append(f"  addon {a.name} seat ${a.seat_usd:f} for "
                       + ", ".join(sorted(a.for_types)))
    for name in sorted(policy.orgs):
        org = policy.orgs[name]
        out.append(f"org {name} plan {org.plan.name} rates {org.rates.name} "
                   f"timezone {org.timezone} limit {_usd_nanos(org.limit)}")
        if org.thresholds:
            out.append("  notify at " + ", ".join(f"{t:f}%" for t in org.thresholds)
                       + (f" webhook {org.webhook}" if org.webhook else ""))
        for user_type in sorted(org.type_limits):
            out.append(f"  user_type {user_type} limit {_usd_nanos(org.type_limits[user_type])}")
        out.append(f"  default user limit {_usd_nanos(org.default_user_limit)} "
                   f"user_type {org.default_user_type or '-'}")
        for member in org.members.values():
            line = f"  member {member.user} {member.user_type}"
            if member.addons:
                line += " +" + " +".join(member.addons)
            line += f" month {_usd_nanos(member.month_limit)}"
            if member.day_limit is not None:
                line += f" day {_usd_nanos(member.day_limit)}"
            out.append(line)
        out.append(f"  shadow {org.shadow} per_user_metrics {org.per_user_metrics} "
                   f"late_usage grace {org.grace_days} days")
    out.append(f"tests: {len(policy.tests)}")
    return "\n".join(out)


def render_case(name: str) -> str:
    """What a golden file compiles to: the model dump or the error text."""
    try:
        policy = load(name)
    except PolicyError as exc:
        return exc.render() + "\n"
    return dump(policy) + "\n"


def test_every_golden_file_has_an_expected_file() -> None:
    """Each golden policy is paired with its expected output (no orphans either way)."""
    spends = {p.stem for p in GOLDEN.glob("*.spend")}
    expected = {p.stem for p in GOLDEN.glob("*.expected")}
    assert spends, "no golden files found"
    assert spends == expected


@pytest.mark.parametrize("name", CASES)
def test_golden(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The policy compiles to exactly the dump, or fails with exactly the errors, on file."""
    monkeypatch.chdir(GOLDEN)  # file names in messages are relative to the cwd
    got = render_case(name)
    expected_path = GOLDEN / (name.removesuffix(".spend") + ".expected")
    if _UPDATE:
        expected_path.write_text(got, encoding="utf-8")
    assert got == expected_path.read_text(encoding="utf-8")
