"""A bare grpcio server, the yardstick for the sidecar's gRPC overhead.

``python -m bench.echo_server --port 0 --threads 8 --size N`` serves every
unary method (any service, any name) with a generic handler on raw bytes: no
protobuf parsing, no work, and a constant response of ``N`` bytes (the
serialized size of a real AuthorizeResponse). It prints ``echo: port P`` once
listening and stops on SIGTERM. It is what "a bare grpcio server" costs per
call on this machine: the sidecar's throughput is reported as a ratio of it.
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading
from collections.abc import Sequence
from concurrent import futures
from typing import Any

import grpc

__all__ = ["main", "response_of_size"]


class _AnyMethod(grpc.GenericRpcHandler):  # type: ignore[type-arg]
    """Answers every method with the same bytes (no (de)serializers: raw bytes)."""

    def __init__(self, response: bytes) -> None:
        def handle(request: bytes, context: grpc.ServicerContext) -> bytes:
            return response

        self._handler = grpc.unary_unary_rpc_method_handler(handle)

    def service(self, handler_call_details: Any) -> Any:
        return self._handler


def response_of_size(size: int) -> bytes:
    """A valid AuthorizeResponse (ALLOW, a padded message) of ``size`` bytes.

    (One byte short for the few sizes where the length prefix grows a byte.)
    """
    head = b"\x08\x01\x1a"  # decision = ALLOW; field 3 (message), length-delimited
    for length in range(max(size - len(head) - 1, 0), -1, -1):
        varint = _varint(length)
        if len(head) + len(varint) + length <= size:
            return head + varint + b"x" * length
    return head + b"\x00"


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.echo_server")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--threads", type=int, default=8)
    parser.add_argument("--size", type=int, default=200, help="response size in bytes")
    args = parser.parse_args(argv)
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=args.threads),
                         handlers=[_AnyMethod(response_of_size(args.size))])
    port = server.add_insecure_port(f"{args.host}:{args.port}")
    server.start()
    done = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: done.set())
    signal.signal(signal.SIGINT, lambda *_: done.set())
    print(f"echo: port {port}", flush=True)
    while not done.wait(0.2):
        pass
    server.stop(0.5).wait(2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
