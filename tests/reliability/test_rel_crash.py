"""Process faults under load: kill -9, SIGSTOP/SIGCONT, graceful SIGTERM.

The gateway side is :class:`_rel_load.ClientBook`: it sends Authorize then
Record for fresh request ids, remembers every acknowledgement, and after a
fault resends every request still in doubt with the same id and payload.
Invariant of every test here: the server's books equal the client's, to the
nano-USD — Σ spent = Σ acknowledged costs, one journal entry per recorded id
(no id counted twice), every acknowledged Record still present (a resend
answers duplicate=true with the first cost), nothing left reserved.
"""

from __future__ import annotations

import random
import signal
import threading
import time
from pathlib import Path

import pytest
from _rel_load import ClientBook
from _rel_support import (
    AT,
    MODEL,
    NANOS_PER_TOKEN,
    Server,
    Workers,
    nanos,
    org_totals,
    read_ledger,
    record_msg,
    report,
    serve_args,
    start_server,
    wait_until,
)

from sidecar.api.v1 import spendkeeper_pb2 as pb
from sidecar.client import (
    REASON_SIDECAR_UNAVAILABLE,
    SidecarUnavailable,
    SpendKeeperClient,
    SpendKeeperError,
    money_to_decimal,
)

LOAD_THREADS = 8


def _acked_in(book: ClientBook, epoch: int) -> int:
    return sum(1 for op in list(book.ops.values()) if op.cost is not None and op.epoch == epoch)


def kill_cycles(tmp_path: Path, policy: Path, servers: list[Server], cycles: int,
                seed: int) -> None:
    """``cycles`` times: serve, load, kill -9 at a random moment, restart, resend, compare."""
    rng = random.Random(seed)
    data = tmp_path / "data"
    book = ClientBook(seed=seed)
    started = time.monotonic()
    for cycle in range(cycles + 1):
        book.epoch = cycle
        server = start_server(tmp_path / f"run{cycle}", serve_args(policy, data))
        servers.append(server)
        stub = server.stub()
        if cycle:
            # Before anything else: every Record acknowledged before the kill is there.
            book.check_acknowledged(stub, epoch=cycle - 1)
            book.settle(stub)
            book.verify(stub)
        if cycle == cycles:
            book.check_acknowledged(stub)  # every acknowledged Record, of every life
            assert server.stop() == 0, server.stderr()
            break
        stop = threading.Event()
        workers = Workers()
        for _ in range(LOAD_THREADS):
            workers.spawn(book.run, server.stub(), stop, rng.getrandbits(32))
        wait_until(lambda c=cycle, w=workers: _acked_in(book, c) >= 20 or w.failures,  # type: ignore[misc]
                   "load to start")
        time.sleep(rng.uniform(0.0, 0.6))  # the random moment
        server.kill()
        stop.set()
        workers.join()
    lost, double = book.verify_files(data)
    recorded = book.recorded
    report(f"kill -9: seed {seed}, {cycles} kills, {len(book.ops)} requests, "
           f"{len(recorded)} recorded (${sum(recorded.values()) / 1e9:.2f}), "
           f"{book.in_doubt_resent} in doubt resent ({book.in_doubt_committed} already "
           f"committed), lost {lost}, double {double}, {time.monotonic() - started:.0f} s")


@pytest.mark.slow
def test_kill_9_mid_load_loses_and_doubles_nothing(tmp_path: Path, policy_dir: Path,
                                                   servers: list[Server]) -> None:
    """5 kill -9 at random moments: Σ ledger == Σ client, each id once, every ack kept."""
    kill_cycles(tmp_path, policy_dir, servers, 5, seed=random.randrange(2**32))


@pytest.mark.soak
@pytest.mark.timeout(900)
def test_kill_9_mid_load_soak(tmp_path: Path, policy_dir: Path, servers: list[Server]) -> None:
    """The same invariant over 25 kill -9 cycles."""
    kill_cycles(tmp_path, policy_dir, servers, 25, seed=random.randrange(2**32))


