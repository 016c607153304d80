"""Reconciliation: the ledger against a provider usage report and against Prometheus.

Three checks for one org and month, each listing every difference it finds:

* the provider's per-request usage report (CSV or JSON lines, in the
  provider's field names) against the ledger's journal, matched by request
  id: requests missing on either side, and per meter, model, user and
  service tier mismatches, grouped by user, model and day;
* Prometheus (``spendkeeper_spend_usd{org=...}`` through its HTTP query API)
  against the ledger's counters. Prometheus stores float64, so values are
  compared with a tolerance of :data:`TOLERANCE_USD`; the gauges describe the
  current month only, so other months are not compared;
* unpriced usage: recorded, never charged, to be priced by a rate-table fix.
"""

from __future__ import annotations

import csv
import dataclasses
import datetime as dt
import json
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any

from policy.model import OrgPolicy, Policy, nanos_to_usd
from policy.periods import day_key, period_key
from policy.pricing import resolve_model
from sidecar.ledger import store
from sidecar.ledger.core import Ledger
from sidecar.ledger.store import encode_key, loads
from sidecar.ledger.views import usage_report

__all__ = [
    "PROVIDER_FIELDS", "TOLERANCE_USD", "Difference", "ReconcileError", "ReconcileResult",
    "ReportLine", "compare_prometheus", "compare_report", "query_prometheus", "read_report",
    "reconcile",
]

#: Prometheus values are float64: differences up to this many USD are rounding.
TOLERANCE_USD = Decimal("0.000001")
#: Ledger usage field -> the provider report fields that carry it (first found wins).
PROVIDER_FIELDS: dict[str, tuple[str, ...]] = {
    "input_tokens": ("input_tokens",),
    "output_tokens": ("output_tokens",),
    "cache_write_5m_tokens": ("cache_creation.ephemeral_5m_input_tokens",),
    "cache_write_1h_tokens": ("cache_creation.ephemeral_1h_input_tokens",),
    "cache_read_tokens": ("cache_read_input_tokens",),
    "web_search_requests": ("server_tool_use.web_search_requests",),
    "web_fetch_requests": ("server_tool_use.web_fetch_requests",),
}
#: Without the 5m/1h split, cache writes are the provider's default 5-minute kind.
_CACHE_TOTAL = "cache_creation_input_tokens"


class ReconcileError(Exception):
    """An input could not be read (report file, Prometheus): nothing was compared."""


@dataclass(frozen=True, slots=True)
class Difference:
    """One disagreement between the ledger and another source."""

    source: str  # "provider" or "prometheus"
    kind: str  # missing_in_ledger, missing_in_report, tokens, model, user, service_tier, ...
    user: str = ""
    model: str = ""
    day: str = ""
    request_id: str = ""
    field: str = ""  # the usage field (input_tokens, ...), or the gauge's "level scope"
    ledger: str = ""
    other: str = ""
    note: str = ""


@dataclass(frozen=True, slots=True)
class ReportLine:
    """One request of the provider's report, in ledger terms."""

    line: int
    request_id: str
    user: str
    model: str
    tier: str
    at: dt.datetime | None
    usage: dict[str, int]


@dataclass
class ReconcileResult:
    """Everything one reconcile run found."""

    org: str
    period: str
    differences: list[Difference] = dataclasses.field(default_factory=list)
    unpriced: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    checked: dict[str, int] = dataclasses.field(default_factory=dict)
    notes: list[str] = dataclasses.field(default_factory=list)

    @property
    def clean(self) -> bool:
        """No difference and no unpriced usage."""
        return not self.differences and not self.unpriced

    def to_json(self) -> dict[str, Any]:
        """JSON-ready data."""
        return {"org": self.org, "period": self.period, "clean": self.clean,
                "checked": self.checked, "notes": self.notes,
                "differences": [asdict(d) for d in self.differences],
                "groups": groups(self.differences), "unpriced": self.unpriced}


