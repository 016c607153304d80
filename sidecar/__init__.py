"""The spendkeeper sidecar: gRPC server, LMDB ledger, metrics, notifications and CLI."""