# ------------------------------------------------------------------ SIGSTOP
def stall(tmp_path: Path, policy: Path, servers: list[Server], stalls: int, seed: int) -> None:
    """Short-deadline clients (50 ms, 2 retries, same id) while the server is SIGSTOPped."""
    rng = random.Random(seed)
    server = start_server(tmp_path / "run", serve_args(policy, tmp_path / "data"))
    servers.append(server)
    lock = threading.Lock()
    costs: dict[str, int] = {}  # acknowledged Records
    kept: list[object] = []  # Records that got no answer: resent later
    doubtful: list[tuple[str, str, int]] = []  # Authorizes that got no answer
    retried = [0]
    stop = threading.Event()

    def gateway(index: int) -> None:
        local = random.Random(seed + index)
        with SpendKeeperClient(server.target, timeout=0.05, retries=2, backoff=0.01) as client:
            n = 0
            while not stop.is_set():
                n += 1
                rid, user, tokens = f"g{index}-{n}", f"user-{index}", local.randint(1, 5000)
                auth = client.authorize(rid, "open", user, "chat", MODEL,
                                        max_output_tokens=tokens, at=AT)
                with lock:
                    retried[0] += auth.attempts > 1
                if auth.reason == REASON_SIDECAR_UNAVAILABLE:  # failed closed: in doubt
                    with lock:
                        doubtful.append((rid, user, tokens))
                    continue
                assert auth.allowed, auth
                try:
                    rec = client.record(rid, "open", user, "chat", MODEL, output_tokens=tokens,
                                        at=AT)
                except SidecarUnavailable as exc:
                    with lock:
                        kept.append(exc.request)
                        retried[0] += 1
                    continue
                assert not rec.duplicate
                with lock:
                    costs[rid] = int(money_to_decimal(rec.raw.cost) * 10**9)  # type: ignore[union-attr]
                    retried[0] += rec.attempts > 1

    workers = Workers()
    for index in range(LOAD_THREADS):
        workers.spawn(gateway, index)
    for _ in range(stalls):
        before = len(costs)
        wait_until(lambda b=before: len(costs) >= b + 50 or workers.failures,  # type: ignore[misc]
                   "load between stalls")
        server.send(signal.SIGSTOP)
        time.sleep(rng.uniform(0.3, 1.5))
        server.send(signal.SIGCONT)
    wait_until(lambda: len(costs) >= 50 or workers.failures, "load after the last stall")
    stop.set()
    workers.join()
    assert retried[0] > 0, "no call was retried: the stall never hit the load"
    # Settle, as a gateway does: resend kept Records; re-ask and release in-doubt Authorizes.
    duplicates = 0
    with SpendKeeperClient(server.target, timeout=10.0) as client:
        for request in kept:
            rec = client.resend_record(request)  # type: ignore[arg-type]
            duplicates += rec.duplicate
            costs[request.request_id] = int(money_to_decimal(rec.raw.cost) * 10**9)  # type: ignore[attr-defined,union-attr]
        for rid, user, tokens in doubtful:
            auth = client.authorize(rid, "open", user, "chat", MODEL, max_output_tokens=tokens,
                                    at=AT)
            assert auth.allowed
            client.release(rid)  # the gateway never made the call: give the hold back
    stub = server.stub()
    spent, reserved, requests = org_totals(stub, "open")
    assert all(cost % NANOS_PER_TOKEN == 0 for cost in costs.values())
    assert (spent, reserved, requests) == (sum(costs.values()), 0, len(costs))
    assert server.stop() == 0, server.stderr()
    report(f"SIGSTOP: {stalls} stalls, {len(costs)} recorded, {retried[0]} calls retried, "
           f"{len(kept)} Records resent ({duplicates} already committed), {len(doubtful)} "
           f"in-doubt Authorizes re-asked and released, double-charged 0, reserved left 0")


@pytest.mark.slow
def test_sigstop_with_short_deadlines_never_double_charges(tmp_path: Path, policy_dir: Path,
                                                           servers: list[Server]) -> None:
    """Retries with the same id across a stall: spent == Σ acknowledged costs, nothing held."""
    stall(tmp_path, policy_dir, servers, 2, seed=random.randrange(2**32))


@pytest.mark.soak
@pytest.mark.timeout(600)
def test_sigstop_soak(tmp_path: Path, policy_dir: Path, servers: list[Server]) -> None:
    """The same over 15 stalls of 0.3 to 1.5 s."""
    stall(tmp_path, policy_dir, servers, 15, seed=random.randrange(2**32))


# ------------------------------------------------------------------ SIGTERM
def _applied(data: Path, failed: dict[str, tuple[str, str]]) -> list[str]:
    """Failed calls whose effect is in the ledger anyway (answers lost, not drained)."""
    states = read_ledger(data).states
    return sorted(rid for rid, (call, _) in failed.items()
                  if (call == "Authorize" and rid in states)
                  or (call == "Record" and states.get(rid) == "settled"))