# ---------------------------------------------------------------- provider report
def _flatten(value: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, item in value.items():
        name = f"{prefix}{key}"
        if isinstance(item, dict):
            flat.update(_flatten(item, name + "."))
        else:
            flat[name] = item
    return {k.removeprefix("usage."): v for k, v in flat.items()}


def _count(row: dict[str, Any], name: str, where: str) -> int:
    value = row.get(name)
    if value is None or value == "":
        return 0
    try:
        number = int(str(value).strip())
    except ValueError:
        raise ReconcileError(f"{where}: {name} is not a whole number ({value!r})") from None
    if number < 0:
        raise ReconcileError(f"{where}: {name} is negative ({number})")
    return number


def _when(value: Any, where: str) -> dt.datetime | None:
    if value is None or value == "":
        return None
    try:
        if isinstance(value, int | float) or str(value).replace(".", "", 1).isdigit():
            return dt.datetime.fromtimestamp(float(value), dt.UTC)
        when = dt.datetime.fromisoformat(str(value).strip())
    except (ValueError, OverflowError):
        raise ReconcileError(f"{where}: timestamp {value!r} is not ISO 8601") from None
    return when if when.tzinfo is not None else when.replace(tzinfo=dt.UTC)


def _line(row: dict[str, Any], where: str, number: int) -> ReportLine:
    request_id = str(row.get("request_id") or row.get("id") or "").strip()
    if not request_id:
        raise ReconcileError(f"{where}: no request_id (or id)")
    split = any(row.get(f) not in (None, "") for f in PROVIDER_FIELDS["cache_write_5m_tokens"]
                + PROVIDER_FIELDS["cache_write_1h_tokens"])
    usage = {name: _count(row, sources[0], where) for name, sources in PROVIDER_FIELDS.items()}
    if not split:
        usage["cache_write_5m_tokens"] = _count(row, _CACHE_TOTAL, where)
    return ReportLine(number, request_id, str(row.get("user") or ""), str(row.get("model") or ""),
                      str(row.get("service_tier") or "").strip().lower(),
                      _when(row.get("timestamp"), where), usage)


def read_report(path: Path) -> tuple[list[ReportLine], set[str]]:
    """The report's lines and the usage fields it carries (only those are compared).

    ``.csv`` (dotted headers for nested fields), ``.json`` (an array of objects)
    or JSON lines (anything else); nested objects are flattened with dots.
    """
    rows: list[tuple[int, dict[str, Any]]] = []
    try:
        # utf-8-sig: spreadsheet exports often start with a byte-order mark.
        with path.open(encoding="utf-8-sig", newline="") as handle:
            if path.suffix.lower() == ".csv":
                reader = csv.DictReader(handle)
                rows = [(i + 2, _flatten(dict(r))) for i, r in enumerate(reader)]
            elif path.suffix.lower() == ".json":  # one array of objects
                items = json.load(handle)
                if not isinstance(items, list) or not all(isinstance(i, dict) for i in items):
                    raise ReconcileError(f"{path}: expected a JSON array of objects")
                rows = [(i + 1, _flatten(item)) for i, item in enumerate(items)]
            else:  # JSON lines
                for number, text in enumerate(handle, 1):
                    if text.strip():
                        item = json.loads(text)
                        if not isinstance(item, dict):
                            raise ReconcileError(f"{path}:{number}: not a JSON object")
                        rows.append((number, _flatten(item)))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, csv.Error) as exc:
        raise ReconcileError(f"cannot read provider report {path}: {exc}") from None
    present = {name for name, sources in PROVIDER_FIELDS.items()
               if any(s in row for _, row in rows for s in sources)}
    if any(_CACHE_TOTAL in row for _, row in rows):
        present.add("cache_write_5m_tokens")
    lines = [_line(row, f"{path}:{number}", number) for number, row in rows]
    return lines, present


def _same_model(org: OrgPolicy, a: str, b: str) -> bool:
    if a == b:
        return True
    left, fell_a = resolve_model(org.rates, a)
    right, fell_b = resolve_model(org.rates, b)
    return left is not None and left is right and not fell_a and not fell_b


def compare_report(org: OrgPolicy, period: str, journal: list[dict[str, Any]],
                   report: list[ReportLine], meters: set[str],
                   settled_in: Callable[[str], str | None]) -> tuple[list[Difference], int]:
    """Differences between the journal and the report; also how many lines lay outside."""
    diffs: list[Difference] = []
    by_id = {entry["id"]: entry for entry in journal}
    seen: set[str] = set()
    outside = 0
    for line in report:
        day = day_key(line.at, org.tz) if line.at else ""
        base = {"user": line.user, "model": line.model, "day": day,
                "request_id": line.request_id}
        if line.request_id in seen:
            diffs.append(Difference("provider", "duplicate_in_report", **base,
                                    note=f"line {line.line} repeats the request"))
            continue
        seen.add(line.request_id)
        entry = by_id.get(line.request_id)
        if entry is None:
            if line.at is not None and period_key(line.at, org.tz) != period:
                outside += 1
                continue
            other = settled_in(line.request_id)
            kind, note = (("other_period", f"recorded in {other} (late usage)") if other
                          else ("missing_in_ledger", "never recorded by the sidecar"))
            diffs.append(Difference("provider", kind, **base, note=note))
            continue
        at = dt.datetime.fromisoformat(entry["at"])
        base.update(user=entry["user"], model=entry["model"], day=day_key(at, org.tz))
        for name in sorted(meters):
            ours, theirs = entry["usage"].get(name, 0), line.usage.get(name, 0)
            if ours != theirs:
                diffs.append(Difference("provider", "tokens", **base, field=name,
                                        ledger=str(ours), other=str(theirs),
                                        note=f"{theirs - ours:+,} in the report"))
        if line.model and not _same_model(org, entry["model"], line.model):
            diffs.append(Difference("provider", "model", **base, field="model",
                                    ledger=entry["model"], other=line.model))
        if line.user and line.user != entry["user"]:
            diffs.append(Difference("provider", "user", **base, field="user",
                                    ledger=entry["user"], other=line.user))
        if line.tier and line.tier != entry["tier"]:
            diffs.append(Difference("provider", "service_tier", **base, field="service_tier",
                                    ledger=entry["tier"], other=line.tier))
    for entry in journal:
        if entry["id"] not in seen:
            at = dt.datetime.fromisoformat(entry["at"])
            note = "not in the provider's report"
            if entry.get("late") and period_key(at, org.tz) != period:
                note += f" (late usage from {period_key(at, org.tz)}, counted in {period})"
            diffs.append(Difference("provider", "missing_in_report", entry["user"],
                                    entry["model"], day_key(at, org.tz), entry["id"], note=note))
    return diffs, outside


