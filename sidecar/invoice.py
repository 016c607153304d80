"""Monthly invoices from the ledger: seats, add-ons, usage per user and model, corrections.

:func:`build_invoice` reads one LMDB snapshot: the usage aggregates (exact
token totals per user, model, meter and price line), the user counters (who
was active), the corrections and the unpriced usage of an org's month.
:func:`render` writes it as JSON, CSV, Markdown or a plain-text report.

Rounding (SPEC section 3) is :data:`ROUNDING_RULE`: a line's amount is its
exact quantity times its unit price divided by the units the price is for,
computed as an exact fraction and rounded once, to the cent, half-up; every
subtotal and the total are sums of rounded lines. Nothing here uses a float.
"""

from __future__ import annotations

import csv
import datetime as dt
import io
import json
import math
from collections.abc import Iterator
from dataclasses import dataclass
from decimal import Decimal
from fractions import Fraction
from typing import Any

import lmdb

from policy.model import METERS, OrgPolicy, Policy
from policy.periods import month_bounds
from sidecar.ledger.adjust import Adjustment, scan_adjustments
from sidecar.ledger.core import Ledger
from sidecar.ledger.store import COUNTER, decode_key, encode_key, loads

__all__ = [
    "FORMATS", "ROUNDING_RULE", "Invoice", "SeatLine", "UnpricedLine", "UsageLine",
    "build_invoice", "exact_text", "render", "round_cents",
]

ROUNDING_RULE = ("Each line is its exact quantity times its unit price, divided by the units "
                 "the price is for, rounded once to the cent, half-up (half a cent rounds away "
                 "from zero); subtotals and the total are sums of rounded lines.")
FORMATS = ("text", "json", "csv", "md")
_CENT = Decimal("0.01")
_MTOK = 10**6
_METER_ORDER = {m: i for i, m in enumerate(METERS)}
_TOKEN_FIELDS = ("input_tokens", "output_tokens", "cache_write_5m_tokens",
                 "cache_write_1h_tokens", "cache_read_tokens", "web_search_requests",
                 "web_fetch_requests", "code_execution_seconds")


def round_cents(value: Fraction) -> Decimal:
    """``value`` USD rounded once to the cent, half-up (a tie rounds away from zero)."""
    cents = math.floor(abs(value) * 100 + Fraction(1, 2))
    return Decimal(-cents if value < 0 else cents).scaleb(-2).quantize(_CENT)


def exact_text(value: Fraction) -> str:
    """``value`` as an exact decimal when it terminates, else 18 decimals and ``...``."""
    den = value.denominator
    twos = fives = 0
    while den % 2 == 0:
        den, twos = den // 2, twos + 1
    while den % 5 == 0:
        den, fives = den // 5, fives + 1
    if den == 1:
        places = max(twos, fives)
        scaled = value.numerator * 10**places // value.denominator
        return format(Decimal(scaled).scaleb(-places).normalize(), "f")
    return format(Decimal(round(value * 10**18)).scaleb(-18), "f") + "..."


def usd(amount: Decimal) -> str:
    """Cents for people: ``-$1,234.50``."""
    return ("-" if amount < 0 else "") + f"${abs(amount):,.2f}"


@dataclass(frozen=True, slots=True)
class SeatLine:
    """Seat fees of one user type (``kind="seat"``) or one add-on (``"addon"``)."""

    kind: str
    name: str
    unit_usd: Decimal
    users: tuple[str, ...]
    amount: Decimal

    @property
    def count(self) -> int:
        """How many seats."""
        return len(self.users)


