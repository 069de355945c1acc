"""Generated Python stubs of Dragoman's gRPC contract (proto/); regenerate with `make proto`."""
