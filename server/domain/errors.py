"""Domain errors: the one taxonomy. A failed CommandResult carries the error itself, and the
transport maps each class to a status code in one table (rpc/errors.py); everything else a
client sees (reason, metadata, field violations, retry delay) is read off the error."""

from __future__ import annotations

from dataclasses import dataclass

# Messages quote client input (a path, an id). gRPC drops a call whose status trailers (the
# message, percent-encoded, plus the rich details) outgrow the client's metadata limit, 8 KiB
# by default, and the client then sees a retryable RESOURCE_EXHAUSTED instead of the error:
# what a client can see is bounded here, in UTF-8 bytes.
MAX_MESSAGE_BYTES = 400
MAX_DETAIL_BYTES = 300
MAX_VIOLATIONS = 6


def clip(text: str, limit: int) -> str:
    """`text` in at most `limit` UTF-8 bytes: when longer, its middle is replaced by an
    ellipsis, so the start and the reason at the end (after a quoted value) both remain."""
    data = text.encode()
    if len(data) <= limit:
        return text
    head = (limit - 3) * 2 // 3
    tail = limit - 3 - head
    start = data[:head].decode("utf-8", "ignore")
    end = data[len(data) - tail :].decode("utf-8", "ignore")
    return f"{start}\u2026{end}"


@dataclass(frozen=True, slots=True)
class FieldViolation:
    field: str
    description: str


class DomainError(Exception):
    """Base of every error a client may see; `reason` is a stable UPPER_SNAKE code."""

    reason = "DOMAIN_ERROR"
    # The transport sends these as google.rpc BadRequest and RetryInfo details when set.
    field_violations: tuple[FieldViolation, ...] = ()
    retry_after_seconds: float | None = None

    def __init__(self, message: str, *, metadata: dict[str, str] | None = None) -> None:
        message = clip(message, MAX_MESSAGE_BYTES)
        super().__init__(message)
        self.message = message
        self.metadata = {k: clip(v, MAX_DETAIL_BYTES) for k, v in (metadata or {}).items()}


class ValidationError(DomainError):
    """The request itself is wrong; each violation names the offending field."""

    reason = "INVALID_ARGUMENT"

    def __init__(self, violations: list[FieldViolation] | FieldViolation) -> None:
        given = [violations] if isinstance(violations, FieldViolation) else violations
        self.field_violations = tuple(
            FieldViolation(v.field, clip(v.description, MAX_DETAIL_BYTES))
            for v in given[:MAX_VIOLATIONS]
        )
        more = f"; and {len(given) - MAX_VIOLATIONS} more" if len(given) > MAX_VIOLATIONS else ""
        shown = "; ".join(f"{v.field}: {v.description}" for v in self.field_violations)
        super().__init__(shown + more)

    @property
    def violations(self) -> tuple[FieldViolation, ...]:
        """The older name of `field_violations`, still read by config and tests."""
        return self.field_violations


class InvalidTokenError(ValidationError):
    """A page or consistency token this server did not issue (or issued for another
    listing). Tokens are opaque: the message is one plain sentence, never a decoder's."""

    def __init__(self, field: str, reason: str, sentence: str) -> None:
        super().__init__(FieldViolation(field, sentence))
        self.reason = reason
        self.message = sentence
        self.args = (sentence,)

    @staticmethod
    def page() -> InvalidTokenError:
        return InvalidTokenError(
            "page_token",
            "INVALID_PAGE_TOKEN",
            "page_token is not a token this server issued for this listing; start again without it",
        )

    @staticmethod
    def consistency() -> InvalidTokenError:
        return InvalidTokenError(
            "consistency_token",
            "INVALID_CONSISTENCY_TOKEN",
            "consistency_token is not a token this server issued; pass one a command "
            "returned, or none",
        )


class NotFoundError(DomainError):
    """The named resource does not exist (or no longer does)."""

    reason = "NOT_FOUND"

    def __init__(self, resource: str, resource_id: str) -> None:
        super().__init__(
            f"{resource} {resource_id!r} not found",
            metadata={"resource": resource, "id": resource_id},
        )
        self.resource = resource
        self.resource_id = resource_id


class ConflictError(DomainError):
    """The write clashes with existing state, e.g. a reused request_id."""

    reason = "ALREADY_EXISTS"


class PreconditionError(DomainError):
    """The system is not in a state that allows the operation."""

    reason = "FAILED_PRECONDITION"

    def __init__(
        self,
        message: str,
        *,
        reason: str = "FAILED_PRECONDITION",
        metadata: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message, metadata=metadata)
        self.reason = reason


class UnavailableError(DomainError):
    """A dependency (the store) is down; the client may retry."""

    reason = "UNAVAILABLE"

    retry_after_seconds: float

    def __init__(
        self, message: str, *, retry_after_seconds: float = 1.0, reason: str | None = None
    ) -> None:
        super().__init__(message)
        self.retry_after_seconds = retry_after_seconds
        if reason is not None:
            self.reason = reason


class ConsistencyTimeoutError(DomainError):
    """The read model did not reach the requested consistency token in time."""

    reason = "CONSISTENCY_TIMEOUT"


class NotImplementedYetError(DomainError):
    """A v1 method that is specified but not built yet."""

    reason = "UNIMPLEMENTED"


class BadLoraFileError(DomainError):
    """A file that cannot be a LoRA: not safetensors, truncated, oversized header, wrong tensors,
    or outside the configured roots."""

    reason = "BAD_LORA_FILE"

    def __init__(self, path: str, why: str) -> None:
        super().__init__(f"{path}: {why}", metadata={"path": path})
        self.path = path
        self.why = why
        self.field_violations = (FieldViolation("path", self.message),)


class ResourceExhaustedError(DomainError):
    """A bounded resource (the generation queue) is full; retry after `retry_after_seconds`."""

    reason = "RESOURCE_EXHAUSTED"

    retry_after_seconds: float

    def __init__(
        self, message: str, retry_after_seconds: float = 1.0, *, reason: str | None = None
    ) -> None:
        super().__init__(message)
        self.retry_after_seconds = retry_after_seconds
        if reason is not None:
            self.reason = reason


class UnauthenticatedError(DomainError):
    """No credentials, or credentials this server does not know."""

    reason = "UNAUTHENTICATED"


class PermissionDeniedError(DomainError):
    """The caller is known but its scopes do not allow the request."""

    reason = "PERMISSION_DENIED"


class DeadlineExceededError(DomainError):
    """The caller's deadline passed; the work was not started (or was stopped)."""

    reason = "DEADLINE_EXCEEDED"


class GenerationFailedError(DomainError):
    """A generation failed for a reason that is the server's fault; the message says what
    happened in one sentence (never an exception's text)."""

    reason = "GENERATION_FAILED"
