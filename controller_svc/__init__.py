"""The Controller gRPC service around the pure controller library."""
