"""Storage faults through the server: failed fsync, a full map, readers left by killed workers.

Fault injection is the ledger's own: ``FAULTS_ENABLED`` in the data directory
when the server starts, then ``FAIL_FSYNC`` makes every fsync fail with EIO
(see ``sidecar.ledger.store.fault_sync_check``). Everything else is real: the
server is the CLI in a child process, the LMDB files are read back from disk.
"""

from __future__ import annotations

import os
import random
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest
from _rel_load import ClientBook
from _rel_support import (
    Server,
    Workers,
    authorize_msg,
    health_status,
    nanos,
    org_totals,
    pid_alive,
    read_ledger,
    readers_table,
    record_msg,
    report,
    serve_args,
    start_server,
    usage_figures,
    wait_until,
)

from bench.procfs import children_of
from sidecar.api.v1 import spendkeeper_pb2 as pb
from sidecar.ledger.store import open_env


def _code(call: object) -> str:
    """The status name of a finished call (a future or a function raising RpcError)."""
    try:
        call()  # type: ignore[operator]
    except grpc.RpcError as exc:
        return str(exc.code().name)
    return "OK"


def _faulty_dir(tmp_path: Path) -> Path:
    data = tmp_path / "data"
    data.mkdir(mode=0o700)
    (data / "FAULTS_ENABLED").touch()
    return data


# ------------------------------------------------------------------ fsync
@pytest.mark.slow
def test_failed_fsync_acknowledges_nothing_and_allows_nothing(tmp_path: Path, policy_dir: Path,
                                                              servers: list[Server]) -> None:
    """fsync fails (EIO): every Record (16 at once) is UNAVAILABLE, no Authorize is ALLOWed,
    still none once the disk "recovers" (fsyncgate: no retry on a failed fsync); after a
    restart each id resent is charged once and every Record acknowledged before is there."""
    data = _faulty_dir(tmp_path)
    server = start_server(tmp_path / "run0", serve_args(policy_dir, data))
    servers.append(server)
    stub = server.stub()
    book = ClientBook(seed=3)
    rng = random.Random(3)
    for _ in range(30):
        book.send_one(stub, rng)
    acked = dict(book.recorded)
    assert len(acked) == 30
    (data / "FAIL_FSYNC").touch()
    failing = [record_msg(f"fail-{i}", "open", "user-0", 100 + i) for i in range(16)]
    with ThreadPoolExecutor(16) as pool:
        codes = list(pool.map(lambda m: _code(lambda: stub.Record(m, timeout=30)), failing))
    assert codes == ["UNAVAILABLE"] * 16, codes
    auth_code = _code(lambda: stub.Authorize(authorize_msg("auth-after", "open", "u", 10),
                                             timeout=30))
    assert auth_code == "UNAVAILABLE", "an Authorize was answered after fsync failed"
    (data / "FAIL_FSYNC").unlink()
    assert _code(lambda: stub.Record(failing[0], timeout=30)) == "UNAVAILABLE"
    assert _code(lambda: stub.Record(record_msg("later", "open", "u", 5), timeout=30)) \
        == "UNAVAILABLE"
    assert _code(lambda: stub.Authorize(authorize_msg("auth-2", "open", "u", 10),
                                        timeout=30)) == "UNAVAILABLE"
    server.stop()
    (data / "FAULTS_ENABLED").unlink()
    server = start_server(tmp_path / "run1", serve_args(policy_dir, data))
    servers.append(server)
    stub = server.stub()
    book.check_acknowledged(stub)
    committed = 0
    for msg in failing:  # the gateway resends what got no answer: charged exactly once
        resp = stub.Record(msg, timeout=30)
        committed += resp.duplicate
        acked[msg.request_id] = nanos(resp.cost)
    assert (stub.Authorize(authorize_msg("auth-after", "open", "u", 10), timeout=30).decision
            == pb.ALLOW)
    assert stub.Release(pb.ReleaseRequest(request_id="auth-after"), timeout=30).released
    assert org_totals(stub, "open") == (sum(acked.values()), 0, len(acked))
    assert server.stop() == 0
    books = read_ledger(data)
    assert {rid: n for rid, n in books.journal_ids.items() if n != 1} == {}
    assert set(books.journal_ids) == set(acked)
    report(f"fsync failure: 30 acknowledged before, 16 concurrent Records + 2 Authorizes "
           f"refused (UNAVAILABLE), {committed} of the refused were committed unsynced and "
           f"answered duplicate on resend; lost 0, double 0")


