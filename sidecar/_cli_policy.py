"""The policy subcommands of ``spendkeeper``: ``check``, ``fmt``, ``test`` and ``price``.

Each is an ``add_*_arguments(parser)`` / ``run_*(args) -> int`` pair that
:mod:`sidecar.cli` registers. They only read policy files (and ``fmt``
rewrites them): no ledger, no network. Results go to stdout; diagnostics
and errors to stderr. Exit codes: 0 success, 1 problems found (policy
errors, files that need formatting, failing tests), 2 bad usage.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import difflib
import json
import os
import stat
import sys
import tempfile
from decimal import Decimal
from pathlib import Path
from typing import Any, NoReturn

from policy.compile import load, policy_files
from policy.errors import PolicyError, closest
from policy.fmt import FormatError, format_text
from policy.model import ATTO_PER_USD, Policy, RateTable
from policy.pricing import SERVICE_TIERS, SPEEDS, Cost, Line, Usage, price, resolve_model
from policy.testing import describe_decision, parse_count, parse_time, run_tests

__all__ = [
    "COUNT_OPTIONS", "add_check_arguments", "add_fmt_arguments", "add_price_arguments",
    "add_test_arguments",
    "run_check", "run_fmt", "run_price", "run_test",
]


def _out(text: str = "") -> None:
    print(text, file=sys.stdout)


def _err(text: str) -> None:
    print(text, file=sys.stderr)


def _plural(count: int, noun: str) -> str:
    return f"{count:,} {noun}{'' if count == 1 else 's'}"


def _load(paths: list[str]) -> Policy | None:
    """The policy at ``paths``, or None after printing every diagnostic."""
    try:
        return load(paths)
    except PolicyError as exc:
        _err(exc.render())
        return None


# ---------------------------------------------------------------- check
def add_check_arguments(parser: argparse.ArgumentParser) -> None:
    """``spendkeeper check PATH...``."""
    parser.add_argument("paths", nargs="+", metavar="PATH",
                        help=".spend files or directories (searched for *.spend)")


def run_check(args: argparse.Namespace) -> int:
    """Load and check the policy; print every diagnostic, or a one-line summary."""
    policy = _load(args.paths)
    if policy is None:
        return 1
    models = sum(len(table.canonical) for table in policy.rate_tables.values())
    _out(f"ok: {_plural(len(policy.files), 'file')}, {_plural(len(policy.orgs), 'org')}, "
         f"{_plural(models, 'model')}")
    return 0


# ---------------------------------------------------------------- fmt
def add_fmt_arguments(parser: argparse.ArgumentParser) -> None:
    """``spendkeeper fmt [--check] [--diff] PATH...``."""
    parser.add_argument("paths", nargs="+", metavar="PATH",
                        help=".spend files or directories; - formats stdin to stdout")
    parser.add_argument("--check", action="store_true",
                        help="write nothing; exit 1 listing the files that would change")
    parser.add_argument("--diff", action="store_true",
                        help="write nothing; print a unified diff of each change")


def _write_atomic(path: Path, text: str) -> None:
    """Replace ``path``'s content in one step: a crash leaves the old or the new file."""
    target = path.resolve()
    mode = stat.S_IMODE(target.stat().st_mode)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def _format(text: str, name: str) -> str | None:
    try:
        return format_text(text, name)
    except PolicyError as exc:
        _err(exc.render())
    except FormatError as exc:
        _err(f"error: {exc}")
    return None


def _fmt_stdin(args: argparse.Namespace) -> int:
    text = sys.stdin.read()
    result = _format(text, "<stdin>")
    if result is None:
        return 1
    if args.diff:
        sys.stdout.writelines(difflib.unified_diff(
            text.splitlines(True), result.splitlines(True), "<stdin>", "<stdin> (formatted)"))
    elif not args.check:
        sys.stdout.write(result)
    return 1 if args.check and result != text else 0


