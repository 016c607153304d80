"""The operations subcommands of ``spendkeeper``: ``explain``, ``diff`` and ``replay``.

Each reads policy files and, optionally, a ledger (read-only: a running
sidecar may keep serving from it) and prints a human-readable report, or
JSON with ``--json`` (money as exact decimal USD strings). Exit codes: 0 the
report was printed (whatever the decision), 1 the policy or ledger could not
be read, 2 bad usage. The work is in :mod:`sidecar.explain`,
:mod:`sidecar.diff` and :mod:`sidecar.replay`; this module parses arguments
and prints.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import shutil
import sys
from pathlib import Path
from typing import Any, NoReturn

from policy.errors import PolicyError
from policy.model import Policy, format_usd
from policy.pricing import SERVICE_TIERS, SPEEDS, Usage
from policy.testing import parse_count, parse_time
from sidecar._cli_policy import COUNT_OPTIONS
from sidecar._command import Command

__all__ = ["COMMANDS"]

_COUNTS = COUNT_OPTIONS  # the same usage flags as `spendkeeper price`


def _out(text: str = "") -> None:
    print(text, file=sys.stdout)


def _fail(args: argparse.Namespace, message: str) -> NoReturn:
    parser: argparse.ArgumentParser = args.command_parser
    parser.error(message)


def _count(text: str) -> int:
    try:
        return parse_count(text)
    except (ValueError, IndexError):
        raise argparse.ArgumentTypeError(f"must be a whole number (1000, 4,000 or 200k), "
                                         f"not {text!r}") from None


def _when(text: str) -> dt.datetime:
    try:
        return parse_time(text, naive_utc=True)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _load(paths: list[str]) -> Policy | None:
    from policy.compile import load

    try:
        return load(paths)
    except PolicyError as exc:
        print(exc.render(), file=sys.stderr)
        return None


def _console() -> Any:
    from rich.console import Console

    width = max(shutil.get_terminal_size((160, 24)).columns, 100)
    # No markup or emoji: user ids and messages are printed as they are.
    return Console(file=sys.stdout, highlight=False, soft_wrap=True, width=width, markup=False,
                   emoji=False)


def _usd(nanos: int | None) -> str:
    return "unlimited" if nanos is None else format_usd(nanos)


def _open_reader(args: argparse.Namespace) -> Any:
    from sidecar.explain import LedgerReader

    try:
        return LedgerReader(args.data_dir)
    except (FileNotFoundError, OSError) as exc:
        print(f"spendkeeper {args.command}: {exc}", file=sys.stderr)
        return None


# ---------------------------------------------------------------- explain
def _add_explain(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--policy", required=True, action="append", metavar="PATH",
                        help="policy file or directory (repeatable)")
    parser.add_argument("--data-dir", metavar="DIR",
                        help="read counters from this ledger (default: all zero)")
    parser.add_argument("--json-request", metavar="FILE",
                        help="an AuthorizeRequest as JSON (proto field names; - for stdin)")
    for flag in ("--org", "--user", "--product", "--model"):
        parser.add_argument(flag)
    for flag, dest, what in _COUNTS:
        parser.add_argument(flag, dest=dest, type=_count, default=0, metavar="N", help=what)
    parser.add_argument("--tier", choices=SERVICE_TIERS, default="standard")
    parser.add_argument("--speed", choices=SPEEDS, default="standard")
    parser.add_argument("--geo", default="", metavar="REGION")
    parser.add_argument("--at", type=_when, metavar="ISO-8601",
                        help="request time (default now; no zone means UTC)")
    parser.add_argument("--allow-clamp", action="store_true", help="allow a smaller max output")
    parser.add_argument("--shadow", action="store_true",
                        help="decide as a sidecar running with --shadow would")
    parser.add_argument("--json", action="store_true", help="print JSON")


def _json_request(args: argparse.Namespace) -> Any:
    from google.protobuf import json_format

    from sidecar.api.v1 import spendkeeper_pb2 as pb
    from sidecar.convert import BadRequest, request_from

    try:
        text = (sys.stdin.read() if args.json_request == "-"
                else Path(args.json_request).read_text(encoding="utf-8"))
        data = json.loads(text)
    except (OSError, ValueError) as exc:
        _fail(args, f"--json-request: {exc}")
    if not isinstance(data, dict):
        _fail(args, "--json-request: expected a JSON object")
    data.setdefault("request_id", "explain")
    for name, prefix in (("service_tier", ""), ("serviceTier", ""), ("speed", "SPEED_")):
        value = data.get(name)
        if isinstance(value, str) and value.lower() in ("standard", "batch", "priority", "fast"):
            data[name] = (prefix if value.lower() == "standard" else "") + value.upper()
    msg = pb.AuthorizeRequest()
    try:
        json_format.ParseDict(data, msg)
        req, _ = request_from(msg, msg.estimate, "estimate", dt.datetime.now(dt.UTC),
                              msg.allow_clamp)
    except (json_format.ParseError, BadRequest) as exc:
        _fail(args, f"--json-request: {exc}")
    return req


def _flag_request(args: argparse.Namespace) -> Any:
    from policy.decide import Request

    missing = [f"--{n}" for n in ("org", "user", "product", "model") if not getattr(args, n)]
    if missing:
        _fail(args, f"{', '.join(missing)} required (or give --json-request)")
    usage = Usage(**{dest: getattr(args, dest) for _, dest, _ in _COUNTS})
    return Request("explain", args.org, args.user, args.product, args.model, usage,
                   args.at or dt.datetime.now(dt.UTC), args.tier, args.speed, args.geo,
                   args.allow_clamp)


def _run_explain(args: argparse.Namespace) -> int:
    from sidecar.explain import explain, print_explanation

    req = _json_request(args) if args.json_request else _flag_request(args)
    policy = _load(args.policy)
    if policy is None:
        return 1
    if args.data_dir:
        reader = _open_reader(args)
        if reader is None:
            return 1
        with reader:
            result = explain(policy, req, reader.counters, shadow=args.shadow,
                             counters_from=str(args.data_dir))
    else:
        result = explain(policy, req, shadow=args.shadow)
    report = result.to_json()
    if args.json:
        _out(json.dumps(report, indent=2))
    else:
        print_explanation(report, _console())
    return 0


# ---------------------------------------------------------------- diff
def _add_diff(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("old", metavar="OLD", help="the policy in force (file or directory)")
    parser.add_argument("new", metavar="NEW", help="the proposed policy (file or directory)")
    parser.add_argument("--data-dir", metavar="DIR",
                        help="a ledger: show headroom now and who would be over the new limits")
    parser.add_argument("--at", type=_when, metavar="ISO-8601",
                        help="the moment to compare at (default now): picks each org's period")
    parser.add_argument("--json", action="store_true", help="print JSON")


def _run_diff(args: argparse.Namespace) -> int:
    from sidecar.diff import diff_policies, headroom
    from sidecar.explain import table

    old, new = _load([args.old]), _load([args.new])
    if old is None or new is None:
        return 1
    changes = diff_policies(old, new)
    rows = None
    if args.data_dir:
        reader = _open_reader(args)
        if reader is None:
            return 1
        with reader:
            rows = headroom(old, new, reader, args.at or dt.datetime.now(dt.UTC))
    if args.json:
        _out(json.dumps({"old_version": old.version, "new_version": new.version,
                         "changes": [c.to_json() for c in changes],
                         "headroom": None if rows is None else [h.to_json() for h in rows],
                         "over_now": None if rows is None else
                         [h.scope for h in rows if h.over_now]}, indent=2))
        return 0
    _out(f"policy {old.version} -> {new.version}: {len(changes)} change(s)")
    section = ""
    for change in changes:
        if change.section != section:
            section = change.section
            _out(f"{section}:")
        if change.old is None:
            _out(f"  + {change.subject}: {change.field} {change.new}")
        elif change.new is None:
            _out(f"  - {change.subject}: {change.field} removed (was {change.old})")
        else:
            _out(f"  ~ {change.subject}: {change.field} {change.old} -> {change.new}")
    if rows is None:
        return 0
    _out(f"headroom now (ledger {args.data_dir}):")
    grid = table("level", "scope", "used", "old limit", "new limit", "old headroom",
                 "new headroom", "change", "", right=(2, 3, 4, 5, 6, 7))
    for h in rows:
        delta = "" if h.change is None else ("+" if h.change > 0 else "") + _usd(h.change)
        flag = "OVER NOW" if h.over_now else ""
        grid.add_row(h.level, h.scope, _usd(h.used), _usd(h.old_limit), _usd(h.new_limit),
                     _usd(h.old_remaining), _usd(h.new_remaining), delta,
                     " ".join(x for x in (flag, h.note) if x))
    _console().print(grid)
    over = [h.scope for h in rows if h.over_now]
    _out(f"over their new limit right now: {', '.join(over) if over else 'nobody'}")
    return 0


# ---------------------------------------------------------------- replay
def _add_replay(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--policy", required=True, action="append", metavar="PATH",
                        help="the policy to replay under (file or directory, repeatable)")
    parser.add_argument("--data-dir", required=True, metavar="DIR", help="the ledger")
    parser.add_argument("--period", required=True, metavar="YYYY-MM", help="the month")
    parser.add_argument("--org", help="only this org")
    parser.add_argument("--json", action="store_true", help="print JSON")


def _run_replay(args: argparse.Namespace) -> int:
    from policy.periods import parse_period
    from sidecar.replay import read_journal, replay

    try:
        parse_period(args.period)
    except ValueError as exc:
        _fail(args, str(exc))
    policy = _load(args.policy)
    if policy is None:
        return 1
    reader = _open_reader(args)
    if reader is None:
        return 1
    with reader:
        records = read_journal(reader, args.period, args.org)
    report = replay(policy, records, args.period).to_json()
    if args.json:
        _out(json.dumps(report, indent=2))
        return 0
    _print_replay(report)
    return 0


def _print_replay(r: dict[str, Any]) -> None:
    from sidecar.explain import table

    t = r["totals"]
    _out(f"replay of {r['period']}: {t['records']:,} record(s) under policy "
         f"{r['policy_version']}")
    grid = table("org / user type / user / model", "records", "recorded", "re-priced",
                 "difference", right=(1, 2, 3, 4))

    def add(label: str, row: dict[str, Any]) -> None:
        diff = row["repriced_nanos"] - row["recorded_nanos"]
        unpriced = f" ({row['unpriced']} unpriced)" if row["unpriced"] else ""
        grid.add_row(label, f"{row['records']:,}", format_usd(row["recorded_nanos"]),
                     format_usd(row["repriced_nanos"]) + unpriced,
                     ("+" if diff > 0 else "") + format_usd(diff))

    for org in r["orgs"]:
        add(org["org"], org)
        for line in org["user_types"]:
            add(f"  type {line['user_type']}", line)
        for line in org["users"]:
            add(f"  user {line['user']} ({line['user_type'] or '-'})", line)
        for line in org["models"]:
            add(f"  model {line['model']}", line)
    add("total", t)
    _console().print(grid)
    d = r["decisions"]
    reasons = ", ".join(f"{k} {v}" for k, v in sorted(d["would_deny"].items())) or "none"
    _out(f"decisions (time order, fresh counters, recorded usage as the estimate): "
         f"{d['allowed']:,} allowed, {d['denied']:,} denied; would deny: {reasons}"
         + (f" ({d['shadow_would_deny']} in shadow mode, allowed)" if d["shadow_would_deny"]
            else ""))
    for ex in d["examples"][:5]:
        _out(f"  {ex['at']} {ex['org']}/{ex['user']} {ex['request_id']}: {ex['reason']}")


COMMANDS = [
    Command("explain", "explain a decision: member, user type, limits and their sources, "
            "prices, counters", _add_explain, _run_explain),
    Command("diff", "show what a policy change does (limits, entitlements, prices, who would "
            "be over now)", _add_diff, _run_diff),
    Command("replay", "re-price and re-decide a period's recorded usage under a policy",
            _add_replay, _run_replay),
]