def groups(diffs: Iterable[Difference]) -> list[dict[str, Any]]:
    """Provider differences counted per user, model and day, with net token deltas."""
    table: dict[tuple[str, str, str], dict[str, Any]] = {}
    for d in diffs:
        if d.source != "provider":
            continue
        group = table.setdefault((d.user, d.model, d.day), {
            "user": d.user, "model": d.model, "day": d.day, "differences": 0, "net_tokens": {}})
        group["differences"] += 1
        if d.kind == "tokens":
            net = group["net_tokens"]
            net[d.field] = net.get(d.field, 0) + int(d.other) - int(d.ledger)
    return [table[k] for k in sorted(table)]


# ---------------------------------------------------------------- prometheus
def query_prometheus(base_url: str, org: str, timeout: float = 10.0,
                     ) -> list[tuple[dict[str, str], str]]:
    """``spendkeeper_spend_usd{org="..."}`` now: (labels, value text) per series."""
    if urllib.parse.urlsplit(base_url).scheme not in ("http", "https"):
        raise ReconcileError(f"--prometheus must be an http(s) URL, not {base_url!r}")
    escaped = org.replace("\\", "\\\\").replace('"', '\\"')
    query = urllib.parse.urlencode({"query": f'spendkeeper_spend_usd{{org="{escaped}"}}'})
    url = f"{base_url.rstrip('/')}/api/v1/query?{query}"
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            body = json.loads(response.read())
    except (OSError, ValueError, urllib.error.URLError) as exc:
        raise ReconcileError(f"cannot query Prometheus at {base_url}: {exc}") from None
    if body.get("status") != "success":
        raise ReconcileError(f"Prometheus answered {body.get('errorType')}: {body.get('error')}")
    return [(item["metric"], str(item["value"][1])) for item in body["data"]["result"]]


def compare_prometheus(expected: dict[tuple[str, str], int],
                       series: list[tuple[dict[str, str], str]],
                       users: dict[tuple[str, str], int]) -> list[Difference]:
    """The scraped spend of every (level, scope) against the ledger's exact nano-USD."""
    if any(labels.get("level") == "user" for labels, _ in series):
        expected = {**expected, **users}
    diffs: list[Difference] = []
    seen: set[tuple[str, str]] = set()
    for labels, text in series:
        key = (labels.get("level", ""), labels.get("scope", ""))
        where = f"{key[0]} {key[1]}"
        instance = labels.get("instance", "")
        if key not in expected:
            diffs.append(Difference("prometheus", "not_in_ledger", field=where, other=text,
                                    note=f"series of {instance or 'an unknown target'}"))
            continue
        seen.add(key)
        ours = nanos_to_usd(expected[key])
        try:
            theirs = Decimal(text)
            off = not theirs.is_finite() or abs(theirs - ours) > TOLERANCE_USD
        except InvalidOperation:
            off = True
        if off:
            diffs.append(Difference("prometheus", "value", field=where, ledger=format(ours, "f"),
                                    other=text, note=f"scraped from {instance}".strip()))
    for key in sorted(set(expected) - seen):
        diffs.append(Difference("prometheus", "missing_in_prometheus", field=f"{key[0]} {key[1]}",
                                ledger=format(nanos_to_usd(expected[key]), "f")))
    return diffs


# ---------------------------------------------------------------- the run
def _prefixed(ledger: Ledger, db: str, prefix: bytes) -> list[dict[str, Any]]:
    with ledger.read() as txn:
        cursor = txn.cursor(db=ledger.dbs[db])
        rows: list[dict[str, Any]] = []
        if cursor.set_range(prefix):
            for key, value in cursor:
                if not bytes(key).startswith(prefix):
                    break
                rows.append(loads(value))
        return rows


