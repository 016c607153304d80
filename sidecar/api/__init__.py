"""Generated gRPC/protobuf bindings of the spendkeeper API, one subpackage per version."""
