"""The one table from domain errors to gRPC status codes: no other module knows them. The
google.rpc rich details (ErrorInfo, BadRequest, RetryInfo) are read off the error itself.
Any other exception is a bug: the client gets INTERNAL with a correlation id, never the
exception text or a stack trace, and the log gets the stack trace under the same id."""

from __future__ import annotations

import logging

import grpc
from google.protobuf import duration_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

from server.domain.errors import (
    REASON_TEXT,
    BadLoraFileError,
    ConflictError,
    ConsistencyTimeoutError,
    DeadlineExceededError,
    DomainError,
    GenerationFailedError,
    NotFoundError,
    NotImplementedYetError,
    PermissionDeniedError,
    PreconditionError,
    Reason,
    RequestTooLargeError,
    ResourceExhaustedError,
    UnauthenticatedError,
    UnavailableError,
    ValidationError,
)

DOMAIN = "loracle.v1"
log = logging.getLogger("loracle.rpc")

# One row per error class; a subclass without its own row takes its nearest ancestor's.
# DomainError itself (CommandResult.failure) has none: INTERNAL, with its message.
# tests/unit/test_errors.py fails when a DomainError subclass resolves to no row.
STATUS_CODES: dict[type[DomainError], grpc.StatusCode] = {
    ValidationError: grpc.StatusCode.INVALID_ARGUMENT,
    BadLoraFileError: grpc.StatusCode.INVALID_ARGUMENT,
    NotFoundError: grpc.StatusCode.NOT_FOUND,
    ConflictError: grpc.StatusCode.ALREADY_EXISTS,
    PreconditionError: grpc.StatusCode.FAILED_PRECONDITION,
    UnavailableError: grpc.StatusCode.UNAVAILABLE,
    ConsistencyTimeoutError: grpc.StatusCode.DEADLINE_EXCEEDED,
    DeadlineExceededError: grpc.StatusCode.DEADLINE_EXCEEDED,
    NotImplementedYetError: grpc.StatusCode.UNIMPLEMENTED,
    ResourceExhaustedError: grpc.StatusCode.RESOURCE_EXHAUSTED,
    RequestTooLargeError: grpc.StatusCode.RESOURCE_EXHAUSTED,
    UnauthenticatedError: grpc.StatusCode.UNAUTHENTICATED,
    PermissionDeniedError: grpc.StatusCode.PERMISSION_DENIED,
    GenerationFailedError: grpc.StatusCode.INTERNAL,
}


def status_code_for(exc: DomainError) -> grpc.StatusCode:
    return status_code_for_class(type(exc))


def to_status(exc: BaseException, correlation_id: str) -> grpc.Status:
    """Builds the status (with details) a client receives for `exc`."""
    if not isinstance(exc, DomainError):
        log.error("internal error correlation_id=%s", correlation_id, exc_info=exc)
        return _status(
            grpc.StatusCode.INTERNAL,
            f"internal error; quote correlation id {correlation_id}",
            _error_info(Reason.INTERNAL_ERROR, {"correlation_id": correlation_id}),
        )
    metadata = {**exc.metadata, "correlation_id": correlation_id}
    details: list[object] = [_error_info(exc.reason, metadata)]
    if exc.field_violations:
        details.append(
            error_details_pb2.BadRequest(
                field_violations=[
                    error_details_pb2.BadRequest.FieldViolation(
                        field=v.field, description=v.description
                    )
                    for v in exc.field_violations
                ]
            )
        )
    if exc.retry_after_seconds is not None:
        seconds = max(exc.retry_after_seconds, 0.0)
        details.append(
            error_details_pb2.RetryInfo(
                retry_delay=duration_pb2.Duration(
                    seconds=int(seconds), nanos=int((seconds % 1) * 1e9)
                )
            )
        )
    return _status(status_code_for(exc), exc.message, *details)


def _error_info(reason: str, metadata: dict[str, str]) -> error_details_pb2.ErrorInfo:
    return error_details_pb2.ErrorInfo(reason=reason, domain=DOMAIN, metadata=metadata)


def _status(code: grpc.StatusCode, message: str, *details: object) -> grpc.Status:
    status = status_pb2.Status(code=getattr(code_pb2, code.name), message=message)
    for detail in details:
        status.details.add().Pack(detail)
    result: grpc.Status = rpc_status.to_status(status)
    return result


def reason_codes() -> dict[Reason, grpc.StatusCode]:
    """Each reason's status code: that of the class that declares it (`reasons`), among the
    table's classes and their subclasses here; INTERNAL_ERROR is any other exception's."""
    codes: dict[Reason, grpc.StatusCode] = {Reason.INTERNAL_ERROR: grpc.StatusCode.INTERNAL}
    pending: list[type[DomainError]] = list(STATUS_CODES)
    while pending:
        kind = pending.pop(0)
        pending.extend(kind.__subclasses__())
        for reason in kind.__dict__.get("reasons", ()):
            codes.setdefault(reason, status_code_for_class(kind))
    return codes


def status_code_for_class(kind: type[DomainError]) -> grpc.StatusCode:
    return next(
        (STATUS_CODES[k] for k in kind.__mro__ if k in STATUS_CODES), grpc.StatusCode.INTERNAL
    )


def reason_table() -> str:
    """README's table of ErrorInfo reasons (`python -m server.rpc.errors`)."""
    codes = reason_codes()
    rows = ["| Reason | Status | When |", "|---|---|---|"]
    for reason in Reason:
        rows.append(f"| `{reason}` | `{codes[reason].name}` | {REASON_TEXT[reason]} |")
    return "\n".join(rows)


if __name__ == "__main__":
    print(reason_table())


class Answered(Exception):
    """The call's status is set (dispatch.abort): ends the handler, and the edge's handler
    wrapper (validation.py) returns without a response, so gRPC sends that status."""
