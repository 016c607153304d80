"""No overshoot: 200 concurrent clients against one budget, two server processes, one ledger.

Each client has its own connection (so ``--workers 2`` spreads them over both
processes, which share the LMDB environment). A sampler thread reads GetUsage
the whole time and checks ``spent + reserved <= limit`` on every limited line
at every sample. The number allowed is exactly ``floor(limit / cost)``: every
allowed request holds (or, once recorded, spends) exactly its cost.
"""

from __future__ import annotations

import random
import threading
from collections.abc import Callable
from pathlib import Path

import pytest
from _rel_support import (
    Server,
    Workers,
    authorize_msg,
    nanos,
    record_msg,
    report,
    serve_args,
    start_server,
    usage_figures,
    usd_tokens,
)

from sidecar.api.v1 import spendkeeper_pb2 as pb

USD = 10**9
#: (org, limit in USD, cost of one request in USD, user of client i)
BUDGETS: tuple[tuple[str, int, str, Callable[[int], str]], ...] = (
    ("solo", 10, "0.30", lambda i: "u"),  # one user budget
    ("pool", 50, "0.70", lambda i: f"p{i}"),  # one org budget, 200 users
)


def overshoot(tmp_path: Path, policy: Path, servers: list[Server], clients: int,
              rounds: int, seed: int) -> None:
    """``clients`` threads each send ``rounds`` Authorizes per budget; half the allowed are
    recorded at exactly their worst case."""
    server = start_server(tmp_path / "run", serve_args(policy, tmp_path / "data",
                                                       "--workers", "2"))
    servers.append(server)
    limits = {org: limit * USD for org, limit, _, _ in BUDGETS}
    allowed = dict.fromkeys(limits, 0)
    recorded = dict.fromkeys(limits, 0)
    lock = threading.Lock()
    barrier = threading.Barrier(clients + 1)
    done = threading.Event()
    samples = [0]
    violations: list[str] = []

    def client(i: int) -> None:
        stub = server.stub()
        rng = random.Random(seed + i)
        barrier.wait(timeout=120)
        for r in range(rounds):
            for org, _, cost, user in BUDGETS:
                rid = f"{org}-{i}-{r}"
                resp = stub.Authorize(authorize_msg(rid, org, user(i), usd_tokens(cost)),
                                      timeout=60)
                if resp.decision != pb.ALLOW:
                    assert pb.Reason.Name(resp.reason) in ("USER_LIMIT", "ORG_LIMIT"), resp
                    continue
                assert nanos(resp.reserved) == usd_tokens(cost) * 10_000
                with lock:
                    allowed[org] += 1
                if rng.random() < 0.5:
                    stub.Record(record_msg(rid, org, user(i), usd_tokens(cost)), timeout=60)
                    with lock:
                        recorded[org] += 1

    def sampler() -> None:
        stub = server.stub()
        barrier.wait(timeout=120)
        while not done.is_set():
            for org, user in (("solo", "u"), ("pool", "")):
                resp = stub.GetUsage(pb.GetUsageRequest(org=org, user=user, page_size=1),
                                     timeout=60)
                for line in (resp.org, *resp.user_types, *resp.users):
                    spent, reserved = nanos(line.spent), nanos(line.reserved)
                    if not line.unlimited and spent + reserved > nanos(line.limit):
                        violations.append(f"{org} {line.scope}: {spent} + {reserved} > "
                                          f"{nanos(line.limit)}")
            samples[0] += 1

    workers = Workers()
    for i in range(clients):
        workers.spawn(client, i)
    sampling = Workers()
    sampling.spawn(sampler)
    workers.join(timeout=300)
    done.set()
    sampling.join()
    assert violations == [], violations[:5]
    assert samples[0] > 1
    stub = server.stub()
    for org, limit, cost, _ in BUDGETS:
        each = usd_tokens(cost) * 10_000
        expected = limit * USD // each
        line = usage_figures(stub, org)[f"org:{org}"]
        assert allowed[org] == expected, (org, allowed[org], expected)
        assert line == (recorded[org] * each, (expected - recorded[org]) * each,
                        recorded[org]), (org, line)
    assert server.stop() == 0, server.stderr()
    report(f"overshoot: {clients} clients x {rounds} rounds per budget on 2 workers; allowed "
           f"{allowed['solo']} on user $10 @ $0.30 (expected 33), {allowed['pool']} on org "
           f"$50 @ $0.70 (expected 71); {samples[0]} GetUsage samples, 0 over the limit")


@pytest.mark.slow
def test_200_concurrent_clients_never_overshoot_a_user_or_an_org_budget(
        tmp_path: Path, policy_dir: Path, servers: list[Server]) -> None:
    """--workers 2, 200 clients: every GetUsage sample has spent + reserved <= limit, and
    exactly 33 ($10 / $0.30) and 71 ($50 / $0.70) requests are allowed."""
    overshoot(tmp_path, policy_dir, servers, 200, 5, seed=random.randrange(2**32))


@pytest.mark.soak
@pytest.mark.timeout(900)
def test_overshoot_soak(tmp_path: Path, policy_dir: Path, servers: list[Server]) -> None:
    """The same, 200 clients x 25 rounds."""
    overshoot(tmp_path, policy_dir, servers, 200, 25, seed=random.randrange(2**32))