@pytest.mark.slow
def test_sigterm_at_peak_load_drains_and_loses_nothing(tmp_path: Path, policy_dir: Path,
                                                       servers: list[Server]) -> None:
    """SIGTERM under 16 busy threads: exit 0; a call that failed was never applied (in-flight
    calls are answered, not cut off); after a restart every acknowledged call is there."""
    data = tmp_path / "data"
    book = ClientBook(seed=7)
    server = start_server(tmp_path / "run0", serve_args(policy_dir, data))
    servers.append(server)
    stop = threading.Event()
    workers = Workers()
    for i in range(16):
        workers.spawn(book.run, server.stub(), stop, i)
    wait_until(lambda: len(book.recorded) >= 300 or workers.failures, "peak load")
    term_at = time.monotonic()
    server.send(signal.SIGTERM)
    assert server.process.wait(timeout=60) == 0, server.stderr()
    stop.set()
    workers.join()
    assert set(book.errors) <= {"UNAVAILABLE", "CANCELLED"}, book.errors
    assert _applied(data, book.failed) == [], "a call was applied but its answer was cut off"
    drained = sum(1 for op in book.ops.values() if op.cost is not None and op.acked_at > term_at)
    server = start_server(tmp_path / "run1", serve_args(policy_dir, data))
    servers.append(server)
    stub = server.stub()
    book.check_acknowledged(stub)
    book.settle(stub)
    book.verify(stub)
    assert server.stop() == 0
    lost, double = book.verify_files(data)
    report(f"SIGTERM: {len(book.ops)} requests, {len(book.recorded)} recorded, {drained} "
           f"acknowledged after SIGTERM was sent, failed calls {dict(book.errors)} (none "
           f"applied), lost {lost}, double {double}")


@pytest.mark.slow
def test_client_library_keeps_every_record_through_a_graceful_shutdown(
        tmp_path: Path, policy_dir: Path, servers: list[Server]) -> None:
    """Gateways on SpendKeeperClient during SIGTERM (up to 4 shutdowns of 32 busy threads):
    a Record is acknowledged or raises SidecarUnavailable (carrying the request to resend),
    an Authorize answers — never a non-retryable SpendKeeperError that makes a gateway drop
    usage. The books balance after every resend."""
    data = tmp_path / "data"
    lock = threading.Lock()
    costs: dict[str, int] = {}
    kept: list[pb.RecordRequest] = []
    raised: list[tuple[str, str, str]] = []  # (call, request id, status) of fatal errors
    lives = 0
    while lives < 4 and not raised:
        server = start_server(tmp_path / f"run{lives}", serve_args(policy_dir, data))
        servers.append(server)
        stop = threading.Event()

        def gateway(index: int, life: int = lives, target: str = server.target,
                    stop: threading.Event = stop) -> None:
            with SpendKeeperClient(target, timeout=5.0, retries=2, backoff=0.05) as client:
                n = 0
                while not stop.is_set():
                    n += 1
                    rid, call = f"l{life}-g{index}-{n}", "Authorize"
                    try:
                        auth = client.authorize(rid, "open", "u", "chat", MODEL,
                                                max_output_tokens=100, at=AT)
                        if not auth.allowed:  # failed closed: the sidecar is gone
                            return
                        call = "Record"
                        rec = client.record(rid, "open", "u", "chat", MODEL,
                                            output_tokens=100, at=AT)
                        with lock:
                            costs[rid] = nanos(rec.raw.cost)  # type: ignore[union-attr]
                    except SidecarUnavailable as exc:
                        with lock:
                            if call == "Record":
                                kept.append(exc.request)  # type: ignore[arg-type]
                        return
                    except SpendKeeperError as exc:
                        with lock:
                            raised.append((call, rid, exc.code.name if exc.code else "?"))
                            if call == "Record":  # kept anyway, to settle the books below
                                kept.append(record_msg(rid, "open", "u", 100))
                        return

        workers = Workers()
        for i in range(32):
            workers.spawn(gateway, i)
        target_count = len(costs) + 200
        wait_until(lambda t=target_count, w=workers: len(costs) >= t or w.failures,  # type: ignore[misc]
                   "peak load")
        server.send(signal.SIGTERM)
        assert server.process.wait(timeout=60) == 0, server.stderr()
        stop.set()
        workers.join()
        lives += 1
    server = start_server(tmp_path / "settle", serve_args(policy_dir, data))
    servers.append(server)
    with SpendKeeperClient(server.target, timeout=10.0) as client:
        for request in kept:
            costs[request.request_id] = nanos(client.resend_record(request).raw.cost)  # type: ignore[union-attr]
    assert org_totals(server.stub(), "open")[::2] == (sum(costs.values()), len(costs))
    assert server.stop() == 0
    report(f"SIGTERM via client library: {lives} shutdowns, {len(costs)} recorded, "
           f"{len(kept)} resent, non-retryable errors {len(raised)} {raised[:3]}")
    assert raised == [], (
        "the client library raised a non-retryable error during a graceful shutdown "
        f"(a gateway following its docs drops these Records): {raised[:5]}")
