"""The ``spendkeeper`` command line: one argparse entry point, subcommands in a table.

``main(argv=None) -> int`` parses the arguments, runs one subcommand and
returns its exit code (0 success, 1 the command found problems, 2 bad
usage; ``--help`` is 0). It never calls ``sys.exit`` itself, so tests and
other programs can call it in-process.

Adding a subcommand needs no edit here: write a module ``sidecar/_cli_<name>.py``
that defines ``COMMANDS = [Command("name", "help", add_arguments, run)]``
(``Command`` from :mod:`sidecar._command`), with::

       def add_arguments(parser: argparse.ArgumentParser) -> None:
           parser.add_argument("--org", required=True)

       def run(args: argparse.Namespace) -> int:
           from sidecar.ledger import Ledger   # heavy imports here, not at the top
           ...

Such modules are discovered at start-up and listed after the core commands
below, in module-name order.

``run`` returns the exit code. For a usage error detected after parsing
(an unknown org, say) call ``args.command_parser.error("message")``: it
prints the subcommand's usage and the message to stderr and exits 2, which
``main`` turns into a return value. Keep imports of grpc, lmdb, rich and the
like inside ``run`` so that ``spendkeeper fmt`` and ``check`` start fast.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import os
import pkgutil
import sys
from collections.abc import Sequence

import sidecar
from sidecar import _cli_policy, _cli_serve
from sidecar._command import Command

__all__ = ["COMMANDS", "Command", "build_parser", "main"]

#: Every subcommand, in the order ``spendkeeper --help`` lists them.
COMMANDS: list[Command] = [
    Command("serve", "run the gRPC sidecar (defaults: example policy, ./data, loopback)",
            _cli_serve.add_arguments, _cli_serve.run),
    Command("check", "check policy files (syntax and semantics)",
            _cli_policy.add_check_arguments, _cli_policy.run_check),
    Command("fmt", "format policy files canonically",
            _cli_policy.add_fmt_arguments, _cli_policy.run_fmt),
    Command("test", "run the policy unit tests (test \"...\" { } blocks)",
            _cli_policy.add_test_arguments, _cli_policy.run_test),
    Command("price", "price a usage record exactly under a rate table",
            _cli_policy.add_price_arguments, _cli_policy.run_price),
]


def _discover() -> list[Command]:
    """Commands exported by ``sidecar._cli_*`` modules beyond the core ones above."""
    core = {c.name for c in COMMANDS}
    found: list[Command] = []
    for info in sorted(pkgutil.iter_modules(sidecar.__path__), key=lambda i: i.name):
        if info.name.startswith("_cli_") and info.name not in {"_cli_policy", "_cli_serve"}:
            module = importlib.import_module(f"sidecar.{info.name}")
            found.extend(c for c in getattr(module, "COMMANDS", ()) if c.name not in core)
    return found


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("spendkeeper")
    except PackageNotFoundError:
        return "unknown"


def build_parser(commands: Sequence[Command] | None = None) -> argparse.ArgumentParser:
    """The parser for ``commands`` (default: :data:`COMMANDS`)."""
    parser = argparse.ArgumentParser(
        prog="spendkeeper", allow_abbrev=False,
        description="Spend enforcement for LLM gateways: policies, pricing and the sidecar.")
    parser.add_argument("--version", action="version", version=f"spendkeeper {_version()}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for command in [*COMMANDS, *_discover()] if commands is None else commands:
        sub = subparsers.add_parser(command.name, help=command.help,
                                    description=command.help[:1].upper() + command.help[1:] + ".",
                                    allow_abbrev=False)
        command.add_arguments(sub)
        sub.set_defaults(run=command.run, command_parser=sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``spendkeeper`` with ``argv`` (default: ``sys.argv[1:]``); return the exit code."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
        if args.command is None:
            parser.print_help(sys.stderr)
            return 2
        return int(args.run(args))
    except SystemExit as exc:  # argparse: --help and --version (0), usage errors (2)
        code = exc.code
        if code is None or isinstance(code, int):
            return code or 0
        print(code, file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # `spendkeeper ... | head`: stop quietly, and keep Python from
        # complaining again when it flushes stdout at exit.
        with contextlib.suppress(OSError, ValueError, AttributeError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1


if __name__ == "__main__":
    sys.exit(main())