def run_fmt(args: argparse.Namespace) -> int:
    """Format each file; rewrite it unless ``--check`` or ``--diff``."""
    if args.paths == ["-"]:
        return _fmt_stdin(args)
    files = policy_files(args.paths)
    if not files:
        _err(f"error: no .spend files in {', '.join(args.paths)}")
        return 1
    errors = changed = 0
    for path in files:
        try:
            text = path.read_bytes().decode("utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            _err(f"error: cannot read {path}: {getattr(exc, 'strerror', None) or exc}")
            errors += 1
            continue
        result = _format(text, str(path))
        if result is None:
            errors += 1
            continue
        if result == text:
            continue
        changed += 1
        if args.diff:
            sys.stdout.writelines(difflib.unified_diff(
                text.splitlines(True), result.splitlines(True), str(path), f"{path} (formatted)"))
        if args.check:
            _out(f"would reformat {path}")
        elif not args.diff:
            _write_atomic(path, result)
            _out(f"reformatted {path}")
    unchanged = len(files) - changed - errors
    verb = "would be reformatted" if args.check or args.diff else "reformatted"
    _err(f"{_plural(changed, 'file')} {verb}, {unchanged:,} unchanged"
         + (f", {_plural(errors, 'error')}" if errors else ""))
    return 1 if errors or (args.check and changed) else 0


# ---------------------------------------------------------------- test
def add_test_arguments(parser: argparse.ArgumentParser) -> None:
    """``spendkeeper test PATH... [-v]``."""
    parser.add_argument("paths", nargs="+", metavar="PATH",
                        help=".spend files or directories holding the policy and its tests")
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="show the decision behind every passing test too")


def run_test(args: argparse.Namespace) -> int:
    """Run every policy test; exit 1 on any failure or when there are none."""
    policy = _load(args.paths)
    if policy is None:
        return 1
    results = run_tests(policy)
    if not results:
        _err(f"no tests found in {', '.join(args.paths)} (write test \"name\" {{ ... }} blocks)")
        return 1
    failed = 0
    for result in results:
        if result.passed:
            _out(f"PASS {result.location}: {result.name}")
            if args.verbose and result.decision is not None:
                _out(f"     {describe_decision(result.decision)}")
        else:
            failed += 1
            _out(f"FAIL {result.location}: {result.name}")
            _out(f"     {result.message}")
    _out(f"{len(results) - failed} passed, {failed} failed")
    return 1 if failed else 0


# ---------------------------------------------------------------- price
COUNT_OPTIONS = (
    ("--input", "input_tokens", "input tokens"),
    ("--output", "output_tokens", "output tokens"),
    ("--cache-write-5m", "cache_write_5m_tokens", "5-minute cache-write tokens"),
    ("--cache-write-1h", "cache_write_1h_tokens", "1-hour cache-write tokens"),
    ("--cache-read", "cache_read_tokens", "cache-read tokens"),
    ("--web-search", "web_search_requests", "web search requests"),
    ("--web-fetch", "web_fetch_requests", "web fetch requests"),
    ("--code-execution-seconds", "code_execution_seconds", "code execution seconds"),
)


def _count_arg(text: str) -> int:
    try:
        return parse_count(text)
    except (ValueError, IndexError):
        raise argparse.ArgumentTypeError(
            f"must be a whole number of zero or more (1000, 4,000 or 200k), not {text!r}"
        ) from None