@dataclass(frozen=True, slots=True)
class UsageLine:
    """One price line: a user's exact usage of a model's meter at one unit price."""

    user: str
    user_type: str
    model: str
    meter: str  # "input" ... "cache_read", or "tool:web_search"
    label: str  # "standard", "batch 50% off", "..., prompt > 200,000", "..., late"
    unit_usd: Decimal
    per: int  # the price is for this many units (10**6 tokens, 1000 requests, 3600 s)
    quantity: int
    free: int  # part of quantity covered by a free allowance (charged $0)
    requests: int
    exact: Fraction
    amount: Decimal

    @property
    def billable(self) -> int:
        """The quantity charged (quantity less the free allowance)."""
        return self.quantity - self.free

    @property
    def late(self) -> bool:
        """Usage that arrived after its month closed (shown as such)."""
        return "late" in self.label.split(", ")

    @property
    def fallback(self) -> bool:
        """Priced by the rate table's fallback model (the model asked for was unknown)."""
        return "fallback" in self.label.split(", ")

    @property
    def unit_text(self) -> str:
        """``$3 / MTok``, ``$10 / 1,000 requests``, ``$0.05 / 3,600 s``."""
        price = "$" + format(self.unit_usd.normalize(), "f")
        if self.meter in _METER_ORDER and self.per == _MTOK:
            return f"{price} / MTok"
        unit = "s" if self.meter == "tool:code_execution" else "requests"
        return f"{price} / {self.per:,} {unit}"


@dataclass(frozen=True, slots=True)
class UnpricedLine:
    """Usage the rate table could not price: listed, flagged, not charged."""

    user: str
    model: str
    why: str
    request_ids: tuple[str, ...]
    usage: dict[str, int]


@dataclass(frozen=True, slots=True)
class Invoice:
    """An org's invoice for one month."""

    org: str
    period: str
    timezone: str
    starts: dt.datetime
    ends: dt.datetime
    grace_closes: dt.datetime
    generated_at: dt.datetime
    policy_version: str
    seats: tuple[SeatLine, ...]
    usage: tuple[UsageLine, ...]
    corrections: tuple[tuple[Adjustment, Decimal], ...]
    unpriced: tuple[UnpricedLine, ...]
    non_members: tuple[str, ...]  # users with usage whom the policy does not know

    @property
    def final(self) -> bool:
        """False while late usage may still be added to this month."""
        return self.generated_at >= self.grace_closes

    def subtotal(self, section: str) -> Decimal:
        """Sum of rounded lines: "seat", "addon", "usage", "late", "corrections"."""
        if section in ("seat", "addon"):
            amounts = [s.amount for s in self.seats if s.kind == section]
        elif section == "corrections":
            amounts = [amount for _, amount in self.corrections]
        else:
            amounts = [u.amount for u in self.usage if section == "usage" or u.late]
        return sum(amounts, Decimal("0.00"))

    @property
    def total(self) -> Decimal:
        """Seats + add-ons + usage + corrections (all rounded lines)."""
        return sum((self.subtotal(s) for s in ("seat", "addon", "usage", "corrections")),
                   Decimal("0.00"))

    def user_totals(self) -> dict[str, Decimal]:
        """Each user's usage subtotal (sum of their rounded lines)."""
        totals: dict[str, Decimal] = {}
        for line in self.usage:
            totals[line.user] = totals.get(line.user, Decimal("0.00")) + line.amount
        return totals


def _scan(txn: lmdb.Transaction, db: Any, prefix: bytes) -> Iterator[tuple[bytes, bytes]]:
    cursor = txn.cursor(db=db)
    if not cursor.set_range(prefix):
        return
    for key, value in cursor:
        if not bytes(key).startswith(prefix):
            break
        yield bytes(key), bytes(value)


def _usage_line(parts: tuple[str, ...], value: bytes, org: OrgPolicy) -> UsageLine:
    _period, _org, user, model, meter, unit_text, per_text, label = parts
    quantity, free, count = COUNTER.unpack_from(value)
    unit, per = Decimal(unit_text), int(per_text)
    exact = Fraction(quantity - free) * Fraction(unit) / per
    member = org.member(user)
    return UsageLine(user, member.user_type if member else "", model, meter, label, unit, per,
                     quantity, free, count, exact, round_cents(exact))


def _line_order(line: UsageLine) -> tuple[Any, ...]:
    return (line.user, line.model, line.late, line.label,
            _METER_ORDER.get(line.meter, len(METERS)), line.meter, line.unit_usd)


