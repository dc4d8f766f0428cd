"""The status-code table and the rich details every error carries, from handler to wire."""

from __future__ import annotations

import asyncio
import importlib
import pkgutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, cast

import grpc
import pytest
from google.rpc import error_details_pb2, status_pb2

import server
from server.application.commands import (
    CommandBus,
    CommandResult,
    ICommand,
    ICommandHandler,
    IStreamCommand,
    IStreamCommandHandler,
)
from server.application.queries import IQuery, IQueryHandler, QueryBus, QueryResult
from server.config import SettingsError
from server.domain.errors import (
    REASON_TEXT,
    BadLoraFileError,
    ConflictError,
    ConsistencyTimeoutError,
    DeadlineExceededError,
    DomainError,
    FieldViolation,
    GenerationFailedError,
    InvalidTokenError,
    NotFoundError,
    NotImplementedYetError,
    PreconditionError,
    Reason,
    RequestTooLargeError,
    ResourceExhaustedError,
    UnavailableError,
    UndecodableRequestError,
    ValidationError,
)
from server.infrastructure.broker.port import BrokerUnavailable
from server.rpc.dispatch import Dispatcher
from server.rpc.errors import STATUS_CODES, Answered, reason_codes, reason_table, to_status


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
            PreconditionError("wrong arch", reason=Reason.LORA_ARCHITECTURE_MISMATCH),
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


# --- Every DomainError, wherever it is defined, through the whole path to the wire. ---------

for _module in pkgutil.walk_packages(server.__path__, "server."):
    importlib.import_module(_module.name)  # a subclass exists for __subclasses__ once imported


def _subclasses(kind: type[DomainError]) -> list[type[DomainError]]:
    return [c for sub in kind.__subclasses__() for c in (sub, *_subclasses(sub))]


ALL_ERRORS = _subclasses(DomainError)

# Errors whose constructor is not DomainError's (message, *, metadata); the values differ from
# the defaults so that a field rebuilt on the way (a retry delay reset to 1 s) is noticed.
SAMPLES: dict[type[DomainError], Callable[[], DomainError]] = {
    ValidationError: lambda: ValidationError(
        [FieldViolation("a", "x"), FieldViolation("b.c", "y")]
    ),
    NotFoundError: lambda: NotFoundError("lora", "x-1"),
    InvalidTokenError: InvalidTokenError.page,
    PreconditionError: lambda: PreconditionError(
        "warming up", reason=Reason.MODEL_NOT_READY, metadata={"model": "sdxl"}
    ),
    UnavailableError: lambda: UnavailableError("db down", retry_after_seconds=2.5),
    BrokerUnavailable: lambda: BrokerUnavailable("publish"),
    BadLoraFileError: lambda: BadLoraFileError("a.safetensors", "truncated"),
    ResourceExhaustedError: lambda: ResourceExhaustedError("queue full", 0.25),
    SettingsError: lambda: SettingsError("max_queue", "must be an integer, not 'many'"),
    UndecodableRequestError: lambda: UndecodableRequestError("SearchLorasRequest"),
    RequestTooLargeError: lambda: RequestTooLargeError("SearchLoras", 2_000_000, 1_048_576),
}


def sample(kind: type[DomainError]) -> DomainError:
    build = SAMPLES.get(kind, lambda: kind("it went wrong", metadata={"key": "value"}))
    try:
        error = build()
    except TypeError:
        pytest.fail(f"{kind.__name__} needs an example in SAMPLES")
    assert type(error) is kind
    return error


def code_in_table(kind: type[DomainError]) -> grpc.StatusCode | None:
    """The row of the class or of its nearest ancestor; DomainError itself has none."""
    return next((STATUS_CODES[k] for k in kind.__mro__ if k in STATUS_CODES), None)


def test_the_enumeration_finds_errors_outside_the_domain_module() -> None:
    assert {ValidationError, DeadlineExceededError, BrokerUnavailable} <= set(ALL_ERRORS)
    assert DomainError not in STATUS_CODES  # so an unmapped subclass cannot pass as mapped


@pytest.mark.parametrize("kind", ALL_ERRORS, ids=lambda k: k.__name__)
def test_every_domain_error_has_a_row(kind: type[DomainError]) -> None:
    code = code_in_table(kind)
    assert code is not None, f"{kind.__name__} has no row in server/rpc/errors.py STATUS_CODES"
    # A generation that failed inside the server is INTERNAL on purpose (its message is a
    # sentence of ours, never the exception's text); nothing else is.
    assert (code is grpc.StatusCode.INTERNAL) == (kind is GenerationFailedError)


class FakeRpc:
    """The part of grpc.aio.ServicerContext the Dispatcher uses: it answers a call by setting
    the status (code, details, trailing metadata) and raising Answered."""

    def __init__(self) -> None:
        self.code: grpc.StatusCode | None = None
        self.details = ""
        self.trailing_metadata: tuple[tuple[str, str | bytes], ...] = ()

    def time_remaining(self) -> float | None:
        return None

    def invocation_metadata(self) -> tuple[tuple[str, str], ...]:
        return (("x-correlation-id", "corr-7"),)

    def set_code(self, code: grpc.StatusCode) -> None:
        self.code = code

    def set_details(self, details: str) -> None:
        self.details = details

    def set_trailing_metadata(self, metadata: tuple[tuple[str, str | bytes], ...]) -> None:
        self.trailing_metadata = metadata

    @property
    def status(self) -> grpc.Status | None:
        if self.code is None:
            return None
        return _Status(self.code, self.details, self.trailing_metadata)