def _time_arg(text: str) -> dt.datetime:
    try:
        return parse_time(text, naive_utc=True)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def add_price_arguments(parser: argparse.ArgumentParser) -> None:
    """``spendkeeper price --policy PATH --model M [usage...] [--json]``."""
    parser.add_argument("--policy", required=True, action="append", metavar="PATH",
                        help="policy file or directory (repeatable)")
    parser.add_argument("--model", required=True, help="model name or alias")
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--org", help="use this org's rate table")
    which.add_argument("--rates", metavar="NAME",
                       help="use this rate table (default: the only one)")
    for flag, dest, what in COUNT_OPTIONS:
        parser.add_argument(flag, dest=dest, type=_count_arg, default=0, metavar="N",
                            help=f"{what} (default 0)")
    parser.add_argument("--tier", choices=SERVICE_TIERS, default="standard",
                        help="service tier (default standard)")
    parser.add_argument("--speed", choices=SPEEDS, default="standard",
                        help="speed (default standard)")
    parser.add_argument("--geo", default="", metavar="REGION", help="data-residency region")
    parser.add_argument("--at", type=_time_arg, default=None, metavar="ISO-8601",
                        help="when the request is made (default now; no zone means UTC); "
                        "prices in force then apply")
    parser.add_argument("--json", action="store_true", help="print JSON with exact decimals")


def _fail(args: argparse.Namespace, message: str) -> NoReturn:
    """A usage error found after parsing: usage and message to stderr, exit 2."""
    parser: argparse.ArgumentParser = args.command_parser
    parser.error(message)


def _table(args: argparse.Namespace, policy: Policy) -> RateTable:
    if args.org is not None:
        org = policy.orgs.get(args.org)
        if org is None:
            hint = closest(args.org, policy.orgs)
            _fail(args, f'unknown org "{args.org}"' + (f"; did you mean {hint}?" if hint else ""))
        return org.rates
    if args.rates is not None:
        table = policy.rate_tables.get(args.rates)
        if table is None:
            hint = closest(args.rates, policy.rate_tables)
            _fail(args, f'unknown rate table "{args.rates}"'
                  + (f"; did you mean {hint}?" if hint else ""))
        return table
    if len(policy.rate_tables) == 1:
        return next(iter(policy.rate_tables.values()))
    names = ", ".join(sorted(policy.rate_tables)) or "none"
    _fail(args, f"the policy has {len(policy.rate_tables)} rate tables ({names}): "
          "choose one with --rates NAME or --org ORG")


def _exact_usd(atto: int) -> str:
    """Atto-USD as an exact decimal string without trailing zeros: ``10.5``."""
    sign = "-" if atto < 0 else ""
    whole, frac = divmod(abs(atto), ATTO_PER_USD)
    digits = f"{frac:018d}".rstrip("0")
    return f"{sign}{whole}.{digits}" if digits else f"{sign}{whole}"


def _plain(value: Decimal) -> str:
    text = format(value, "f")
    return text.rstrip("0").rstrip(".") if "." in text else text


def _notes(table: RateTable, args: argparse.Namespace, cost: Cost, at: dt.datetime) -> list[str]:
    model = table.models[cost.model]
    notes = []
    if cost.fallback:
        notes.append(f'model "{args.model}" is not in rate table "{table.name}": priced as '
                     f'its fallback "{cost.model}"')
    if model.retires is not None and at >= model.retires:
        notes.append(f'model "{model.name}" retired on {model.retires.date().isoformat()}: '
                     "Authorize denies it (MODEL_NOT_ALLOWED)")
    mods = {"batch": table.batch, "priority": table.speeds.get("priority"),
            "fast": table.speeds.get("fast")}
    for kind in {args.tier, args.speed} & mods.keys():
        mod = mods[kind]
        if mod is None or not mod.applies_to(model):
            effect = "Authorize denies it (MODEL_NOT_ALLOWED)" if kind == "fast" \
                else "standard prices apply"
            notes.append(f'rate table "{table.name}" prices no {kind} for "{model.name}": {effect}')
    if args.geo:
        geo = table.geos.get(args.geo)
        if geo is None or not geo.applies_to(model):
            notes.append(f'no geo "{args.geo}" modifier applies to "{model.name}": '
                         "standard prices apply")
    return notes


def _price_text(value: Decimal) -> str:
    """``$6``, ``$22.50``, ``$0.125``: whole dollars bare, else at least cents."""
    whole, _, frac = _plain(value).partition(".")
    return f"${int(whole):,}" + (f".{frac.ljust(2, '0')}" if frac else "")


