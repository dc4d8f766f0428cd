"""Use cases: commands and queries dispatched through typed buses. Imports no grpc, no torch."""
