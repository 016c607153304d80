"""The sidecar's servicer behind a ``grpc.aio`` server: the other server model, for comparison.

``python -m bench.aio_server --policy DIR --data-dir DIR [--port 0]`` wires
the same policy, ledger, metrics and :class:`SpendKeeperService` as
``spendkeeper serve`` but serves them from one asyncio event loop: Authorize
runs inline on the loop (it never blocks: one LMDB write transaction, no
fsync); Record, whose durable acknowledgement waits for an fsync, runs in a
small thread pool so it cannot stall the loop. Only the happy path is
faithful (an error would need the aio context's awaitable ``abort``): it is a
benchmark of the server model, not a server to deploy.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
from collections.abc import Sequence
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
from prometheus_client import CollectorRegistry

from policy.compile import load
from sidecar.api.v1 import spendkeeper_pb2 as pb
from sidecar.ledger import Ledger
from sidecar.metrics import Metrics
from sidecar.service import SERVICE_NAME, PolicyHolder, SpendKeeperService

__all__ = ["main"]


async def _serve(policy: Path, data_dir: Path, port: int) -> None:
    service = SpendKeeperService(PolicyHolder(load(policy)), Ledger(data_dir, map_size=1 << 30),
                                 Metrics(CollectorRegistry()))
    pool = futures.ThreadPoolExecutor(max_workers=8, thread_name_prefix="record")
    loop = asyncio.get_running_loop()

    async def authorize(request: Any, context: Any) -> Any:
        return service.Authorize(request, context)

    async def record(request: Any, context: Any) -> Any:
        return await loop.run_in_executor(pool, service.Record, request, context)

    handler = grpc.method_handlers_generic_handler(SERVICE_NAME, {
        "Authorize": grpc.unary_unary_rpc_method_handler(
            authorize, request_deserializer=pb.AuthorizeRequest.FromString,
            response_serializer=pb.AuthorizeResponse.SerializeToString),
        "Record": grpc.unary_unary_rpc_method_handler(
            record, request_deserializer=pb.RecordRequest.FromString,
            response_serializer=pb.RecordResponse.SerializeToString),
    })
    server = grpc.aio.server(handlers=[handler])
    bound = server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    done = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, done.set)
    loop.add_signal_handler(signal.SIGINT, done.set)
    print(f"aio: serving (port {bound})", flush=True)
    await done.wait()
    await server.stop(0.5)
    pool.shutdown()
    service.ledger.close()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.aio_server")
    parser.add_argument("--policy", required=True, type=Path)
    parser.add_argument("--data-dir", required=True, type=Path)
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args(argv)
    asyncio.run(_serve(args.policy, args.data_dir, args.port))
    return 0


if __name__ == "__main__":
    sys.exit(main())
