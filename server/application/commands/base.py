"""Commands change state. A handler validates, writes events, and returns a CommandResult;
expected failures are results, not exceptions, so callers must look at `is_success`."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Generic, TypeVar, cast

from server.application.context import DispatchContext, current_context, use_context
from server.application.middleware import Middleware, Next, build_chain, default_middlewares
from server.domain.errors import (
    ConflictError,
    DomainError,
    FieldViolation,
    NotFoundError,
    NotImplementedYetError,
    PreconditionError,
    Reason,
    Resource,
    ValidationError,
)

R = TypeVar("R")
R_co = TypeVar("R_co", covariant=True)
C = TypeVar("C", bound="ICommand[Any]")
S = TypeVar("S", bound="IStreamCommand[Any]")


class ICommand(Generic[R_co]):
    """Base of commands; R is what a successful handler returns (a phantom type for mypy)."""


class IStreamCommand(Generic[R_co]):
    """A command whose handler yields a stream of R (progress, generation events)."""


@dataclass(frozen=True, slots=True)
class CommandResult(Generic[R]):
    """Outcome of a command. `error` is the DomainError itself, so the transport's one table
    maps it and nothing (its class, reason, metadata, retry delay) is lost on the way.
    `position` is the log position of its last event: the consistency token that lets a
    later query read this write."""

    is_success: bool
    data: R | None = None
    error: DomainError | None = None
    position: int = 0

    @staticmethod
    def success(data: R | None = None, *, position: int = 0) -> CommandResult[R]:
        return CommandResult(True, data, None, position)

    @staticmethod
    def validation_error(
        violations: list[FieldViolation] | FieldViolation | str,
    ) -> CommandResult[R]:
        if isinstance(violations, str):
            violations = FieldViolation("", violations)
        return CommandResult.from_error(ValidationError(violations))

    @staticmethod
    def not_found(resource: Resource, resource_id: str) -> CommandResult[R]:
        return CommandResult.from_error(NotFoundError(resource, resource_id))

    @staticmethod
    def conflict(message: str, **metadata: str) -> CommandResult[R]:
        return CommandResult.from_error(ConflictError(message, metadata=metadata))

    @staticmethod
    def precondition_failed(message: str, *, reason: Reason, **metadata: str) -> CommandResult[R]:
        return CommandResult.from_error(
            PreconditionError(message, reason=reason, metadata=metadata)
        )

    @staticmethod
    def failure(message: str) -> CommandResult[R]:
        return CommandResult.from_error(DomainError(message))

    @staticmethod
    def from_error(exc: DomainError) -> CommandResult[R]:
        return CommandResult(False, None, exc)

    def unwrap(self) -> R:
        """The data of a success; raises the result's DomainError otherwise."""
        if self.error is not None:
            raise self.error
        return cast(R, self.data)


class ICommandHandler(ABC, Generic[C, R]):
    @abstractmethod
    def handle(self, command: C) -> CommandResult[R]: ...


class IStreamCommandHandler(ABC, Generic[S, R]):
    @abstractmethod
    def handle(self, command: S) -> Iterator[R]: ...


class HandlerAlreadyRegisteredError(Exception):
    """A message type got a second handler: a wiring bug, caught at start-up."""


class CommandBus:
    """Routes each command type to exactly one handler through the middleware chain."""

    def __init__(self, middlewares: list[Middleware] | None = None) -> None:
        self._middlewares = default_middlewares() if middlewares is None else middlewares
        self._routes: dict[type[Any], Next] = {}

    def register(
        self,
        command_type: type[Any],
        handler: ICommandHandler[Any, Any] | IStreamCommandHandler[Any, Any],
    ) -> None:
        if command_type in self._routes:
            raise HandlerAlreadyRegisteredError(f"{command_type.__name__} already has a handler")
        is_stream = issubclass(command_type, IStreamCommand)
        if is_stream != isinstance(handler, IStreamCommandHandler):
            raise TypeError(f"{command_type.__name__}: stream commands need stream handlers")

        def call(message: object, ctx: DispatchContext) -> Any:
            with use_context(ctx):
                if is_stream:
                    assert isinstance(handler, IStreamCommandHandler)
                    return _stream_in_context(handler.handle(message), ctx)
                try:
                    return handler.handle(message)
                except DomainError as exc:
                    return CommandResult.from_error(exc)

        self._routes[command_type] = build_chain(self._middlewares, call)

    def is_registered(self, command_type: type[Any]) -> bool:
        return command_type in self._routes

    def dispatch(
        self, command: ICommand[R], ctx: DispatchContext | None = None
    ) -> CommandResult[R]:
        route = self._routes.get(type(command))
        if route is None:
            return CommandResult.from_error(_unimplemented(command))
        return cast(CommandResult[R], route(command, ctx or _inherit_context()))

    def stream(self, command: IStreamCommand[R], ctx: DispatchContext | None = None) -> Iterator[R]:
        """Dispatches a streaming command; errors surface as DomainError while iterating."""
        route = self._routes.get(type(command))
        if route is None:
            raise _unimplemented(command)
        return cast(Iterator[R], route(command, ctx or _inherit_context()))


def _stream_in_context(stream: Iterator[Any], ctx: DispatchContext) -> Iterator[Any]:
    # A generator body runs at each next(), outside the dispatch's `with`; re-enter it.
    while True:
        with use_context(ctx):
            try:
                item = next(stream)
            except StopIteration:
                return
        yield item


def _inherit_context() -> DispatchContext:
    return current_context()


def _unimplemented(message: object) -> NotImplementedYetError:
    return NotImplementedYetError(f"{type(message).__name__} is not implemented yet")
