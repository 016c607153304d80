"""spendkeeper.v1 bindings, generated from proto/sidecar/api/v1/ by scripts/gen_proto.sh."""