def test_failed_fsync_turns_health_not_serving(tmp_path: Path, policy_dir: Path,
                                               servers: list[Server]) -> None:
    """Once fsync failed the ledger refuses writes: health must say NOT_SERVING (server and
    service) so load balancers stop sending traffic to a sidecar that can only refuse."""
    data = _faulty_dir(tmp_path)
    server = start_server(tmp_path / "run", serve_args(policy_dir, data))
    servers.append(server)
    stub = server.stub()
    stub.Record(record_msg("ok", "open", "u", 10), timeout=30)
    (data / "FAIL_FSYNC").touch()
    assert _code(lambda: stub.Record(record_msg("r", "open", "u", 10), timeout=30)) \
        == "UNAVAILABLE"
    chan = server.channel()
    statuses = {name: health_status(chan, name) for name in ("", "spendkeeper.v1.SpendKeeper")}
    assert statuses == {"": "NOT_SERVING", "spendkeeper.v1.SpendKeeper": "NOT_SERVING"}, (
        f"health after a failed fsync: {statuses}")


# ------------------------------------------------------------------ map full
@pytest.mark.slow
def test_full_map_is_resource_exhausted_changes_nothing_and_recovers(
        tmp_path: Path, policy_dir: Path, servers: list[Server]) -> None:
    """--map-size 1 MiB: the call that does not fit is RESOURCE_EXHAUSTED and aborted (figures
    unchanged, its id unused); an ALLOW always has its reservation; the server keeps serving;
    restarted with 64 MiB every acknowledged Record is intact and the refused ones go in once."""
    data = tmp_path / "data"
    server = start_server(tmp_path / "run0", serve_args(policy_dir, data, "--map-size",
                                                        str(1 << 20)))
    servers.append(server)
    stub = server.stub()
    acked: dict[str, int] = {}
    refused: list[tuple[pb.RecordRequest, str]] = []
    lock = threading.Lock()

    def fill(worker: int) -> None:
        for i in range(100_000):
            # Long ids and users fill the 1 MiB map in a few thousand Records.
            msg = record_msg(f"{worker}-{i}-" + "x" * 200, "open", f"user-{i % 400:04d}" * 8,
                             1 + i % 997)
            code = _code(lambda m=msg: acked.__setitem__(
                m.request_id, nanos(stub.Record(m, timeout=30).cost)))
            if code != "OK":
                with lock:
                    refused.append((msg, code))
                return

    workers = Workers()
    for worker in range(4):
        workers.spawn(fill, worker)
    workers.join(timeout=300)
    assert [code for _, code in refused] == ["RESOURCE_EXHAUSTED"] * 4, refused
    refused_msgs = [msg for msg, _ in refused]
    full = usage_figures(stub, "open")
    assert full["org:open"] == (sum(acked.values()), 0, len(acked)), "a refused call counted"
    for msg in refused_msgs:  # still full: still refused, still nothing changed
        assert _code(lambda m=msg: stub.Record(m, timeout=30)) == "RESOURCE_EXHAUSTED"
    reserved = 0
    held: list[str] = []
    for i in range(200):  # Authorize until it no longer fits: each ALLOW must be reserved
        rid = f"hold-{i}-" + "y" * 200
        answers: list[pb.AuthorizeResponse] = []
        code = _code(lambda r=rid, a=answers: a.append(
            stub.Authorize(authorize_msg(r, "open", "holder", 1000), timeout=30)))
        if code != "OK":
            assert code == "RESOURCE_EXHAUSTED", code
            break
        resp = answers[0]
        assert resp.decision == pb.ALLOW
        reserved += nanos(resp.reserved)
        held.append(rid)
        assert org_totals(stub, "open")[1] == reserved, "ALLOW without its reservation"
    else:
        raise AssertionError("Authorize never hit the full map")
    assert usage_figures(stub, "open")["org:open"] == (sum(acked.values()), reserved, len(acked))
    assert health_status(server.channel()) == "SERVING"
    assert server.stop() == 0, server.stderr()

    server = start_server(tmp_path / "run1", serve_args(policy_dir, data, "--map-size",
                                                        str(64 << 20)))
    servers.append(server)
    stub = server.stub()
    assert usage_figures(stub, "open")["org:open"] == (sum(acked.values()), reserved,
                                                       len(acked))
    for msg in refused_msgs:
        resp = stub.Record(msg, timeout=30)
        assert not resp.duplicate, "a refused Record had been committed"
        acked[msg.request_id] = nanos(resp.cost)
    for rid in held:
        assert stub.Release(pb.ReleaseRequest(request_id=rid), timeout=30).released
    assert org_totals(stub, "open") == (sum(acked.values()), 0, len(acked))
    assert server.stop() == 0
    books = read_ledger(data)
    assert set(books.journal_ids) == set(acked)
    assert all(n == 1 for n in books.journal_ids.values())
    report(f"map full (1 MiB): {len(acked) - len(refused)} Records and {len(held)} "
           f"reservations fitted, {len(refused)} Records + 1 Authorize refused "
           f"RESOURCE_EXHAUSTED with no change; all intact at 64 MiB, refused ones charged once")


