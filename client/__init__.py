"""Python clients for the Loracle gRPC API (blocking and asyncio) and their error classes."""

from __future__ import annotations

from client._requests import Tls
from client.async_client import AsyncLoracleClient
from client.catalog import read_catalog_jsonl
from client.errors import (
    AlreadyExists,
    DeadlineExceeded,
    FailedPrecondition,
    Internal,
    InvalidArgument,
    LoracleError,
    NotFound,
    PermissionDenied,
    ResourceExhausted,
    Unauthenticated,
    Unavailable,
    Unimplemented,
    from_rpc_error,
)
from client.sync_client import LoracleClient

__all__ = [
    "AlreadyExists",
    "AsyncLoracleClient",
    "DeadlineExceeded",
    "FailedPrecondition",
    "Internal",
    "InvalidArgument",
    "LoracleClient",
    "LoracleError",
    "NotFound",
    "PermissionDenied",
    "ResourceExhausted",
    "Tls",
    "Unauthenticated",
    "Unavailable",
    "Unimplemented",
    "from_rpc_error",
    "read_catalog_jsonl",
]
