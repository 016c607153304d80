"""SPEC §4 bad input: INVALID_ARGUMENT naming the field, and nothing changes.

Each case sends one malformed request to the shared sidecar, expects
INVALID_ARGUMENT with the field's name in the message, and checks that the
org's figures are unchanged and that a valid request id used by the bad
request was not consumed (it still works with a valid payload).
"""

from __future__ import annotations

from collections.abc import Callable

import grpc
import pytest
from _server_support import (
    PERIOD,
    Server,
    authorize_request,
    new_id,
    record_request,
)

from sidecar.api.v1 import spendkeeper_pb2 as pb
from sidecar.api.v1 import spendkeeper_pb2_grpc as pb_grpc

USER = "validation@acme.com"


def _snapshot(stub: pb_grpc.SpendKeeperStub) -> bytes:
    resp = stub.GetUsage(pb.GetUsageRequest(org="acme", period=PERIOD), timeout=10)
    return resp.SerializeToString(deterministic=True)


def _authorize(rid: str, **estimate: int) -> pb.AuthorizeRequest:
    msg = authorize_request("acme", USER, "0.01", request_id=rid)
    for name, value in estimate.items():
        setattr(msg.estimate, name, value)
    return msg


def _record(rid: str, **usage: int) -> pb.RecordRequest:
    msg = record_request("acme", USER, "0.01", request_id=rid)
    for name, value in usage.items():
        setattr(msg.usage, name, value)
    return msg


def _raw_enum(rid: str) -> pb.AuthorizeRequest:
    msg = _authorize(rid)
    msg.service_tier = 42  # type: ignore[assignment]  # an open enum keeps unknown values
    return msg


def _raw_speed(rid: str) -> pb.RecordRequest:
    msg = _record(rid)
    msg.speed = 9  # type: ignore[assignment]
    return msg


Build = Callable[[str], pb.AuthorizeRequest | pb.RecordRequest]
CASES: list[tuple[str, str, Build, str]] = [
    ("empty-request-id", "Authorize", lambda rid: _authorize(""), "request_id is required"),
    ("300-byte-request-id", "Authorize", lambda rid: _authorize("x" * 300),
     "request_id is longer than 256 bytes"),
    ("300-byte-request-id-record", "Record", lambda rid: _record("é" * 150),
     "request_id is longer than 256 bytes"),
    ("negative-tokens", "Authorize", lambda rid: _authorize(rid, input_tokens=-1),
     "estimate.input_tokens is negative (-1)"),
    ("negative-tokens-record", "Record", lambda rid: _record(rid, cache_read_tokens=-5),
     "usage.cache_read_tokens is negative (-5)"),
    ("absurd-tokens", "Authorize", lambda rid: _authorize(rid, output_tokens=10**12),
     "estimate.output_tokens is absurdly large"),
    ("absurd-tokens-record", "Record", lambda rid: _record(rid, input_tokens=2**62),
     "usage.input_tokens is absurdly large"),
    ("unknown-service-tier", "Authorize", _raw_enum, "service_tier has unknown value 42"),
    ("unknown-speed", "Record", _raw_speed, "speed has unknown value 9"),
    ("empty-org", "Authorize", lambda rid: authorize_request("", USER, "1", request_id=rid),
     "org is required"),
]


@pytest.mark.parametrize(("rpc", "build", "expected"), [c[1:] for c in CASES],
                         ids=[c[0] for c in CASES])
def test_bad_field_is_invalid_argument_naming_it_and_changes_nothing(
        shared_server: Server, rpc: str, build: Build, expected: str) -> None:
    """The message names the field; figures are unchanged; the request id stays unused."""
    stub = shared_server.stub()
    rid = new_id()
    before = _snapshot(stub)
    with pytest.raises(grpc.RpcError) as err:
        getattr(stub, rpc)(build(rid), timeout=10)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert expected in err.value.details()
    assert _snapshot(stub) == before
    valid = _authorize(rid) if rpc == "Authorize" else _record(rid)
    getattr(stub, rpc)(valid, timeout=10)  # not FAILED_PRECONDITION: the id was not consumed


def test_request_id_of_exactly_256_bytes_is_accepted(shared_server: Server) -> None:
    """The id limit is inclusive: 256 bytes of UTF-8 (128 two-byte characters) is fine."""
    stub = shared_server.stub()
    resp = stub.Authorize(_authorize("é" * 128), timeout=10)
    assert resp.decision == pb.ALLOW


def _with_bad_utf8(msg: pb.AuthorizeRequest | pb.RecordRequest, field: str) -> bytes:
    """``msg`` serialized with the value of string ``field`` replaced by invalid UTF-8."""
    placeholder = "PLACEHOLDER-VALUE"
    setattr(msg, field, placeholder)
    data = msg.SerializeToString()
    assert data.count(placeholder.encode()) == 1
    return data.replace(placeholder.encode(), b"\xff\xfe" + b"x" * (len(placeholder) - 2))


@pytest.mark.parametrize(("rpc", "field"), [
    ("Authorize", "org"), ("Authorize", "request_id"), ("Record", "user"), ("Record", "model"),
])
def test_invalid_utf8_is_invalid_argument_naming_the_field_and_changes_nothing(
        shared_server: Server, rpc: str, field: str) -> None:
    """Raw non-UTF-8 bytes in a string field: INVALID_ARGUMENT "<field> is not valid UTF-8"."""
    stub = shared_server.stub()
    rid = new_id()
    msg = _authorize(rid) if rpc == "Authorize" else _record(rid)
    raw = shared_server.channel().unary_unary(f"/spendkeeper.v1.SpendKeeper/{rpc}")
    before = _snapshot(stub)
    with pytest.raises(grpc.RpcError) as err:
        raw(_with_bad_utf8(msg, field), timeout=10)  # identity (de)serializers: bytes on the wire
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert err.value.details() == f"{field} is not valid UTF-8"
    assert _snapshot(stub) == before
    valid = _authorize(rid) if rpc == "Authorize" else _record(rid)
    getattr(stub, rpc)(valid, timeout=10)


def test_garbage_bytes_are_invalid_argument(shared_server: Server) -> None:
    """Bytes that are no protobuf message at all are INVALID_ARGUMENT, not a crash."""
    raw = shared_server.channel().unary_unary("/spendkeeper.v1.SpendKeeper/Record")
    with pytest.raises(grpc.RpcError) as err:
        raw(b"\xff\xff\xff\xff", timeout=10)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "malformed request" in err.value.details()


def test_release_and_get_usage_validate_their_fields(shared_server: Server) -> None:
    """Release with an empty id and GetUsage with a bad period are INVALID_ARGUMENT."""
    stub = shared_server.stub()
    with pytest.raises(grpc.RpcError) as release:
        stub.Release(pb.ReleaseRequest(request_id=""), timeout=10)
    assert release.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "request_id is required" in release.value.details()
    with pytest.raises(grpc.RpcError) as period:
        stub.GetUsage(pb.GetUsageRequest(org="acme", period="2031-13"), timeout=10)
    assert period.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "period" in period.value.details()