def _seats(org: OrgPolicy, active: set[str]) -> tuple[list[SeatLine], list[str]]:
    by_type: dict[str, list[str]] = {name: [] for name in org.plan.user_types}
    for user, member in org.members.items():
        by_type.setdefault(member.user_type, []).append(user)
    strangers = []
    for user in sorted(active - set(org.members)):
        found = org.member(user)
        if found is None:
            strangers.append(user)
        else:
            by_type.setdefault(found.user_type, []).append(user)
    lines = []
    for name, users in by_type.items():
        type_def = org.plan.user_types.get(name)
        if users and type_def is not None:
            lines.append(SeatLine("seat", name, type_def.seat_usd, tuple(sorted(users)),
                                  round_cents(Fraction(type_def.seat_usd) * len(users))))
    for name, addon in org.plan.addons.items():
        users = sorted(u for u, m in org.members.items() if name in m.addons)
        if users:
            lines.append(SeatLine("addon", name, addon.seat_usd, tuple(users),
                                  round_cents(Fraction(addon.seat_usd) * len(users))))
    return lines, strangers


def _unpriced(entries: list[dict[str, Any]]) -> list[UnpricedLine]:
    groups: dict[tuple[str, str, str], tuple[list[str], dict[str, int]]] = {}
    for entry in entries:
        ids, sums = groups.setdefault((entry["user"], entry["model"], entry["why"]), ([], {}))
        ids.append(entry["id"])
        for name in _TOKEN_FIELDS:
            if entry["usage"].get(name):
                sums[name] = sums.get(name, 0) + entry["usage"][name]
    return [UnpricedLine(user, model, why, tuple(ids), sums)
            for (user, model, why), (ids, sums) in sorted(groups.items())]


def build_invoice(ledger: Ledger, policy: Policy, org: OrgPolicy, period: str,
                  now: dt.datetime | None = None) -> Invoice:
    """``org``'s invoice for ``period`` from one snapshot of the ledger."""
    starts, ends = month_bounds(period, org.tz)
    prefix = encode_key((period, org.name)) + b"\x1f"
    with ledger.read() as txn:
        usage = [_usage_line(decode_key(k, v[COUNTER.size:]), v, org)
                 for k, v in _scan(txn, ledger.dbs["usage"], prefix)]
        active = set()
        for key, value in _scan(txn, ledger.dbs["counters"],
                                encode_key((period, "user", org.name)) + b"\x1f"):
            if COUNTER.unpack_from(value)[2] > 0:
                active.add(decode_key(key, value[COUNTER.size:])[3])
        unpriced = [loads(v) for _, v in _scan(txn, ledger.dbs["unpriced"], prefix)]
        adjustments = scan_adjustments(txn, ledger, period, org.name)
    seats, strangers = _seats(org, active)
    return Invoice(org.name, period, org.timezone, starts, ends,
                   ends + dt.timedelta(days=org.grace_days), now or ledger.clock.now(),
                   policy.version, tuple(seats), tuple(sorted(usage, key=_line_order)),
                   tuple((a, round_cents(Fraction(a.amount))) for a in adjustments),
                   tuple(_unpriced(unpriced)), tuple(strangers))


# ---------------------------------------------------------------- output
def to_json(inv: Invoice) -> dict[str, Any]:
    """The invoice as JSON-ready data; money as exact decimal strings."""
    def money(amount: Decimal) -> str:
        return format(amount, "f")

    return {
        "org": inv.org, "period": inv.period, "timezone": inv.timezone, "currency": "USD",
        "starts": inv.starts.isoformat(), "ends": inv.ends.isoformat(),
        "late_usage_accepted_until": inv.grace_closes.isoformat(), "final": inv.final,
        "generated_at": inv.generated_at.isoformat(), "policy_version": inv.policy_version,
        "rounding": ROUNDING_RULE,
        "seats": [{"kind": s.kind, "name": s.name, "unit_usd": money(s.unit_usd),
                   "count": s.count, "users": list(s.users), "amount_usd": money(s.amount)}
                  for s in inv.seats],
        "usage": [{"user": u.user, "user_type": u.user_type, "model": u.model,
                   "meter": u.meter, "price_line": u.label, "unit_usd": money(u.unit_usd),
                   "per": u.per, "quantity": u.quantity, "free": u.free,
                   "billable": u.billable, "requests": u.requests,
                   "exact_usd": exact_text(u.exact), "amount_usd": money(u.amount),
                   "late": u.late, "fallback": u.fallback} for u in inv.usage],
        "users": [{"user": user, "amount_usd": money(amount)}
                  for user, amount in sorted(inv.user_totals().items())],
        "corrections": [{**adj.to_json(), "amount_usd": money(amount)}
                        for adj, amount in inv.corrections],
        "unpriced": [{"user": u.user, "model": u.model, "why": u.why, "charged": False,
                      "requests": len(u.request_ids), "request_ids": list(u.request_ids),
                      "usage": u.usage} for u in inv.unpriced],
        "non_members": list(inv.non_members),
        "totals": {"seats_usd": money(inv.subtotal("seat")),
                   "addons_usd": money(inv.subtotal("addon")),
                   "usage_usd": money(inv.subtotal("usage")),
                   "late_usage_usd": money(inv.subtotal("late")),
                   "corrections_usd": money(inv.subtotal("corrections")),
                   "total_usd": money(inv.total)},
    }