# ------------------------------------------------------------------ stale readers
def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return "gone"


def _pages(data: Path) -> tuple[int, int]:
    """(pages in the data file, pages of live B-tree data) of the environment."""
    env = open_env(data, 256 << 20, readonly=True)
    try:
        info, main = env.info(), env.stat()
        live = main["branch_pages"] + main["leaf_pages"] + main["overflow_pages"]
        with env.begin() as txn:
            for name, _ in txn.cursor():
                stat = txn.stat(env.open_db(bytes(name), txn=txn, create=False))
                live += stat["branch_pages"] + stat["leaf_pages"] + stat["overflow_pages"]
        return int(info["last_pgno"]) + 1, live
    finally:
        env.close()


def _kill_a_reading_worker(server: Server, data: Path, rng: random.Random) -> tuple[int, bool]:
    """SIGSTOP both workers until one holds a read transaction, then kill -9 it.

    Returns (the killed pid, whether it was caught mid-read). Stopping first
    makes the moment exact: the slot seen in the lock file is the one the
    dead process leaves behind.
    """
    kids = children_of(server.pid)
    assert len(kids) == 2, kids
    for _ in range(500):
        for kid in kids:
            os.kill(kid, signal.SIGSTOP)
        for kid in kids:
            wait_until(lambda k=kid: _state(k) == "T", "the worker to stop", interval=0.001)  # type: ignore[misc]
        busy = [kid for kid in kids if kid in readers_table(data)]
        if busy:
            victim = busy[0]
            os.kill(victim, signal.SIGKILL)
            for kid in kids:
                os.kill(kid, signal.SIGCONT)
            return victim, True
        for kid in kids:
            os.kill(kid, signal.SIGCONT)
        time.sleep(rng.uniform(0, 0.005))
    victim = rng.choice(kids)
    os.kill(victim, signal.SIGKILL)
    return victim, False