@dataclass(frozen=True)
class _Status(grpc.Status):
    code: grpc.StatusCode
    details: str
    trailing_metadata: tuple[tuple[str, str | bytes], ...]


@dataclass(frozen=True, kw_only=True)
class Fail(ICommand[None]):
    error: DomainError
    raised: bool


class FailHandler(ICommandHandler[Fail, None]):
    def handle(self, command: Fail) -> CommandResult[None]:
        if command.raised:
            raise command.error
        return CommandResult.from_error(command.error)


@dataclass(frozen=True, kw_only=True)
class FailStream(IStreamCommand[int]):
    error: DomainError


class FailStreamHandler(IStreamCommandHandler[FailStream, int]):
    def handle(self, command: FailStream) -> Iterator[int]:
        yield 1
        raise command.error


@dataclass(frozen=True, kw_only=True)
class FailQuery(IQuery[None]):
    cacheable: ClassVar[bool] = False
    error: DomainError


class FailQueryHandler(IQueryHandler[FailQuery, None]):
    def handle(self, query: FailQuery) -> QueryResult[None]:
        raise query.error


def wire_status(route: str, error: DomainError) -> grpc.Status:
    """`error` from a handler through the real buses (default middlewares) and Dispatcher."""
    commands, queries = CommandBus(), QueryBus()
    commands.register(Fail, FailHandler())
    commands.register(FailStream, FailStreamHandler())
    queries.register(FailQuery, FailQueryHandler())
    dispatcher = Dispatcher(commands, queries)
    fake = FakeRpc()
    rpc = cast("grpc.aio.ServicerContext[Any, Any]", fake)

    async def call() -> None:
        if route == "stream":
            async for _ in dispatcher.stream_command(rpc, FailStream(error=error), "r-1"):
                pass
        elif route == "query":
            await dispatcher.query(rpc, FailQuery(error=error))
        else:
            await dispatcher.command(rpc, Fail(error=error, raised=route == "raised"), "r-1")

    with pytest.raises(Answered):
        asyncio.run(call())
    assert fake.status is not None
    return fake.status


@pytest.mark.parametrize("route", ["returned", "raised", "stream", "query"])
@pytest.mark.parametrize("kind", ALL_ERRORS, ids=lambda k: k.__name__)
def test_every_domain_error_survives_the_round_trip_to_the_wire(
    kind: type[DomainError], route: str
) -> None:
    sent, expected = sample(kind), sample(kind)
    status = wire_status(route, sent)
    assert status.code == code_in_table(kind)
    assert status.details == expected.message
    found = details(status)
    info = found["ErrorInfo"]
    assert isinstance(info, error_details_pb2.ErrorInfo)
    assert info.reason == expected.reason
    assert dict(info.metadata) == {**expected.metadata, "correlation_id": "corr-7"}
    bad = found.get("BadRequest")
    violations = [] if bad is None else bad.field_violations  # type: ignore[attr-defined]
    assert [FieldViolation(v.field, v.description) for v in violations] == list(
        expected.field_violations
    )
    retry = found.get("RetryInfo")
    if expected.retry_after_seconds is None:
        assert retry is None
    else:
        assert isinstance(retry, error_details_pb2.RetryInfo)
        assert retry.retry_delay.ToTimedelta().total_seconds() == expected.retry_after_seconds


def test_a_command_result_keeps_the_handlers_error_itself() -> None:
    bus = CommandBus()
    bus.register(Fail, FailHandler())
    for raised in (False, True):
        error = ResourceExhaustedError("queue full", 0.25)
        assert bus.dispatch(Fail(error=error, raised=raised)).error is error


# --- Reasons: specific, listed once, documented in the README. ------------------------------


@pytest.mark.parametrize("kind", ALL_ERRORS, ids=lambda k: k.__name__)
def test_every_error_carries_a_listed_reason_of_its_own_status(kind: type[DomainError]) -> None:
    """A reason is one of `Reason`, never a bare status name, and the README's table gives
    the status the error is actually sent with."""
    error = sample(kind)
    assert error.reason in Reason.__members__
    assert error.reason not in grpc.StatusCode.__members__
    assert reason_codes()[Reason(error.reason)] == code_in_table(kind)
    for reason in kind.reasons:
        assert reason_codes()[reason] == code_in_table(kind)


def test_every_reason_has_one_status_and_a_sentence() -> None:
    assert set(reason_codes()) == set(Reason)
    assert set(REASON_TEXT) == set(Reason)
    declared = [r for k in (DomainError, *ALL_ERRORS) for r in k.__dict__.get("reasons", ())]
    assert sorted(declared) == sorted(set(declared))  # each reason is one class's


def test_the_readme_table_of_reasons_is_the_codes() -> None:
    """Regenerate with `python -m server.rpc.errors` when a reason changes."""
    text = (Path(__file__).parents[2] / "README.md").read_text()
    block = text.split("<!-- reasons table: python -m server.rpc.errors -->\n")[1]
    block = block.split("\n<!-- end of reasons table -->")[0]
    assert block == reason_table()