_CSV_COLUMNS = ("section", "user", "user_type", "model", "meter", "price_line", "unit_usd",
                "per", "quantity", "free", "billable", "requests", "amount_usd", "note")


def to_csv(inv: Invoice) -> str:
    """One row per invoice line (seats, usage, corrections, unpriced, totals)."""
    buf = io.StringIO()
    out = csv.writer(buf, lineterminator="\n")
    out.writerow(_CSV_COLUMNS)
    for s in inv.seats:
        out.writerow([s.kind, "", s.name if s.kind == "seat" else "", "", "", s.name,
                      s.unit_usd, 1, s.count, 0, s.count, "", s.amount, " ".join(s.users)])
    for u in inv.usage:
        note = "late" if u.late else ""
        out.writerow(["usage", u.user, u.user_type, u.model, u.meter, u.label, u.unit_usd,
                      u.per, u.quantity, u.free, u.billable, u.requests, u.amount, note])
    for adj, amount in inv.corrections:
        out.writerow(["correction", adj.user, adj.user_type, adj.model or "", "", adj.id,
                      adj.amount, "", "", "", "", "", amount, adj.reason])
    for line in inv.unpriced:
        tokens = " ".join(f"{k}={v}" for k, v in line.usage.items())
        out.writerow(["unpriced", line.user, "", line.model, "", line.why, "", "", "", "",
                      "", len(line.request_ids), "0.00", f"NOT CHARGED {tokens}".strip()])
    for name, section in (("seats", "seat"), ("addons", "addon"), ("usage", "usage"),
                          ("late usage (included in usage)", "late"),
                          ("corrections", "corrections")):
        out.writerow(["subtotal", *[""] * 11, inv.subtotal(section), name])
    out.writerow(["total", *[""] * 11, inv.total, ROUNDING_RULE])
    return buf.getvalue()


_Table = tuple[str, tuple[str, ...], list[tuple[str, ...]], frozenset[int]]


def _tables(inv: Invoice) -> list[_Table]:
    """(title, headers, rows, right-aligned columns) shared by text and Markdown."""
    def kind(seat: SeatLine) -> str:
        return "seat" if seat.kind == "seat" else "add-on"

    seats: list[tuple[str, ...]] = [(f"{kind(s)} {s.name}", usd(s.unit_usd), f"{s.count:,}",
                                     usd(s.amount)) for s in inv.seats]
    usage: list[tuple[str, ...]] = []
    totals = inv.user_totals()
    for i, u in enumerate(inv.usage):
        quantity = f"{u.quantity:,}" + (f" ({u.free:,} free at $0)" if u.free else "")
        label = u.label.upper() if u.late else u.label
        usage.append((u.user, u.user_type or "-", u.model, u.meter, label, u.unit_text,
                      quantity, f"{u.requests:,}", usd(u.amount)))
        if i + 1 == len(inv.usage) or inv.usage[i + 1].user != u.user:
            usage.append((f"subtotal {u.user}", "", "", "", "", "", "", "",
                          usd(totals[u.user])))
    corrections: list[tuple[str, ...]] = [
        (str(a.seq), a.user, a.model or "", a.reason, a.at.strftime("%Y-%m-%d"), usd(amount))
        for a, amount in inv.corrections]
    unpriced: list[tuple[str, ...]] = [
        (u.user, u.model, u.why, f"{len(u.request_ids):,}",
         ", ".join(f"{k} {v:,}" for k, v in u.usage.items()), "NOT CHARGED")
        for u in inv.unpriced]
    summary: list[tuple[str, ...]] = [
        ("seats", usd(inv.subtotal("seat"))), ("add-ons", usd(inv.subtotal("addon"))),
        ("usage", usd(inv.subtotal("usage"))),
        ("  of which late usage", usd(inv.subtotal("late"))),
        ("corrections", usd(inv.subtotal("corrections"))), ("TOTAL", usd(inv.total))]
    tables: list[_Table] = [
        ("Seats and add-ons", ("item", "unit price", "seats", "amount"), seats,
         frozenset({1, 2, 3})),
        ("Usage per user and model", ("user", "type", "model", "meter", "price line",
                                      "unit price", "quantity", "requests", "amount"),
         usage, frozenset({6, 7, 8})),
        ("Corrections", ("#", "user", "model", "reason", "date", "amount"), corrections,
         frozenset({5})),
    ]
    if unpriced:
        tables.append(("Unpriced usage (not charged; add prices to the rate table)",
                       ("user", "model", "why", "requests", "usage", "charged"), unpriced,
                       frozenset({3})))
    tables.append(("Totals", ("", "amount"), summary, frozenset({1})))
    return tables


