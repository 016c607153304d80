#!/usr/bin/env bash
# Regenerates the committed gRPC/protobuf bindings (sidecar/api/v1/spendkeeper_pb2.py,
# spendkeeper_pb2.pyi, spendkeeper_pb2_grpc.py) from proto/ with the pinned grpcio-tools.
#
# Usage: scripts/gen_proto.sh [OUT_DIR]   (default: the repo root, i.e. in place)
# The interpreter is $PYTHON, else .venv/bin/python, else python3.
# tests/sidecar/test_proto_generated.py runs this into a temp dir and diffs the result.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
out="$(mkdir -p "${1:-$root}" && cd "${1:-$root}" && pwd)"
if [[ -z "${PYTHON:-}" ]]; then
    if [[ -x "$root/.venv/bin/python" ]]; then PYTHON="$root/.venv/bin/python"; else PYTHON=python3; fi
fi

cd "$root"
# Relative proto path: protoc records it in the generated descriptors, so the
# output is identical wherever the repo is checked out.
"$PYTHON" -m grpc_tools.protoc -Iproto \
    --python_out="$out" --pyi_out="$out" --grpc_python_out="$out" \
    proto/sidecar/api/v1/spendkeeper.proto