def stale_reader_cycles(tmp_path: Path, policy: Path, servers: list[Server], cycles: int,
                        seed: int) -> None:
    """Two workers under load; ``cycles`` times kill -9 one mid-read and let it respawn."""
    rng = random.Random(seed)
    members = "\n".join(f'  member "m{i}" chat' for i in range(5000))
    (policy / "big.spend").write_text(  # GetUsage of "big" reads 5,000 counters in one txn
        'org "big" {\n  plan "team"  rates "flat"  timezone "UTC"\n'
        f"  default user_type chat\n{members}\n}}\n", encoding="utf-8")
    data = tmp_path / "data"
    server = start_server(tmp_path / "run", serve_args(policy, data, "--workers", "2"))
    servers.append(server)
    book = ClientBook(seed=seed, users=50)
    stop = threading.Event()
    workers = Workers()
    for _ in range(4):
        workers.spawn(book.run, server.stub(), stop, rng.getrandbits(32), 10.0, True)

    def reader(stub: object) -> None:
        while not stop.is_set():
            try:
                stub.GetUsage(pb.GetUsageRequest(org="big", page_size=1), timeout=10)  # type: ignore[attr-defined]
            except grpc.RpcError:
                time.sleep(0.02)

    for _ in range(6):
        workers.spawn(reader, server.stub())
    caught = stale_seen = 0
    sizes = []
    done = 0
    # At least ``cycles`` kills, and more (up to 3x) until one was caught mid-read and left
    # a slot behind: a random kill can miss the read window, and then nothing was tested.
    while done < cycles or ((not caught or not stale_seen) and done < 3 * cycles):
        done += 1
        target = len(book.recorded) + 100
        wait_until(lambda t=target: len(book.recorded) >= t or workers.failures, "load")  # type: ignore[misc]
        victim, mid_read = _kill_a_reading_worker(server, data, rng)
        caught += mid_read
        wait_until(lambda v=victim: not pid_alive(v), "the worker to die")  # type: ignore[misc]
        stale_seen += bool([p for p in readers_table(data) if not pid_alive(p)])
        # The respawned worker's reader_check() clears the dead process's slots.
        wait_until(lambda: not [p for p in readers_table(data) if not pid_alive(p)],
                   "the killed worker's reader slots to be cleared")
        wait_until(lambda v=victim: len(children_of(server.pid)) == 2, "the respawn")  # type: ignore[misc]
        sizes.append(_pages(data))
    assert caught, "no worker was ever killed while reading: nothing was tested"
    assert stale_seen, "no killed worker left a reader slot: nothing was tested"
    # With every stale slot cleared, freed pages are reused: the file grows no faster than
    # the live data. (A slot left pinned makes it grow ~20 pages per Record.)
    before = _pages(data)
    target = len(book.recorded) + 300
    wait_until(lambda: len(book.recorded) >= target or workers.failures, "steady load")
    after = _pages(data)
    stop.set()
    workers.join()
    grown, live_grown = after[0] - before[0], after[1] - before[1]
    assert grown <= live_grown + 128, (
        f"data file grew {grown} pages while live data grew {live_grown}: pages are not reused "
        f"(sizes per cycle: {sizes})")
    stub = server.stub()
    book.settle(stub)
    book.verify(stub)
    assert server.stop() == 0, server.stderr()
    lost, double = book.verify_files(data)
    report(f"stale readers: {done} workers killed ({caught} mid-read, {stale_seen} left slots, "
           f"all cleared), file pages per cycle {[s[0] for s in sizes]}, then +{grown} pages for "
           f"+{live_grown} live over 300 Records; {len(book.recorded)} recorded, lost {lost}, "
           f"double {double}")


@pytest.mark.slow
def test_stale_readers_of_killed_workers_are_cleared_and_the_file_stays_bounded(
        tmp_path: Path, policy_dir: Path, servers: list[Server]) -> None:
    """--workers 2, a worker killed mid-read 3 times: its reader slots are cleared on respawn,
    pages are reused afterwards (file growth <= live growth), the books still balance."""
    stale_reader_cycles(tmp_path, policy_dir, servers, 3, seed=random.randrange(2**32))


@pytest.mark.soak
@pytest.mark.timeout(900)
def test_stale_readers_soak(tmp_path: Path, policy_dir: Path, servers: list[Server]) -> None:
    """The same over 20 kills."""
    stale_reader_cycles(tmp_path, policy_dir, servers, 20, seed=random.randrange(2**32))