def _heading(inv: Invoice) -> list[str]:
    last_day = (inv.ends.astimezone(inv.starts.tzinfo) - dt.timedelta(seconds=1)).date()
    status = ("final" if inv.final else
              f"provisional: late usage is accepted until {inv.grace_closes.isoformat()}")
    lines = [f"Invoice for {inv.org}, {inv.period} ({inv.starts.date()} to {last_day}, "
             f"time zone {inv.timezone}); amounts in USD",
             f"Status: {status}; policy version {inv.policy_version}; generated "
             f"{inv.generated_at.isoformat(timespec='seconds')}"]
    if inv.non_members:
        lines.append("Users with usage but no membership (no seat fee): "
                     + ", ".join(inv.non_members))
    return lines


def to_markdown(inv: Invoice) -> str:
    """The invoice as Markdown: a heading, one table per section, the rounding rule."""
    def cell(text: str) -> str:
        return text.replace("|", "\\|") or " "

    out = [f"# {_heading(inv)[0]}", "", *[f"{line}  " for line in _heading(inv)[1:]], ""]
    for title, headers, rows, right in _tables(inv):
        out += [f"## {title}", ""]
        if not rows:
            out += ["None.", ""]
            continue
        out.append("| " + " | ".join(cell(h) for h in headers) + " |")
        out.append("|" + "|".join("---:" if i in right else "---"
                                  for i in range(len(headers))) + "|")
        out += ["| " + " | ".join(cell(c) for c in row) + " |" for row in rows]
        out.append("")
    out += [f"Rounding: {ROUNDING_RULE}", ""]
    return "\n".join(out)


def to_text(inv: Invoice, width: int = 240) -> str:
    """The invoice as a plain-text report (rich tables, no colour)."""
    from rich import box
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    buf = io.StringIO()
    console = Console(file=buf, width=width, no_color=True, highlight=False, emoji=False,
                      markup=False, color_system=None)
    for line in _heading(inv):
        console.print(Text(line))
    for title, headers, rows, right in _tables(inv):
        console.print()
        if not rows:
            console.print(Text(f"{title}: none"))
            continue
        table = Table(title=title, title_justify="left", box=box.SIMPLE_HEAD)
        for i, header in enumerate(headers):
            table.add_column(Text(header), justify="right" if i in right else "left",
                             no_wrap=True)
        for row in rows:
            table.add_row(*(Text(c) for c in row))
        console.print(table)
    console.print(Text(f"Rounding: {ROUNDING_RULE}"), width=100)
    return "".join(line.rstrip() + "\n" for line in buf.getvalue().splitlines())


def render(inv: Invoice, fmt: str) -> str:
    """The invoice in ``fmt`` (one of :data:`FORMATS`)."""
    if fmt == "json":
        return json.dumps(to_json(inv), indent=2, ensure_ascii=False) + "\n"
    if fmt == "csv":
        return to_csv(inv)
    if fmt == "md":
        return to_markdown(inv)
    if fmt == "text":
        return to_text(inv)
    raise ValueError(f"unknown invoice format {fmt!r} (choose from {', '.join(FORMATS)})")
