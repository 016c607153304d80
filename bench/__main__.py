"""``python -m bench`` (``make bench``): every SPEC §7 figure, a table and a JSON file.

Each figure is measured several times in one run and reported as median
[min-max]; comparisons (Authorize against a bare grpcio server, --workers 2
against 1, p99 during reloads against steady state) are ratios of
measurements taken in the same run, interleaved, because the machine is
shared and absolute numbers drift. Targets missed are reported, not failed:
the exit status is non-zero only when a benchmark could not run.

    python -m bench [--quick] [--only grpc,openloop] [--output bench/results.json]

See bench/suite.py for what each section measures and how processes are pinned.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from bench.report import print_table, write_json
from bench.suite import SECTIONS, context, meta, run_sections, say

DEFAULT_OUTPUT = Path(__file__).resolve().parent / "results.json"


def _sections(text: str) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in SECTIONS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(
            f"unknown section {', '.join(unknown) or '(none)'}; choose from {', '.join(SECTIONS)}")
    return names


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=(
        "Measure every SPEC §7 figure; print a table and write JSON."))
    parser.add_argument("--quick", action="store_true",
                        help="tiny sizes (a smoke run of every section, < 30 s)")
    parser.add_argument("--only", type=_sections, default=list(SECTIONS), metavar="NAME[,NAME]",
                        help=f"run only these sections: {', '.join(SECTIONS)}")
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT, metavar="FILE",
                        help="where to write the JSON (default: bench/results.json)")
    parser.add_argument("--dir", default=None, help="temporary files go here (default: /tmp)")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    with context(args.quick, args.dir) as ctx:
        timings = run_sections(ctx, args.only)
        seconds = time.perf_counter() - started
        info = meta(ctx, args.only, seconds)
    info["section_seconds"] = {k: round(v, 1) for k, v in timings.items()}
    info["errors"] = ctx.errors
    say("")
    quick = " (--quick: tiny sizes, figures not comparable)" if args.quick else ""
    load = ", ".join(f"{x:.1f}" for x in info["load_average"])
    say(f"spendkeeper benchmarks{quick}: {info['cpus']} CPUs, load average {load}, "
        f"{seconds:.0f} s")
    say(f"Pinning: single-process servers on CPU {info['pinning']['server_cpus']}, load "
        f"generator ({info['client_processes']} spawned processes) on CPU "
        f"{info['pinning']['client_cpus']}; --workers section unpinned (the load generator "
        "competes with the workers for the same cores). 'client saturated' = a client "
        "process used >= 90% of a core.")
    say("")
    print_table(ctx.figures)
    write_json(args.output, info, ctx.figures, ctx.sections)
    missed = [f.label for f in ctx.figures if f.met is False]
    say("")
    say(f"{len(ctx.figures)} figures, {len(missed)} targets missed; JSON: {args.output}")
    for name, error in ctx.errors.items():
        say(f"section {name} FAILED: {error.splitlines()[0][:300]}")
    return 1 if ctx.errors else 0


if __name__ == "__main__":
    sys.exit(main())
