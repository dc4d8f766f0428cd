"""The one table from domain errors to gRPC status codes, with google.rpc rich details.
Anything not in the table is a bug: the client gets INTERNAL with a correlation id, never the
exception text or a stack trace, and the log gets the stack trace under the same id."""

from __future__ import annotations

import logging

import grpc
from google.protobuf import duration_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

from server.domain.errors import (
    BadLoraFileError,
    ConflictError,
    ConsistencyTimeoutError,
    DeadlineExceededError,
    DomainError,
    NotFoundError,
    NotImplementedYetError,
    PermissionDeniedError,
    PreconditionError,
    ResourceExhaustedError,
    UnauthenticatedError,
    UnavailableError,
    ValidationError,
)

DOMAIN = "loracle.v1"
log = logging.getLogger("loracle.rpc")

STATUS_TABLE: tuple[tuple[type[DomainError], grpc.StatusCode], ...] = (
    (ValidationError, grpc.StatusCode.INVALID_ARGUMENT),
    (BadLoraFileError, grpc.StatusCode.INVALID_ARGUMENT),
    (NotFoundError, grpc.StatusCode.NOT_FOUND),
    (ConflictError, grpc.StatusCode.ALREADY_EXISTS),
    (PreconditionError, grpc.StatusCode.FAILED_PRECONDITION),
    (UnavailableError, grpc.StatusCode.UNAVAILABLE),
    (ConsistencyTimeoutError, grpc.StatusCode.DEADLINE_EXCEEDED),
    (DeadlineExceededError, grpc.StatusCode.DEADLINE_EXCEEDED),
    (NotImplementedYetError, grpc.StatusCode.UNIMPLEMENTED),
    (ResourceExhaustedError, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (UnauthenticatedError, grpc.StatusCode.UNAUTHENTICATED),
    (PermissionDeniedError, grpc.StatusCode.PERMISSION_DENIED),
)


def status_code_for(exc: DomainError) -> grpc.StatusCode:
    for kind, code in STATUS_TABLE:
        if isinstance(exc, kind):
            return code
    return grpc.StatusCode.INTERNAL


def to_status(exc: BaseException, correlation_id: str) -> grpc.Status:
    """Builds the status (with details) a client receives for `exc`."""
    if not isinstance(exc, DomainError):
        log.error("internal error correlation_id=%s", correlation_id, exc_info=exc)
        return _status(
            grpc.StatusCode.INTERNAL,
            f"internal error; quote correlation id {correlation_id}",
            _error_info("INTERNAL", {"correlation_id": correlation_id}),
        )
    code = status_code_for(exc)
    metadata = {**exc.metadata, "correlation_id": correlation_id}
    details = [_error_info(exc.reason, metadata)]
    if isinstance(exc, ValidationError):
        details.append(
            error_details_pb2.BadRequest(
                field_violations=[
                    error_details_pb2.BadRequest.FieldViolation(
                        field=v.field, description=v.description
                    )
                    for v in exc.violations
                ]
            )
        )
    elif isinstance(exc, BadLoraFileError):
        details.append(
            error_details_pb2.BadRequest(
                field_violations=[
                    error_details_pb2.BadRequest.FieldViolation(
                        field="path", description=exc.message
                    )
                ]
            )
        )
    if isinstance(exc, UnavailableError | ResourceExhaustedError):
        seconds = max(exc.retry_after_seconds, 0.0)
        details.append(
            error_details_pb2.RetryInfo(
                retry_delay=duration_pb2.Duration(
                    seconds=int(seconds), nanos=int((seconds % 1) * 1e9)
                )
            )
        )
    return _status(code, exc.message, *details)


def _error_info(reason: str, metadata: dict[str, str]) -> error_details_pb2.ErrorInfo:
    return error_details_pb2.ErrorInfo(reason=reason, domain=DOMAIN, metadata=metadata)


def _status(code: grpc.StatusCode, message: str, *details: object) -> grpc.Status:
    status = status_pb2.Status(code=getattr(code_pb2, code.name), message=message)
    for detail in details:
        status.details.add().Pack(detail)
    result: grpc.Status = rpc_status.to_status(status)
    return result
