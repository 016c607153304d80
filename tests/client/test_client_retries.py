"""Retries, deadlines and fail modes: a stalled sidecar, a lost answer, nobody listening."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Callable
from decimal import Decimal
from typing import Any

import grpc
import pytest
from _client_support import MODEL, ROOT, WORST_1K_1K, ChildServer

from sidecar.api.v1 import spendkeeper_pb2 as pb
from sidecar.client import (
    REASON_SIDECAR_UNAVAILABLE,
    InvalidRequest,
    SidecarUnavailable,
    SpendKeeperClient,
    money_to_decimal,
)


class Attempts(grpc.UnaryUnaryClientInterceptor):  # type: ignore[type-arg]
    """Notes the method and request_id of every attempt that leaves the client."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, str]] = []

    def intercept_unary_unary(self, continuation: Callable[..., Any], details: Any,
                              request: Any) -> Any:
        self.seen.append((details.method.rsplit("/", 1)[-1], getattr(request, "request_id", "")))
        return continuation(details, request)


class _LostAnswer(grpc.RpcError):
    def result(self, timeout: float | None = None) -> Any:
        raise self

    def code(self) -> grpc.StatusCode:
        return grpc.StatusCode.UNAVAILABLE

    def details(self) -> str:
        return "answer lost on the way back (simulated)"


class LoseFirstAnswer(Attempts):
    """Lets the first attempt reach the server, then drops its answer."""

    def intercept_unary_unary(self, continuation: Callable[..., Any], details: Any,
                              request: Any) -> Any:
        outcome = super().intercept_unary_unary(continuation, details, request)
        if len(self.seen) == 1:
            outcome.result()  # the server has acted on it
            return _LostAnswer()
        return outcome


def _dead_target() -> str:
    """An address nobody listens on."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"127.0.0.1:{port}"


def test_lost_answer_is_retried_with_the_same_id_and_reserved_once(server: str) -> None:
    """The server acted on attempt 1 but its answer was lost: the retry is not charged twice."""
    spy = LoseFirstAnswer()
    with SpendKeeperClient(server, timeout=5.0, retries=2, interceptors=[spy]) as client:
        auth = client.authorize("lost-1", "acme", "bob", "chat", MODEL,
                                input_tokens=1000, max_output_tokens=1000)
        reserved = money_to_decimal(client.usage("acme").org.reserved)
    assert auth.allowed
    assert auth.attempts == 2
    assert spy.seen[:2] == [("Authorize", "lost-1"), ("Authorize", "lost-1")]
    assert reserved == WORST_1K_1K


@pytest.mark.slow
def test_stalled_sidecar_retry_reuses_the_request_id(subprocess_server: ChildServer) -> None:
    """SIGSTOP the sidecar, authorize (attempts time out), SIGCONT: one reservation only."""
    spy = Attempts()
    pid = subprocess_server.process.pid
    with SpendKeeperClient(subprocess_server.target, timeout=0.05, retries=4, backoff=0.05,
                           interceptors=[spy]) as client:
        client.usage("acme")  # connected before the stall
        os.kill(pid, signal.SIGSTOP)
        resume = threading.Timer(0.2, os.kill, (pid, signal.SIGCONT))
        resume.start()
        try:
            auth = client.authorize("stall-1", "acme", "alice@acme.com", "chat", MODEL,
                                    input_tokens=1000, max_output_tokens=1000)
        finally:
            resume.join()
            os.kill(pid, signal.SIGCONT)
        report = client.usage("acme", timeout=5.0)
    assert auth.allowed, auth
    assert auth.attempts >= 2
    authorize_ids = [rid for method, rid in spy.seen if method == "Authorize"]
    assert authorize_ids == ["stall-1"] * auth.attempts
    assert money_to_decimal(report.org.reserved) == WORST_1K_1K


@pytest.mark.parametrize(("mode", "allowed"), [("closed", False), ("open", True)])
def test_unreachable_sidecar_follows_the_fail_mode(mode: str, allowed: bool) -> None:
    """After every retry fails, "closed" denies and "open" allows with fail_open=True."""
    spy = Attempts()
    with SpendKeeperClient(_dead_target(), retries=2, backoff=0.001, fail_mode=mode,  # type: ignore[arg-type]
                           interceptors=[spy]) as client:
        auth = client.authorize("u-1", "acme", "bob", "chat", MODEL, max_output_tokens=10)
    assert (auth.allowed, auth.fail_open) == (allowed, allowed)
    assert auth.reason == REASON_SIDECAR_UNAVAILABLE
    assert auth.reserved == 0
    assert auth.attempts == 3
    assert spy.seen == [("Authorize", "u-1")] * 3


def test_unreachable_record_raises_and_can_be_resent(server: str) -> None:
    """A Record that cannot be delivered raises with its request; resending it later works."""
    with SpendKeeperClient(_dead_target(), retries=1, backoff=0.001,
                           fail_mode="open") as dead, \
            pytest.raises(SidecarUnavailable) as info:
        dead.record("late-1", "acme", "bob", "chat", MODEL, input_tokens=1_000_000)
    kept = info.value.request
    assert isinstance(kept, pb.RecordRequest)
    assert info.value.attempts == 2
    with SpendKeeperClient(server, timeout=5.0) as live:
        recorded = live.resend_record(kept)
        assert recorded.cost == Decimal(3)
        assert live.resend_record(kept).duplicate


def test_invalid_argument_is_not_retried(server: str) -> None:
    """INVALID_ARGUMENT is raised after exactly one attempt."""
    spy = Attempts()
    with SpendKeeperClient(server, timeout=5.0, retries=3, interceptors=[spy]) as client, \
            pytest.raises(InvalidRequest):
        client.authorize("", "acme", "bob", "chat", MODEL, max_output_tokens=10)
    assert spy.seen == [("Authorize", "")]


def test_client_rejects_bad_settings() -> None:
    """fail_mode, timeout, retries and backoff are checked when the client is made."""
    for kwargs in ({"fail_mode": "maybe"}, {"timeout": 0}, {"retries": -1}, {"backoff": -1}):
        with pytest.raises(ValueError, match="must be"):
            SpendKeeperClient("127.0.0.1:1", **kwargs)


@pytest.mark.slow
def test_example_gateway_runs(subprocess_server: ChildServer) -> None:
    """examples/gateway.py authorizes, records and reports usage against a real sidecar."""
    result = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "gateway.py"), "--target",
         subprocess_server.target, "--requests", "4", "--model", MODEL, "--seed", "1"],
        capture_output=True, text=True, timeout=60, cwd=ROOT, check=False,
        env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.count("ALLOW") == 4
    assert "usage for acme" in result.stdout
