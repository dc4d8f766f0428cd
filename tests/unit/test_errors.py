"""The status-code table and the rich details every error carries."""

from __future__ import annotations

import grpc
import pytest
from google.rpc import error_details_pb2, status_pb2

from server.domain.errors import (
    BadLoraFileError,
    ConflictError,
    ConsistencyTimeoutError,
    DomainError,
    FieldViolation,
    NotFoundError,
    NotImplementedYetError,
    PreconditionError,
    UnavailableError,
    ValidationError,
)
from server.rpc.errors import to_status


def details(status: grpc.Status) -> dict[str, object]:
    trailer = dict(status.trailing_metadata)["grpc-status-details-bin"]
    proto = status_pb2.Status.FromString(trailer)
    found: dict[str, object] = {}
    for any_ in proto.details:
        for kind in (
            error_details_pb2.ErrorInfo,
            error_details_pb2.BadRequest,
            error_details_pb2.RetryInfo,
        ):
            if any_.Is(kind.DESCRIPTOR):
                message = kind()
                any_.Unpack(message)
                found[kind.__name__] = message
    return found


@pytest.mark.parametrize(
    ("error", "code"),
    [
        (ValidationError(FieldViolation("f", "bad")), grpc.StatusCode.INVALID_ARGUMENT),
        (BadLoraFileError("a.safetensors", "truncated"), grpc.StatusCode.INVALID_ARGUMENT),
        (NotFoundError("lora", "x"), grpc.StatusCode.NOT_FOUND),
        (ConflictError("race"), grpc.StatusCode.ALREADY_EXISTS),
        (
            PreconditionError("wrong arch", reason="ARCHITECTURE_MISMATCH"),
            grpc.StatusCode.FAILED_PRECONDITION,
        ),
        (UnavailableError("db down"), grpc.StatusCode.UNAVAILABLE),
        (ConsistencyTimeoutError("late"), grpc.StatusCode.DEADLINE_EXCEEDED),
        (NotImplementedYetError("later"), grpc.StatusCode.UNIMPLEMENTED),
        (DomainError("unmapped"), grpc.StatusCode.INTERNAL),
    ],
)
def test_each_error_maps_to_its_code_with_error_info(
    error: DomainError, code: grpc.StatusCode
) -> None:
    status = to_status(error, "corr-1")
    assert status.code == code
    info = details(status)["ErrorInfo"]
    assert isinstance(info, error_details_pb2.ErrorInfo)
    assert info.reason == error.reason
    assert info.domain == "loracle.v1"
    assert info.metadata["correlation_id"] == "corr-1"


def test_validation_errors_name_every_field() -> None:
    status = to_status(ValidationError([FieldViolation("a", "x"), FieldViolation("b.c", "y")]), "c")
    bad = details(status)["BadRequest"]
    assert isinstance(bad, error_details_pb2.BadRequest)
    assert [(v.field, v.description) for v in bad.field_violations] == [("a", "x"), ("b.c", "y")]


def test_unavailable_tells_when_to_retry() -> None:
    retry = details(to_status(UnavailableError("down", retry_after_seconds=2.5), "c"))["RetryInfo"]
    assert isinstance(retry, error_details_pb2.RetryInfo)
    assert (retry.retry_delay.seconds, retry.retry_delay.nanos) == (2, 500_000_000)


def test_unexpected_exceptions_reveal_nothing_but_a_correlation_id() -> None:
    secret = "password=hunter2 at /srv/secret/path.py line 12"
    status = to_status(RuntimeError(secret), "corr-9")
    assert status.code == grpc.StatusCode.INTERNAL
    assert "hunter2" not in status.details
    assert "corr-9" in status.details
    trailer = dict(status.trailing_metadata)["grpc-status-details-bin"]
    assert b"hunter2" not in trailer