def _settled_in(ledger: Ledger) -> Callable[[str], str | None]:
    """The period a request id was settled in, from the requests database."""
    def lookup(request_id: str) -> str | None:
        with ledger.read() as txn:
            raw = txn.get(request_id.encode(), db=ledger.dbs["requests"])
        if raw is None:
            return None
        data = bytes(raw)
        entry = loads(data) if data[:1] == b"{" else store.unpack_entry(data)
        rec = entry.get("rec")
        return str(rec.get("p")) if isinstance(rec, dict) and rec.get("p") else None
    return lookup


def reconcile(ledger: Ledger, policy: Policy, org: OrgPolicy, period: str, *,
              report: Path | None = None, prometheus: str | None = None,
              now: dt.datetime | None = None) -> ReconcileResult:
    """Run every check that has an input; raise :class:`ReconcileError` if one cannot run."""
    result = ReconcileResult(org.name, period)
    prefix = encode_key((period, org.name)) + b"\x1f"
    journal = _prefixed(ledger, "journal", prefix)
    result.checked["ledger_records"] = len(journal)
    if report is not None:
        lines, meters = read_report(report)
        diffs, outside = compare_report(org, period, journal, lines, meters, _settled_in(ledger))
        result.differences += diffs
        result.checked.update(report_lines=len(lines), report_lines_outside_period=outside)
        result.notes.append("provider report: compared " + (", ".join(sorted(meters)) or
                                                            "no usage fields") + " per request")
    if prometheus is not None:
        current = period_key(now or ledger.clock.now(), org.tz)
        if period != current:
            result.notes.append(f"Prometheus not compared: spendkeeper_spend_usd describes the "
                                f"current month ({current}) only")
        else:
            series = query_prometheus(prometheus, org.name)
            usage = usage_report(ledger, policy, org, period)
            expected = {(line.level, line.scope): line.spent
                        for line in (usage.org_line, *usage.types)}
            users = {("user", line.scope): line.spent for line in usage.users}
            result.differences += compare_prometheus(expected, series, users)
            result.checked["prometheus_series"] = len(series)
            result.notes.append(f"Prometheus: float64 values compared with the ledger's exact "
                                f"figures within {TOLERANCE_USD} USD")
    result.unpriced = _prefixed(ledger, "unpriced", prefix)
    result.checked["unpriced_records"] = len(result.unpriced)
    return result


def render_text(result: ReconcileResult, width: int = 240) -> str:
    """A plain-text report: differences by source (provider ones by user/model/day)."""
    import io

    from rich import box
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    buf = io.StringIO()
    console = Console(file=buf, width=width, no_color=True, highlight=False, markup=False,
                      emoji=False, color_system=None)

    def table(title: str, headers: tuple[str, ...], rows: Iterable[Iterable[str]]) -> None:
        grid = Table(*headers, title=title, title_justify="left", box=box.SIMPLE_HEAD)
        for column in grid.columns:
            column.no_wrap = True
        for row in rows:
            grid.add_row(*(Text(cell) for cell in row))
        console.print(grid)

    console.print(Text(f"Reconciliation of {result.org}, {result.period}: "
                       + ", ".join(f"{k.replace('_', ' ')} {v:,}"
                                   for k, v in result.checked.items())))
    for note in result.notes:
        console.print(Text(f"note: {note}"))
    ordered = sorted(result.differences, key=lambda d: (d.source, d.user, d.model, d.day,
                                                        d.request_id, d.field))
    if ordered:
        table("Differences", ("source", "kind", "user", "model", "day", "request id", "field",
                              "ledger", "other", "note"),
              ((d.source, d.kind, d.user, d.model, d.day, d.request_id, d.field, d.ledger,
                d.other, d.note) for d in ordered))
    summary = groups(ordered)
    if summary:
        table("Provider differences by user, model and day",
              ("user", "model", "day", "differences", "net tokens (report - ledger)"),
              ((g["user"], g["model"], g["day"], str(g["differences"]),
                ", ".join(f"{k} {v:+,}" for k, v in g["net_tokens"].items()))
               for g in summary))
    if result.unpriced:
        table("Unpriced usage (recorded, not charged)", ("request id", "user", "model", "why",
                                                         "at"),
              ((str(e.get(k, "")) for k in ("id", "user", "model", "why", "at"))
               for e in result.unpriced))
    verdict = ("no differences" if result.clean else
               f"{len(result.differences):,} difference(s), "
               f"{len(result.unpriced):,} unpriced record(s)")
    console.print(Text(f"Result: {verdict}"))
    return "".join(line.rstrip() + "\n" for line in buf.getvalue().splitlines())
