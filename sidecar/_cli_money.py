"""The money subcommands of ``spendkeeper``: ``usage``, ``adjust``, ``invoice``, ``reconcile``.

Each opens the sidecar's LMDB ledger (safe while sidecars serve it: LMDB
readers never block writers) and the policy it serves. ``usage``,
``invoice`` and ``reconcile`` only read; ``adjust`` appends a correction and
fsyncs it before it reports success. Exit codes: 0 success, 1 ``reconcile``
found differences or unpriced usage, 2 the command could not run (bad
arguments, unknown org, no ledger, a broken policy, an unreadable input).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

from policy.model import usd_text
from sidecar._command import Command

if TYPE_CHECKING:
    from collections.abc import Callable

    from policy.model import OrgPolicy, Policy
    from sidecar.ledger import Ledger
    from sidecar.ledger.views import UsageLine

    #: A command's body, run with the opened policy, org and ledger.
    Body = Callable[[argparse.Namespace, Policy, OrgPolicy, Ledger], int]

__all__ = ["COMMANDS"]


class _Fail(Exception):
    """Stop the command: print the message to stderr and exit with ``code``."""

    def __init__(self, message: str, code: int = 2) -> None:
        super().__init__(message)
        self.code = code


def _common(parser: argparse.ArgumentParser, period_required: bool = True) -> None:
    parser.add_argument("--data-dir", type=Path,
                        default=Path(os.environ.get("SPENDKEEPER_DATA_DIR", "data")),
                        help="the sidecar's LMDB data directory (default: $SPENDKEEPER_DATA_DIR "
                             "or ./data)")
    parser.add_argument("--policy", default=os.environ.get("SPENDKEEPER_POLICY", "examples"),
                        help="the policy file or directory the sidecar serves (default: "
                             "$SPENDKEEPER_POLICY or examples)")
    parser.add_argument("--org", required=True, help="the organisation")
    parser.add_argument("--period", required=period_required,
                        help="the month, e.g. 2026-11" + ("" if period_required else
                                                          " (default: the current month)"))


def _open(args: argparse.Namespace) -> tuple[Policy, OrgPolicy, Ledger]:
    """The policy, the org and the ledger named by the arguments (or :class:`_Fail`)."""
    from policy.compile import load
    from policy.errors import PolicyError, closest
    from policy.periods import parse_period
    from sidecar.ledger import Ledger

    try:
        policy = load(args.policy)
    except PolicyError as exc:
        raise _Fail(exc.render()) from None
    org = policy.orgs.get(args.org)
    if org is None:
        hint = closest(args.org, policy.orgs)
        raise _Fail(f'unknown org "{args.org}" in {args.policy}'
                    + (f"; did you mean {hint}?" if hint else ""))
    if args.period:
        try:
            parse_period(args.period)
        except ValueError as exc:
            raise _Fail(f"--period: {exc}") from None
    if not (args.data_dir / "data.mdb").is_file():
        raise _Fail(f"no ledger in {args.data_dir} (data.mdb not found); pass the sidecar's "
                    "--data-dir")
    return policy, org, Ledger(args.data_dir, durable=False)


def _run(body: Body, args: argparse.Namespace) -> int:
    """Run ``body(args, policy, org, ledger)``; map :class:`_Fail` and ledger errors."""
    from sidecar.ledger import LedgerError

    try:
        policy, org, ledger = _open(args)
    except _Fail as exc:
        print(f"spendkeeper {args.command}: {exc}", file=sys.stderr)
        return exc.code
    try:
        return body(args, policy, org, ledger)
    except _Fail as exc:
        print(f"spendkeeper {args.command}: {exc}", file=sys.stderr)
        return exc.code
    except LedgerError as exc:
        print(f"spendkeeper {args.command}: {exc}", file=sys.stderr)
        return 2
    finally:
        ledger.close()


def _usd(nanos: int | None) -> str | None:
    return None if nanos is None else usd_text(nanos)


def _console() -> Any:
    from rich.console import Console

    return Console(file=sys.stdout, highlight=False, emoji=False,
                   width=None if sys.stdout.isatty() else 132)


# ---------------------------------------------------------------- usage
def _add_usage(parser: argparse.ArgumentParser) -> None:
    _common(parser, period_required=False)
    parser.add_argument("--user", help="show only this member")
    parser.add_argument("--json", action="store_true", help="machine-readable output")


def _line_json(line: UsageLine) -> dict[str, Any]:
    return {"level": line.level, "scope": line.scope, "user_type": line.user_type,
            "spent_usd": _usd(line.spent), "reserved_usd": _usd(line.reserved),
            "limit_usd": _usd(line.limit), "remaining_usd": _usd(line.remaining),
            "requests": line.requests}


def _bar(line: UsageLine, width: int = 20) -> Any:
    """A bar of spent+reserved against the limit, coloured by how close it is."""
    from rich.text import Text

    if line.limit is None:
        return Text("unlimited", style="dim")
    used = line.spent + line.reserved
    share = 1.0 if line.limit <= 0 else min(max(used / line.limit, 0.0), 1.0)
    filled = round(share * width)
    style = "red" if used >= line.limit else "yellow" if share >= 0.8 else "green"
    percent = used * 100 // line.limit if line.limit > 0 else 100
    return Text("█" * filled, style=style) + Text("░" * (width - filled)) + Text(f" {percent}%")


def _money_cell(nanos: int | None) -> str:
    if nanos is None:
        return "-"
    from decimal import Decimal

    amount = Decimal(nanos).scaleb(-9)
    return ("-" if amount < 0 else "") + f"${abs(amount):,.2f}"


def _usage_table(title: str, first: str, lines: list[UsageLine], with_type: bool) -> Any:
    from rich import box
    from rich.table import Table
    from rich.text import Text

    headers = (first, *(("type",) if with_type else ()), "spent", "reserved", "limit",
               "remaining", "used", "requests")
    table = Table(*headers, title=title, title_justify="left", box=box.SIMPLE_HEAD)
    for column in table.columns:
        column.no_wrap = True
        if column.header in ("spent", "reserved", "limit", "remaining", "requests"):
            column.justify = "right"
    for line in lines:
        kind = (Text(line.user_type or "-"),) if with_type else ()
        table.add_row(Text(line.scope), *kind, _money_cell(line.spent),
                      _money_cell(line.reserved),
                      "unlimited" if line.limit is None else _money_cell(line.limit),
                      "-" if line.limit is None else _money_cell(line.remaining),
                      _bar(line), f"{line.requests:,}")
    return table


def _usage(args: argparse.Namespace, policy: Policy, org: OrgPolicy, ledger: Ledger) -> int:
    from sidecar.ledger.views import usage_report

    report = usage_report(ledger, policy, org, args.period)
    users = [u for u in report.users if not args.user or u.scope == args.user]
    if args.user and not users:
        raise _Fail(f'no user "{args.user}" in org {org.name} ({report.period}): not a member '
                    "and no usage")
    if args.json:
        print(json.dumps({"org": report.org, "period": report.period,
                          "resets_at": report.resets_at.isoformat(),
                          "policy_version": report.policy_version,
                          "org_line": _line_json(report.org_line),
                          "user_types": [_line_json(t) for t in report.types],
                          "users": [_line_json(u) for u in users]}, indent=2))
        return 0
    console = _console()
    console.print(f"Spend of {report.org} in {report.period} (resets "
                  f"{report.resets_at.isoformat()}), policy {report.policy_version}",
                  markup=False)
    console.print(_usage_table("Members (by spend)", "user", users, True))
    if not args.user:
        console.print(_usage_table("User types", "user type", list(report.types), False))
        console.print(_usage_table("Organisation", "org", [report.org_line], False))
    return 0


# ---------------------------------------------------------------- adjust
def _add_adjust(parser: argparse.ArgumentParser) -> None:
    _common(parser)
    parser.add_argument("--user", required=True, help="the member the correction is for")
    parser.add_argument("--amount", required=True,
                        help="USD, exact: negative credits (-12.50), positive charges")
    parser.add_argument("--reason", required=True, help="why (shown on the invoice)")
    parser.add_argument("--model", help="the model the correction concerns, if any")
    parser.add_argument("--id", dest="adjustment_id",
                        help="an id that makes repeating the command safe (default: random)")
    parser.add_argument("--invoice-only", action="store_true",
                        help="change the invoice only; leave the enforcement counters alone")
    parser.add_argument("--json", action="store_true", help="print the stored entry as JSON")


def _adjust(args: argparse.Namespace, policy: Policy, org: OrgPolicy, ledger: Ledger) -> int:
    from sidecar.ledger import Conflict
    from sidecar.ledger.adjust import AdjustmentError, add_adjustment, parse_amount

    with ledger.read() as txn:
        active = ledger.counter(txn, (args.period, "user", org.name, args.user))[2] > 0
    if org.member(args.user) is None and not active:
        raise _Fail(f'unknown user "{args.user}": org {org.name} does not list them, has no '
                    f"default user type and saw no usage from them in {args.period}")
    try:
        entry, created = add_adjustment(
            ledger, org, user=args.user, period=args.period, amount=parse_amount(args.amount),
            reason=args.reason, model=args.model, adjustment_id=args.adjustment_id,
            counters=not args.invoice_only)
    except (AdjustmentError, Conflict) as exc:
        raise _Fail(str(exc)) from None
    if args.json:
        print(json.dumps({**entry.to_json(), "created": created}, indent=2))
        return 0
    sign = "credit" if entry.amount < 0 else "charge"
    if not created:
        print(f"correction {entry.id} (#{entry.seq}) was already recorded; nothing changed")
        return 0
    moved = ("the enforcement counters moved with it" if entry.counters
             else "invoice only: the enforcement counters did not move")
    print(f"recorded correction {entry.id} (#{entry.seq}): {sign} of "
          f"${abs(entry.amount):,} USD for {entry.user} in {org.name} {entry.period} "
          f"({entry.reason}); durable (fsync'd); {moved}")
    return 0


# ---------------------------------------------------------------- invoice
def _add_invoice(parser: argparse.ArgumentParser) -> None:
    from sidecar.invoice import FORMATS

    _common(parser)
    parser.add_argument("--format", choices=FORMATS, default="text",
                        help="output format (default: text)")
    parser.add_argument("--output", type=Path, help="write to this file instead of stdout")


def _write(path: Path, text: str) -> None:
    """Replace ``path`` atomically: readers see the old invoice or the new one."""
    folder = path.resolve().parent
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=folder)
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="") as handle:
            handle.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _invoice(args: argparse.Namespace, policy: Policy, org: OrgPolicy, ledger: Ledger) -> int:
    from sidecar.invoice import build_invoice, render

    text = render(build_invoice(ledger, policy, org, args.period), args.format)
    if args.output is None:
        sys.stdout.write(text)
        return 0
    try:
        _write(args.output, text)
    except OSError as exc:
        raise _Fail(f"cannot write {args.output}: {exc}") from None
    print(f"wrote the {args.format} invoice of {org.name} {args.period} to {args.output}",
          file=sys.stderr)
    return 0


# ---------------------------------------------------------------- reconcile
def _add_reconcile(parser: argparse.ArgumentParser) -> None:
    _common(parser)
    parser.add_argument("--provider-report", type=Path,
                        help="the provider's per-request usage report (.csv or .jsonl)")
    parser.add_argument("--prometheus", help="Prometheus base URL, e.g. http://127.0.0.1:9090")
    parser.add_argument("--json", action="store_true", help="machine-readable output")


def _reconcile(args: argparse.Namespace, policy: Policy, org: OrgPolicy, ledger: Ledger) -> int:
    from sidecar.reconcile import ReconcileError, reconcile, render_text

    try:
        result = reconcile(ledger, policy, org, args.period, report=args.provider_report,
                           prometheus=args.prometheus)
    except ReconcileError as exc:
        raise _Fail(str(exc)) from None
    if args.json:
        print(json.dumps(result.to_json(), indent=2, ensure_ascii=False))
    else:
        sys.stdout.write(render_text(result))
    return 0 if result.clean else 1


def _runner(body: Body) -> Callable[[argparse.Namespace], int]:
    def run(args: argparse.Namespace) -> int:
        return _run(body, args)
    return run


COMMANDS = [
    Command("usage", "each member's spend this month against their limit",
            _add_usage, _runner(_usage)),
    Command("adjust", "record a correction (credit or charge) as a new ledger entry",
            _add_adjust, _runner(_adjust)),
    Command("invoice", "write an org's monthly invoice (text, JSON, CSV or Markdown)",
            _add_invoice, _runner(_invoice)),
    Command("reconcile", "compare the ledger with a provider report and with Prometheus",
            _add_reconcile, _runner(_reconcile)),
]
