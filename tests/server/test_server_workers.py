"""SPEC §5/§7 ``--workers 2``: two processes on one port (SO_REUSEPORT), one LMDB ledger."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from _server_support import (
    PERIOD,
    TCP_ESTABLISHED,
    TCP_LISTEN,
    authorize_request,
    copy_policy,
    serve_args,
    start_server,
    tcp_sockets,
    usd,
    user_line,
    wait_until,
)

from bench.procfs import children_of, socket_inodes
from sidecar.api.v1 import spendkeeper_pb2 as pb
from sidecar.api.v1 import spendkeeper_pb2_grpc as pb_grpc

CHANNELS = 16
CALLS = 200


def test_two_workers_share_the_port_and_enforce_one_budget(tmp_path: Path) -> None:
    """200 concurrent $0.25 Authorizes of one $10 user over 16 connections: both worker
    processes hold connections, and exactly 40 are allowed (one budget across processes)."""
    server = start_server(tmp_path / "run", serve_args(copy_policy(tmp_path / "policy"),
                                                       tmp_path / "data", "--workers", "2"))
    try:
        workers = children_of(server.pid)
        assert len(workers) == 2, workers
        port = int(server.target.rsplit(":", 1)[1])

        def listening(pid: int) -> bool:
            return any(lport == port and state == TCP_LISTEN and inode in socket_inodes(pid)
                       for _, lport, state, inode in tcp_sockets(pid))

        # Health answered from one worker; the other may still be binding.
        wait_until(lambda: all(listening(pid) for pid in workers), "both workers to listen")
        # A local subchannel pool per channel: one TCP connection each, which the kernel
        # spreads over the two listening sockets (a 2 / 2**16 chance of all on one).
        stubs = [pb_grpc.SpendKeeperStub(server.channel([("grpc.use_local_subchannel_pool", 1)]))
                 for _ in range(CHANNELS)]
        user = "shared-budget@acme.com"
        requests = [authorize_request("acme", user, "0.25") for _ in range(CALLS)]
        with ThreadPoolExecutor(max_workers=32) as pool:
            answers = list(pool.map(lambda i: stubs[i % CHANNELS].Authorize(requests[i],
                                                                             timeout=30),
                                    range(CALLS)))
        allowed = [a for a in answers if a.decision == pb.ALLOW]
        assert len(allowed) == 40  # floor($10 / $0.25)
        assert {a.reason for a in answers if a.decision == pb.DENY} == {pb.USER_LIMIT}

        established = {inode for _, lport, state, inode in tcp_sockets(server.pid)
                       if lport == port and state == TCP_ESTABLISHED}
        per_worker = {pid: len(socket_inodes(pid) & established) for pid in workers}
        assert all(count > 0 for count in per_worker.values()), per_worker
        assert sum(per_worker.values()) == CHANNELS

        for stub in stubs[:4]:  # whichever process answers, the ledger is the same
            line = user_line(stub.GetUsage(pb.GetUsageRequest(org="acme", period=PERIOD,
                                                              user=user), timeout=10), user)
            assert line is not None
            assert usd(line.reserved) == 10
    finally:
        code = server.stop()
    assert code == 0, server.stderr()
    assert all(not Path(f"/proc/{pid}").exists() for pid in workers)
