"""SPEC §4/§6 operations: health, reflection and graceful shutdown of the real process."""

from __future__ import annotations

import signal
import threading
from decimal import Decimal
from pathlib import Path

import grpc
from _server_support import (
    SERVICE,
    Server,
    copy_policy,
    health_status,
    record_request,
    serve_args,
    start_server,
    usd,
    user_line,
)
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)

from sidecar.api.v1 import spendkeeper_pb2 as pb

GRACE = 10.0


def test_health_is_serving_for_the_server_and_the_service(shared_server: Server) -> None:
    """grpc.health.v1: "" (the server) and spendkeeper.v1.SpendKeeper answer SERVING."""
    chan = shared_server.channel()
    assert health_status(chan, "") == "SERVING"
    assert health_status(chan, SERVICE) == "SERVING"


def test_reflection_lists_the_service_and_describes_its_methods(shared_server: Server) -> None:
    """Server reflection (v1alpha) lists spendkeeper.v1.SpendKeeper and serves its descriptor."""
    database = ProtoReflectionDescriptorDatabase(shared_server.channel())
    services = set(database.get_services())
    assert {SERVICE, "grpc.health.v1.Health",
            "grpc.reflection.v1alpha.ServerReflection"} <= services
    proto = database.FindFileContainingSymbol(SERVICE)
    assert proto.package == "spendkeeper.v1"
    methods = {m.name for s in proto.service for m in s.method}
    assert methods == {"Authorize", "Record", "Release", "GetUsage"}


def test_health_turns_not_serving_on_sigterm_and_the_process_exits_0(tmp_path: Path) -> None:
    """A health Watch sees SERVING, then NOT_SERVING once SIGTERM arrives; exit status 0."""
    server = start_server(tmp_path / "run", serve_args(copy_policy(tmp_path / "policy"),
                                                       tmp_path / "data"))
    try:
        watch = health_pb2_grpc.HealthStub(server.channel()).Watch(
            health_pb2.HealthCheckRequest(service=SERVICE), timeout=GRACE + 20)
        statuses = [next(watch).status]
        server.send(signal.SIGTERM)
        statuses.append(next(watch).status)
        watch.cancel()  # a Watch never ends by itself; don't make the drain wait for it
        assert statuses == [health_pb2.HealthCheckResponse.SERVING,
                            health_pb2.HealthCheckResponse.NOT_SERVING]
    finally:
        code = server.stop(timeout=GRACE + 10)
    assert code == 0, server.stderr()


def test_sigterm_drains_and_every_acknowledged_record_survives_a_restart(tmp_path: Path) -> None:
    """Records from 16 threads; SIGTERM mid-stream; exit 0 within the grace; after a
    restart every Record that was answered OK is in the ledger (a resend is a duplicate
    with the same cost) and the ledger's total is exactly the recorded requests."""
    policy, data = copy_policy(tmp_path / "policy"), tmp_path / "data"
    args = serve_args(policy, data, "--shutdown-grace", str(GRACE))
    server = start_server(tmp_path / "run1", args)
    user = "drain@acme.com"
    acked: list[pb.RecordRequest] = []
    failures: list[grpc.StatusCode] = []
    lock = threading.Lock()
    enough = threading.Event()

    def hammer(stub: object) -> None:
        while True:
            request = record_request("acme", user, "0.001")
            try:
                stub.Record(request, timeout=GRACE + 10)  # type: ignore[attr-defined]
            except grpc.RpcError as exc:
                with lock:
                    failures.append(exc.code())
                return
            with lock:
                acked.append(request)
                if len(acked) >= 200:
                    enough.set()

    threads = [threading.Thread(target=hammer, args=(server.stub(),)) for _ in range(16)]
    for thread in threads:
        thread.start()
    enough.wait(timeout=60)
    server.send(signal.SIGTERM)
    try:
        code = server.process.wait(timeout=GRACE)  # drained within the grace period
    finally:
        for thread in threads:
            thread.join(timeout=30)
    assert code == 0, server.stderr()
    assert all(not t.is_alive() for t in threads)
    assert len(failures) == 16  # every thread ran until the server stopped taking calls
    assert len(acked) >= 200
    server.stop()

    restarted = start_server(tmp_path / "run2", args)
    try:
        stub = restarted.stub()
        line = user_line(stub.GetUsage(pb.GetUsageRequest(org="acme", period="2031-03",
                                                          user=user), timeout=10), user)
        assert line is not None
        assert usd(line.spent) == Decimal("0.001") * line.requests
        assert line.requests >= len(acked)
        for request in acked:
            again = stub.Record(request, timeout=10)
            assert again.duplicate, f"acknowledged Record {request.request_id} was lost"
            assert usd(again.cost) == Decimal("0.001")
        after = user_line(stub.GetUsage(pb.GetUsageRequest(org="acme", period="2031-03",
                                                           user=user), timeout=10), user)
        assert after == line
    finally:
        assert restarted.stop() == 0

