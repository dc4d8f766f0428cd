"""Client-side exceptions: one class per gRPC status code the server uses.

Callers catch a class (`except NotFound`) instead of comparing status codes, and get the
google.rpc rich details (BadRequest, ErrorInfo, RetryInfo) already decoded.
"""

from __future__ import annotations

from typing import Any, cast

import grpc
from google.rpc import error_details_pb2
from grpc_status import rpc_status

__all__ = [
    "AlreadyExists",
    "DeadlineExceeded",
    "FailedPrecondition",
    "Internal",
    "InvalidArgument",
    "LoracleError",
    "NotFound",
    "PermissionDenied",
    "ResourceExhausted",
    "Unauthenticated",
    "Unavailable",
    "Unimplemented",
    "from_rpc_error",
]


class LoracleError(Exception):
    """Any error the server (or the channel) reported; subclasses narrow it by status code."""

    default_code = grpc.StatusCode.UNKNOWN

    def __init__(
        self,
        message: str,
        *,
        code: grpc.StatusCode | None = None,
        reason: str = "",
        metadata: dict[str, str] | None = None,
        field_violations: list[tuple[str, str]] | None = None,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message)
        self.code: grpc.StatusCode = code if code is not None else self.default_code
        self.message = message
        self.reason = reason
        self.metadata: dict[str, str] = dict(metadata or {})
        self.field_violations: list[tuple[str, str]] = list(field_violations or [])
        self.retry_after = retry_after

    @property
    def correlation_id(self) -> str:
        """The id to quote when reporting an INTERNAL error; the server logs it."""
        return self.metadata.get("correlation_id", "")

    def __str__(self) -> str:
        return f"{self.code.name}: {self.message}"

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.code.name}, {self.message!r}, reason={self.reason!r})"


class InvalidArgument(LoracleError):
    default_code = grpc.StatusCode.INVALID_ARGUMENT


class NotFound(LoracleError):
    default_code = grpc.StatusCode.NOT_FOUND


class AlreadyExists(LoracleError):
    default_code = grpc.StatusCode.ALREADY_EXISTS


class FailedPrecondition(LoracleError):
    default_code = grpc.StatusCode.FAILED_PRECONDITION


class PermissionDenied(LoracleError):
    default_code = grpc.StatusCode.PERMISSION_DENIED


class Unauthenticated(LoracleError):
    default_code = grpc.StatusCode.UNAUTHENTICATED


class ResourceExhausted(LoracleError):
    default_code = grpc.StatusCode.RESOURCE_EXHAUSTED


class Unavailable(LoracleError):
    default_code = grpc.StatusCode.UNAVAILABLE


class Unimplemented(LoracleError):
    default_code = grpc.StatusCode.UNIMPLEMENTED


class DeadlineExceeded(LoracleError):
    default_code = grpc.StatusCode.DEADLINE_EXCEEDED


class Internal(LoracleError):
    default_code = grpc.StatusCode.INTERNAL


_CLASS_BY_CODE: dict[grpc.StatusCode, type[LoracleError]] = {
    cls.default_code: cls
    for cls in (
        InvalidArgument,
        NotFound,
        AlreadyExists,
        FailedPrecondition,
        PermissionDenied,
        Unauthenticated,
        ResourceExhausted,
        Unavailable,
        Unimplemented,
        DeadlineExceeded,
        Internal,
    )
}


def _rich_status(err: grpc.RpcError) -> Any:
    """The decoded google.rpc.Status, or None.

    grpc_status's `from_call` returns an untyped message and raises when the trailer disagrees
    with the status line; both are contained here, so a garbled trailer still yields an error
    with the plain status code.
    """
    try:
        # Sync errors are grpc.Call objects; AioRpcError only has the same accessors.
        return rpc_status.from_call(cast(grpc.Call, err))
    except (AttributeError, ValueError, TypeError):
        return None


def from_rpc_error(err: grpc.RpcError) -> LoracleError:
    """Converts a failed call (sync or grpc.aio) into the matching LoracleError subclass."""
    code_fn = getattr(err, "code", None)
    code = code_fn() if callable(code_fn) else None
    if not isinstance(code, grpc.StatusCode):
        code = grpc.StatusCode.UNKNOWN
    details_fn = getattr(err, "details", None)
    details = details_fn() if callable(details_fn) else None
    message: str = details if isinstance(details, str) and details else code.name

    reason = ""
    metadata: dict[str, str] = {}
    violations: list[tuple[str, str]] = []
    retry_after: float | None = None
    status = _rich_status(err)
    if status is not None:
        for detail in status.details:
            if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
                bad_request = error_details_pb2.BadRequest()
                detail.Unpack(bad_request)
                violations.extend(
                    (str(v.field), str(v.description)) for v in bad_request.field_violations
                )
            elif detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
                info = error_details_pb2.ErrorInfo()
                detail.Unpack(info)
                reason = str(info.reason)
                metadata.update({str(k): str(v) for k, v in info.metadata.items()})
            elif detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
                retry = error_details_pb2.RetryInfo()
                detail.Unpack(retry)
                delay = retry.retry_delay
                retry_after = int(delay.seconds) + int(delay.nanos) / 1e9

    cls = _CLASS_BY_CODE.get(code, LoracleError)
    return cls(
        message,
        code=code,
        reason=reason,
        metadata=metadata,
        field_violations=violations,
        retry_after=retry_after,
    )
