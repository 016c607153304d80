"""The committed gRPC bindings are exactly what the proto and pinned grpcio-tools produce."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from sidecar.api.v1 import spendkeeper_pb2, spendkeeper_pb2_grpc

ROOT = Path(__file__).resolve().parents[2]
GENERATED = (
    "sidecar/api/v1/spendkeeper_pb2.py",
    "sidecar/api/v1/spendkeeper_pb2.pyi",
    "sidecar/api/v1/spendkeeper_pb2_grpc.py",
)


@pytest.mark.parametrize("relpath", GENERATED)
def test_committed_bindings_match_regeneration(relpath: str, tmp_path: Path) -> None:
    """scripts/gen_proto.sh reproduces each committed file byte for byte (run `make proto`)."""
    env = {**os.environ, "PYTHON": sys.executable}
    subprocess.run(
        ["bash", str(ROOT / "scripts" / "gen_proto.sh"), str(tmp_path)],
        check=True,
        env=env,
        capture_output=True,
    )
    assert (tmp_path / relpath).read_bytes() == (ROOT / relpath).read_bytes(), (
        f"{relpath} is stale: run `make proto` and commit the result"
    )


def test_service_wire_name_and_methods() -> None:
    """The service is spendkeeper.v1.SpendKeeper with the four contract rpcs and their types."""
    service = spendkeeper_pb2.DESCRIPTOR.services_by_name["SpendKeeper"]
    assert service.full_name == "spendkeeper.v1.SpendKeeper"
    methods = {m.name: (m.input_type.name, m.output_type.name) for m in service.methods}
    assert methods == {
        "Authorize": ("AuthorizeRequest", "AuthorizeResponse"),
        "Record": ("RecordRequest", "RecordResponse"),
        "Release": ("ReleaseRequest", "ReleaseResponse"),
        "GetUsage": ("GetUsageRequest", "GetUsageResponse"),
    }
    for name in ("SpendKeeperStub", "SpendKeeperServicer", "add_SpendKeeperServicer_to_server"):
        assert hasattr(spendkeeper_pb2_grpc, name)


def test_reason_enum_numbers_are_stable() -> None:
    """Reason values keep the numbers gateways may have stored or switched on."""
    assert dict(spendkeeper_pb2.Reason.items()) == {
        "REASON_UNSPECIFIED": 0,
        "WITHIN_LIMITS": 1,
        "ORG_LIMIT": 2,
        "USER_TYPE_LIMIT": 3,
        "USER_LIMIT": 4,
        "PRODUCT_NOT_ENTITLED": 5,
        "MODEL_NOT_ALLOWED": 6,
        "UNKNOWN_MODEL": 7,
        "UNKNOWN_ORG": 8,
        "UNKNOWN_USER": 9,
    }
