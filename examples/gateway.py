"""A toy LLM gateway: authorize, "call the model", record, then print the org's usage.

Run a sidecar with the example policy (``make serve``), then::

    .venv/bin/python examples/gateway.py --requests 5
    .venv/bin/python examples/gateway.py --user carol@acme.com --max-tokens 200000 --clamp

Each simulated request gets a fresh request_id and goes through
:meth:`sidecar.client.SpendKeeperClient.guard`: the worst case (input plus
``--max-tokens`` of output) is reserved, the fake model produces a random number
of output tokens up to the allowed cap, and that actual usage is recorded. A
Record the sidecar could not take is kept and sent again at the end: usage
that happened must never be dropped.

Exit status: 0 when every request was decided and every usage recorded (denials
are normal outcomes), 1 when records remain undelivered or usage cannot be read.
"""

from __future__ import annotations

import argparse
import logging
import random
import sys
from decimal import Decimal

from sidecar.api.v1 import spendkeeper_pb2 as pb
from sidecar.client import (
    Denied,
    SidecarUnavailable,
    SpendKeeperClient,
    SpendKeeperError,
    money_to_decimal,
    new_request_id,
)


def _usd(amount: Decimal) -> str:
    return f"${amount:,.6f}"


def _line(kind: str, line: pb.UsageLine) -> str:
    limit = "unlimited" if line.unlimited else _usd(money_to_decimal(line.limit))
    remaining = "" if line.unlimited else f"  remaining {_usd(money_to_decimal(line.remaining))}"
    return (f"  {kind:<9} {line.scope:<20} spent {_usd(money_to_decimal(line.spent))}"
            f"  reserved {_usd(money_to_decimal(line.reserved))}  limit {limit}{remaining}"
            f"  requests {line.requests}")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    add = parser.add_argument
    add("--target", default="127.0.0.1:50051", help="sidecar address (default: %(default)s)")
    add("--org", default="acme", help="org id (default: %(default)s)")
    add("--user", default="alice@acme.com", help="user id (default: %(default)s)")
    add("--product", default="chat", help="product (default: %(default)s)")
    add("--model", default="claude-sonnet-4-6", help="model id (default: %(default)s)")
    add("--requests", type=int, default=5, help="simulated calls (default: %(default)s)")
    add("--input-tokens", type=int, default=2_000, help="input tokens per call")
    add("--max-tokens", type=int, default=4_096, help="max output tokens per call")
    add("--clamp", action="store_true", help="let the sidecar lower max tokens instead of deny")
    add("--fail-mode", choices=("closed", "open"), default="closed",
        help="when the sidecar is unreachable: deny (closed) or allow unchecked (open)")
    add("--timeout", type=float, default=0.25, help="per-attempt deadline in seconds")
    add("--retries", type=int, default=2, help="retries after the first attempt")
    add("--seed", type=int, default=None, help="random seed for the fake model")
    args = parser.parse_args(argv)
    if args.requests < 0 or args.input_tokens < 0 or args.max_tokens < 1:
        parser.error("--requests and --input-tokens must be >= 0, --max-tokens >= 1")
    return args


def fake_model(rng: random.Random, max_output_tokens: int) -> int:
    """Output tokens of a pretend model call: anywhere from 1 to the cap."""
    return rng.randint(1, max_output_tokens)


def run(args: argparse.Namespace) -> int:
    """Simulate the calls, then print usage; returns the exit status."""
    rng = random.Random(args.seed)
    pending: list[pb.RecordRequest] = []
    with SpendKeeperClient(args.target, timeout=args.timeout, retries=args.retries,
                           fail_mode=args.fail_mode) as client:
        for n in range(1, args.requests + 1):
            request_id = new_request_id()
            try:
                with client.guard(request_id, args.org, args.user, args.product, args.model,
                                  input_tokens=args.input_tokens,
                                  max_output_tokens=args.max_tokens,
                                  allow_clamp=args.clamp) as call:
                    auth = call.authorization
                    output = fake_model(rng, call.max_output_tokens)
                    call.set_usage(input_tokens=args.input_tokens, output_tokens=output)
                clamp = (f" (clamped to {auth.max_output_tokens} tokens)"
                         if auth.max_output_tokens else "")
                unchecked = " UNCHECKED (fail open)" if auth.fail_open else ""
                cost = call.recorded.cost if call.recorded else Decimal(0)
                print(f"#{n} {request_id} ALLOW {auth.reason}{unchecked} reserved "
                      f"{_usd(auth.reserved)}{clamp} -> in {args.input_tokens} out {output} "
                      f"cost {_usd(cost)}")
            except Denied as exc:
                print(f"#{n} {request_id} DENY {exc.authorization.reason}: "
                      f"{exc.authorization.message}")
            except SidecarUnavailable as exc:
                if isinstance(exc.request, pb.RecordRequest):
                    pending.append(exc.request)
                print(f"#{n} {request_id} ALLOW, but the record is kept for later: {exc}")
        return _finish(client, args.org, pending)


def _finish(client: SpendKeeperClient, org: str, pending: list[pb.RecordRequest]) -> int:
    status = 0
    for request in pending:
        try:
            client.resend_record(request)
        except SpendKeeperError as exc:
            print(f"record {request.request_id} still undelivered: {exc}", file=sys.stderr)
            status = 1
    try:
        report = client.usage(org)
    except SpendKeeperError as exc:
        print(f"cannot read usage for {org}: {exc}", file=sys.stderr)
        return 1
    print(f"usage for {org}, period {report.period} (policy {report.policy_version}):")
    print(_line("org", report.org))
    for line in report.user_types:
        print(_line("user_type", line))
    for line in report.users:
        print(_line("user", line))
    return status


def main(argv: list[str] | None = None) -> int:
    """Entry point."""
    # The client logs fail-open/fail-closed decisions as warnings; this script
    # prints every decision itself, so keep stderr for errors.
    logging.basicConfig(level=logging.ERROR)
    return run(parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