def _unit(line: Line, table: RateTable) -> str:
    if not line.meter.startswith("tool:"):
        return f"{_price_text(line.unit_usd)} / MTok"
    rate = table.tools.get(line.meter.removeprefix("tool:"))
    if rate is None:
        return "not priced"
    per = f"{rate.per:,} {rate.unit}s" if rate.per != 1 else rate.unit
    return f"{_price_text(rate.usd)} / {per}"


def _report(args: argparse.Namespace, table: RateTable, cost: Cost,
            at: dt.datetime) -> dict[str, Any]:
    return {
        "model": cost.model, "priced": cost.priced, "cost_usd": _exact_usd(cost.atto),
        "cost_nanos": cost.nanos, "tier": cost.tier, "modifiers": list(cost.modifiers),
        "lines": [{"meter": line.meter, "quantity": line.quantity,
                   "unit_usd": _plain(line.unit_usd), "per": line.per,
                   "cost_usd": _exact_usd(line.atto), "free": line.free} for line in cost.lines],
        "rates": table.name, "requested_model": args.model, "fallback": cost.fallback,
        "service_tier": args.tier, "speed": args.speed, "geo": args.geo,
        "at": at.isoformat(), "notes": _notes(table, args, cost, at),
    }


def _display_usd(atto: int) -> str:
    """Exact dollars for people: thousands separators and at least two decimals."""
    whole, _, frac = _exact_usd(atto).partition(".")
    return f"${int(whole):,}.{frac.ljust(2, '0')}"


def _print_human(report: dict[str, Any], table: RateTable, cost: Cost) -> None:
    conditions = ", ".join(report["modifiers"]) or "standard prices"
    if cost.tier:
        conditions += f", prompt over {cost.tier:,} tokens"
    _out(f'{cost.model} in rate table "{table.name}" at {report["at"]}: {conditions}')
    rows = []
    for line in cost.lines:
        unit = "s" if line.meter == "tool:code_execution" else ""
        quantity = f"{line.quantity:,}{unit}" + (f" ({line.free:,} free)" if line.free else "")
        rows.append((line.meter, quantity, _unit(line, table), _display_usd(line.atto)))
    rows.append(("total", "", "", _display_usd(cost.atto)))
    headers = ("meter", "quantity", "unit price", "cost")
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:
        widths = [max(len(r[i]) for r in (headers, *rows)) for i in range(4)]
        for row in (headers, *rows):
            _out("  ".join((cell.ljust if i in (0, 2) else cell.rjust)(widths[i])
                           for i, cell in enumerate(row)).rstrip())
    else:
        grid = Table(*headers, box=None, pad_edge=False)
        for column in (1, 3):
            grid.columns[column].justify = "right"
        for row in rows:
            grid.add_row(*row)
        Console(file=sys.stdout, highlight=False, soft_wrap=True).print(grid)
    _out(f"exact cost: ${report['cost_usd']} USD")
    _out(f"enforcement cost: {cost.nanos:,} nano-USD (rounded up)")
    for note in report["notes"]:
        _out(f"note: {note}")


def run_price(args: argparse.Namespace) -> int:
    """Price one usage record and print the lines, the exact total and the nanos."""
    policy = _load(args.policy)
    if policy is None:
        return 1
    table = _table(args, policy)
    model, _fallback = resolve_model(table, args.model)
    if model is None:
        hint = closest(args.model, table.models)
        _fail(args, f'unknown model "{args.model}" in rate table "{table.name}"'
              + (f"; did you mean {hint}?" if hint else " (and it names no fallback)"))
    at = args.at if args.at is not None else dt.datetime.now(dt.UTC)
    usage = Usage(**{dest: getattr(args, dest) for _, dest, _ in COUNT_OPTIONS})
    cost = price(table, args.model, usage, at, service_tier=args.tier, speed=args.speed,
                 geo=args.geo)
    report = _report(args, table, cost, at)
    if args.json:
        _out(json.dumps(report, indent=2))
    else:
        _print_human(report, table, cost)
    return 0
