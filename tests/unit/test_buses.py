"""The buses: typed dispatch, fail-fast registration, middleware, streams, caching."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, ClassVar

import pytest

from server.application.commands import (
    CommandBus,
    CommandResult,
    HandlerAlreadyRegisteredError,
    ICommand,
    ICommandHandler,
    IStreamCommand,
    IStreamCommandHandler,
)
from server.application.context import DispatchContext, current_context
from server.application.middleware import Next, TimingMiddleware, default_middlewares
from server.application.queries import IQuery, IQueryHandler, QueryBus, QueryResult
from server.domain.errors import (
    ConsistencyTimeoutError,
    FieldViolation,
    NotFoundError,
    NotImplementedYetError,
    Reason,
    ValidationError,
)


@dataclass(frozen=True, kw_only=True)
class Add(ICommand[int]):
    a: int
    b: int


class AddHandler(ICommandHandler[Add, int]):
    def handle(self, command: Add) -> CommandResult[int]:
        if command.a < 0:
            return CommandResult.validation_error(FieldViolation("a", "must not be negative"))
        if command.a == 99:
            raise NotFoundError("generation", "99")
        return CommandResult.success(command.a + command.b, position=7)


@dataclass(frozen=True, kw_only=True)
class Count(IStreamCommand[str]):
    upto: int


class CountHandler(IStreamCommandHandler[Count, str]):
    def handle(self, command: Count) -> Iterator[str]:
        for i in range(command.upto):
            yield f"{i}:{current_context().principal}"


@dataclass(frozen=True, kw_only=True)
class Square(IQuery[int]):
    reads: ClassVar[frozenset[str]] = frozenset({"numbers"})
    x: int


class SquareHandler(IQueryHandler[Square, int]):
    def __init__(self) -> None:
        self.calls = 0

    def handle(self, query: Square) -> QueryResult[int]:
        self.calls += 1
        if query.x < 0:
            raise ValidationError(FieldViolation("x", "must not be negative"))
        return QueryResult.success(query.x * query.x)


class Recorder:
    def __init__(self, name: str, log: list[str]) -> None:
        self.name = name
        self.log = log

    def __call__(self, message: object, ctx: DispatchContext, next_: Next) -> Any:
        self.log.append(f"{self.name}>")
        result = next_(message, ctx)
        self.log.append(f"<{self.name}")
        return result


def test_command_dispatch_returns_typed_success_with_position() -> None:
    bus = CommandBus()
    bus.register(Add, AddHandler())
    result = bus.dispatch(Add(a=2, b=3))
    assert result.is_success
    assert result.data == 5
    assert result.position == 7
    assert result.unwrap() == 5


def test_validation_failure_is_a_result_with_field_violations() -> None:
    bus = CommandBus()
    bus.register(Add, AddHandler())
    result = bus.dispatch(Add(a=-1, b=0))
    assert not result.is_success
    assert result.error is not None
    assert isinstance(result.error, ValidationError)
    assert result.error.field_violations == (FieldViolation("a", "must not be negative"),)
    with pytest.raises(ValidationError):
        result.unwrap()


def test_domain_error_raised_by_handler_becomes_a_failed_result() -> None:
    bus = CommandBus()
    bus.register(Add, AddHandler())
    result = bus.dispatch(Add(a=99, b=0))
    assert isinstance(result.error, NotFoundError)
    assert result.error.metadata == {"resource": "generation", "id": "99"}
    with pytest.raises(NotFoundError) as raised:
        result.unwrap()
    assert raised.value is result.error  # the handler's own error, nothing re-built


def test_duplicate_registration_fails_fast() -> None:
    bus = CommandBus()
    bus.register(Add, AddHandler())
    with pytest.raises(HandlerAlreadyRegisteredError):
        bus.register(Add, AddHandler())
    qbus = QueryBus()
    qbus.register(Square, SquareHandler())
    with pytest.raises(HandlerAlreadyRegisteredError):
        qbus.register(Square, SquareHandler())


def test_stream_handler_type_must_match_command_kind() -> None:
    bus = CommandBus()
    with pytest.raises(TypeError):
        bus.register(Count, AddHandler())


def test_unregistered_command_is_unimplemented() -> None:
    result = CommandBus().dispatch(Add(a=1, b=1))
    assert isinstance(result.error, NotImplementedYetError)
    with pytest.raises(NotImplementedYetError):
        QueryBus().dispatch(Square(x=1))


def test_middleware_wraps_every_dispatch_in_order() -> None:
    log: list[str] = []
    bus = CommandBus([Recorder("outer", log), Recorder("inner", log)])
    bus.register(Add, AddHandler())
    bus.dispatch(Add(a=1, b=1))
    assert log == ["outer>", "inner>", "<inner", "<outer"]


def test_streams_go_through_middleware_and_see_their_context() -> None:
    timing = TimingMiddleware()
    bus = CommandBus([timing])
    bus.register(Count, CountHandler())
    items = list(bus.stream(Count(upto=3), DispatchContext(principal="alice")))
    assert items == ["0:alice", "1:alice", "2:alice"]
    assert timing.stats["Count"].count == 1


def test_handlers_see_the_dispatch_context() -> None:
    seen: list[str] = []

    class Probe(ICommandHandler[Add, int]):
        def handle(self, command: Add) -> CommandResult[int]:
            seen.append(current_context().principal + "/" + current_context().request_id)
            return CommandResult.success(0)

    bus = CommandBus(default_middlewares())
    bus.register(Add, Probe())
    bus.dispatch(Add(a=1, b=1), DispatchContext(principal="bob", request_id="r-1"))
    assert seen == ["bob/r-1"]
    assert current_context().principal == "system"


def test_query_results_are_cached_until_their_topic_is_invalidated() -> None:
    handler = SquareHandler()
    bus = QueryBus([])
    bus.register(Square, handler)
    assert bus.dispatch(Square(x=3)).data == 9
    assert bus.dispatch(Square(x=3)).data == 9
    assert handler.calls == 1
    bus.invalidate({"other"})
    bus.dispatch(Square(x=3))
    assert handler.calls == 1
    bus.invalidate({"numbers"})
    bus.dispatch(Square(x=3))
    assert handler.calls == 2


def test_a_result_computed_across_an_invalidation_is_not_cached() -> None:
    bus = QueryBus([])

    class Racing(IQueryHandler[Square, int]):
        calls = 0

        def handle(self, query: Square) -> QueryResult[int]:
            Racing.calls += 1
            bus.invalidate({"numbers"})  # an event is projected while we compute
            return QueryResult.success(query.x)

    bus.register(Square, Racing())
    bus.dispatch(Square(x=1))
    bus.dispatch(Square(x=1))
    assert Racing.calls == 2


def test_failing_query_raises_and_is_not_cached() -> None:
    handler = SquareHandler()
    bus = QueryBus([])
    bus.register(Square, handler)
    for _ in range(2):
        with pytest.raises(ValidationError):
            bus.dispatch(Square(x=-1))
    assert handler.calls == 2


def test_queries_wait_for_their_consistency_token() -> None:
    class Waiter:
        def __init__(self) -> None:
            self.calls: list[tuple[int, float | None]] = []

        def wait_for(self, position: int, timeout: float | None) -> None:
            self.calls.append((position, timeout))
            if position > 10:
                raise ConsistencyTimeoutError("not yet")

        def reached(self, position: int) -> bool:
            return False

    waiter = Waiter()
    bus = QueryBus([], consistency=waiter)
    bus.register(Square, SquareHandler())
    bus.dispatch(Square(x=2), DispatchContext(min_position=5))
    bus.dispatch(Square(x=2))
    assert [p for p, _ in waiter.calls] == [5]
    with pytest.raises(ConsistencyTimeoutError):
        bus.dispatch(Square(x=2), DispatchContext(min_position=11))


def test_result_factories_carry_the_domain_error_the_transport_maps() -> None:
    from server.domain.errors import ConflictError, DomainError, PreconditionError

    not_ready = (
        CommandResult[int]
        .precondition_failed("model warming up", reason=Reason.MODEL_NOT_READY, model="sdxl")
        .error
    )
    assert isinstance(not_ready, PreconditionError)
    assert (not_ready.message, not_ready.reason) == ("model warming up", "MODEL_NOT_READY")
    assert not_ready.metadata == {"model": "sdxl"}
    taken = CommandResult[int].conflict("request id reused", request_id="r-1").error
    assert isinstance(taken, ConflictError)
    assert taken.metadata == {"request_id": "r-1"}
    missing = CommandResult[int].not_found("lora", "x").error
    assert isinstance(missing, NotFoundError)
    assert (missing.message, missing.resource_id) == ("LoRA 'x' not found", "x")
    bad = CommandResult[int].validation_error([FieldViolation("a", "x"), FieldViolation("b", "y")])
    assert isinstance(bad.error, ValidationError)
    assert bad.error.message == "a: x; b: y"
    failed = CommandResult[int].failure("disk on fire").error
    assert type(failed) is DomainError
    assert failed.message == "disk on fire"


def _as_text(value: int) -> str:
    return f"<{value}>"


def test_a_built_answer_is_cached_per_builder_and_given_without_the_handler() -> None:
    handler = SquareHandler()
    log: list[str] = []
    bus = QueryBus([Recorder("outer", log)])
    bus.register(Square, handler)
    ctx = DispatchContext()
    assert bus.answer_cached(Square(x=3), ctx, _as_text) is None  # a miss runs nothing
    assert (handler.calls, log) == (0, [])
    assert bus.dispatch(Square(x=3), ctx, _as_text).data == "<9>"
    assert bus.dispatch(Square(x=3), ctx).data == 9  # another builder: another entry
    assert handler.calls == 2
    log.clear()
    answer = bus.answer_cached(Square(x=3), ctx, _as_text)
    assert answer is not None
    assert answer.data == "<9>"
    assert (handler.calls, log) == (2, ["outer>", "<outer"])  # the chain ran, the handler not
    bus.invalidate({"numbers"})
    assert bus.answer_cached(Square(x=3), ctx, _as_text) is None


def test_a_cached_answer_still_passes_authorization_rejection_and_the_deadline() -> None:
    from server.application.middleware import AuthorizationMiddleware, RejectedRequestMiddleware
    from server.domain.errors import DeadlineExceededError, PermissionDeniedError

    class OnlyAlice:
        def authorize(self, message: object, ctx: DispatchContext) -> None:
            if ctx.principal != "alice":
                raise PermissionDeniedError("not alice")

    bus = QueryBus([AuthorizationMiddleware(OnlyAlice()), RejectedRequestMiddleware()])
    bus.register(Square, SquareHandler())
    bus.dispatch(Square(x=2), DispatchContext(principal="alice"), _as_text)
    with pytest.raises(PermissionDeniedError):
        bus.answer_cached(Square(x=2), DispatchContext(principal="bob"), _as_text)
    bad = ValidationError(FieldViolation("x", "bad"))
    with pytest.raises(ValidationError):
        bus.answer_cached(Square(x=2), DispatchContext(principal="alice", rejected=bad), _as_text)
    with pytest.raises(DeadlineExceededError):
        bus.answer_cached(Square(x=2), DispatchContext(principal="alice", deadline=0.0), _as_text)
    answer = bus.answer_cached(Square(x=2), DispatchContext(principal="alice"), _as_text)
    assert answer is not None
    assert answer.data == "<4>"


def test_a_cached_answer_waits_for_nothing_it_is_left_to_the_blocking_dispatch() -> None:
    class Projected:
        position = 5

        def wait_for(self, position: int, timeout: float | None) -> None:
            if position > self.position:
                raise ConsistencyTimeoutError("not yet")

        def reached(self, position: int) -> bool:
            return position <= self.position

    bus = QueryBus([], consistency=Projected())
    bus.register(Square, SquareHandler())
    bus.dispatch(Square(x=4), DispatchContext(), _as_text)
    assert bus.answer_cached(Square(x=4), DispatchContext(min_position=5), _as_text) is not None
    assert bus.answer_cached(Square(x=4), DispatchContext(min_position=6), _as_text) is None


def test_a_nested_dispatch_does_not_inherit_the_outer_builder() -> None:
    bus = QueryBus([])

    @dataclass(frozen=True, kw_only=True)
    class Outer(IQuery[int]):
        x: int

    class OuterHandler(IQueryHandler[Outer, int]):
        def handle(self, query: Outer) -> QueryResult[int]:
            inner = bus.dispatch(Square(x=query.x)).data
            assert inner == query.x * query.x
            return QueryResult.success(inner + 1)

    bus.register(Square, SquareHandler())
    bus.register(Outer, OuterHandler())
    assert bus.dispatch(Outer(x=3), DispatchContext(), _as_text).data == "<10>"
