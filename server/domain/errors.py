"""Domain errors: the one taxonomy. A failed CommandResult carries the error itself, and the
transport maps each class to a status code in one table (rpc/errors.py); everything else a
client sees (reason, metadata, field violations, retry delay) is read off the error."""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar, Literal

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


class Reason(enum.StrEnum):
    """Every `ErrorInfo.reason` this server sends. Each belongs to one error class below (its
    `reasons`), whose row in rpc/errors.py gives the status code; README's table of reasons
    is `python -m server.rpc.errors` (a unit test keeps the two equal)."""

    INVALID_FIELD = "INVALID_FIELD"
    MALFORMED_ID = "MALFORMED_ID"
    UNDECODABLE_REQUEST = "UNDECODABLE_REQUEST"
    IDEMPOTENCY_KEY_REUSED = "IDEMPOTENCY_KEY_REUSED"
    INVALID_PAGE_TOKEN = "INVALID_PAGE_TOKEN"
    INVALID_CONSISTENCY_TOKEN = "INVALID_CONSISTENCY_TOKEN"
    INVALID_SETTING = "INVALID_SETTING"
    BAD_LORA_FILE = "BAD_LORA_FILE"
    LORA_NOT_FOUND = "LORA_NOT_FOUND"
    MODEL_NOT_FOUND = "MODEL_NOT_FOUND"
    CONTROLNET_NOT_FOUND = "CONTROLNET_NOT_FOUND"
    GENERATION_NOT_FOUND = "GENERATION_NOT_FOUND"
    RECOMMENDATION_NOT_FOUND = "RECOMMENDATION_NOT_FOUND"
    WRITE_CONFLICT = "WRITE_CONFLICT"
    NO_MODEL = "NO_MODEL"
    MODEL_NOT_READY = "MODEL_NOT_READY"
    LORA_UNAVAILABLE = "LORA_UNAVAILABLE"
    LORA_ARCHITECTURE_MISMATCH = "LORA_ARCHITECTURE_MISMATCH"
    LORA_FILE_MISSING = "LORA_FILE_MISSING"
    LORA_LOAD_FAILED = "LORA_LOAD_FAILED"
    MODEL_LOAD_FAILED = "MODEL_LOAD_FAILED"
    CONTROLNET_NOT_READY = "CONTROLNET_NOT_READY"
    CONTROLNET_ARCHITECTURE_MISMATCH = "CONTROLNET_ARCHITECTURE_MISMATCH"
    CONTROLNET_LOAD_FAILED = "CONTROLNET_LOAD_FAILED"
    UPSCALER_NOT_READY = "UPSCALER_NOT_READY"
    GENERATION_NOT_LIVE = "GENERATION_NOT_LIVE"
    IMAGE_NOT_KEPT = "IMAGE_NOT_KEPT"
    WORKER_REFUSED = "WORKER_REFUSED"
    STORE_UNAVAILABLE = "STORE_UNAVAILABLE"
    BROKER_UNAVAILABLE = "BROKER_UNAVAILABLE"
    SERVER_SHUTTING_DOWN = "SERVER_SHUTTING_DOWN"
    WORKER_LOST = "WORKER_LOST"
    CONSISTENCY_TIMEOUT = "CONSISTENCY_TIMEOUT"
    DEADLINE_PASSED = "DEADLINE_PASSED"
    NOT_IMPLEMENTED = "NOT_IMPLEMENTED"
    QUEUE_FULL = "QUEUE_FULL"
    RATE_LIMITED = "RATE_LIMITED"
    TOO_MANY_STREAMS = "TOO_MANY_STREAMS"
    REQUEST_TOO_LARGE = "REQUEST_TOO_LARGE"
    OUT_OF_DEVICE_MEMORY = "OUT_OF_DEVICE_MEMORY"
    TOKEN_MISSING = "TOKEN_MISSING"
    TOKEN_UNKNOWN = "TOKEN_UNKNOWN"
    SCOPE_MISSING = "SCOPE_MISSING"
    GENERATION_FAILED = "GENERATION_FAILED"
    INTERNAL_ERROR = "INTERNAL_ERROR"


# What each reason means, for the README's table.
REASON_TEXT: dict[Reason, str] = {
    Reason.INVALID_FIELD: "a request field is wrong; BadRequest names each one",
    Reason.MALFORMED_ID: "an id field is empty or not an id this server makes (a UUID)",
    Reason.UNDECODABLE_REQUEST: "the request bytes are not a valid message of the method's type",
    Reason.IDEMPOTENCY_KEY_REUSED: "the `request_id` was already used for a different request",
    Reason.INVALID_PAGE_TOKEN: "a `page_token` this server did not issue for this listing",
    Reason.INVALID_CONSISTENCY_TOKEN: "a `consistency_token` this server did not issue",
    Reason.INVALID_SETTING: "a server setting cannot be used (start-up only)",
    Reason.BAD_LORA_FILE: "the file is not a usable LoRA, or lies outside the LoRA roots",
    Reason.LORA_NOT_FOUND: "no LoRA has that id (or file name)",
    Reason.MODEL_NOT_FOUND: "no base model has that name; the message lists those there are",
    Reason.CONTROLNET_NOT_FOUND: "no ControlNet has that name; the message lists those there are",
    Reason.GENERATION_NOT_FOUND: "no generation has that id",
    Reason.RECOMMENDATION_NOT_FOUND: "no recommendation has that id",
    Reason.WRITE_CONFLICT: "a concurrent write changed the same entity; retry",
    Reason.NO_MODEL: "no base model is configured",
    Reason.MODEL_NOT_READY: "the model is loading (RetryInfo says when to retry) or failed to load",
    Reason.LORA_UNAVAILABLE: "the LoRA is catalogued without a file on this server",
    Reason.LORA_ARCHITECTURE_MISMATCH: "the LoRA is for another architecture than the model",
    Reason.LORA_FILE_MISSING: "the LoRA's file is gone from the LoRA roots",
    Reason.LORA_LOAD_FAILED: "the LoRA's file would not load on the model (a generation stream)",
    Reason.MODEL_LOAD_FAILED: "the model's files would not load (a generation stream)",
    Reason.CONTROLNET_NOT_READY: "the ControlNet's files are missing or unusable (it says why)",
    Reason.CONTROLNET_ARCHITECTURE_MISMATCH: "the ControlNet is for another architecture",
    Reason.CONTROLNET_LOAD_FAILED: "the ControlNet would not load on the model (a stream)",
    Reason.UPSCALER_NOT_READY: "the upscaler model's file is missing or unusable (it says why)",
    Reason.GENERATION_NOT_LIVE: "the generation is not streaming here; watch or get it by id",
    Reason.IMAGE_NOT_KEPT: "an earlier image named as input is no longer kept; send its bytes",
    Reason.WORKER_REFUSED: "no cluster worker has the model or LoRA files the job needs",
    Reason.STORE_UNAVAILABLE: "the event store or read model is unreachable; retry",
    Reason.BROKER_UNAVAILABLE: "the cluster's job broker is unreachable; retry",
    Reason.SERVER_SHUTTING_DOWN: "the server is stopping; retry on another or later",
    Reason.WORKER_LOST: "the workers running the job kept stopping before it finished",
    Reason.CONSISTENCY_TIMEOUT: "the read model did not reach the consistency token in time",
    Reason.DEADLINE_PASSED: "the caller's deadline passed before the work ran",
    Reason.NOT_IMPLEMENTED: "the method is specified but not built yet",
    Reason.QUEUE_FULL: "the generation queue is full; RetryInfo says when to retry",
    Reason.RATE_LIMITED: "the caller is over its request rate; RetryInfo says when to retry",
    Reason.TOO_MANY_STREAMS: "the caller has too many streams open",
    Reason.REQUEST_TOO_LARGE: "the request is over the method's size limit (see Limits)",
    Reason.OUT_OF_DEVICE_MEMORY: "the device ran out of memory (a generation stream); retry",
    Reason.TOKEN_MISSING: "no bearer token, or authorization metadata that is not one",
    Reason.TOKEN_UNKNOWN: "a bearer token this server does not know",
    Reason.SCOPE_MISSING: "the token lacks the scope the method needs (ErrorInfo names it)",
    Reason.GENERATION_FAILED: "the generation failed inside the server (a generation stream)",
    Reason.INTERNAL_ERROR: "a server bug; quote the correlation id",
}


@dataclass(frozen=True, slots=True)
class FieldViolation:
    field: str
    description: str


class DomainError(Exception):
    """Base of every error a client may see; `reason` is a stable UPPER_SNAKE code."""

    # The reasons a class may carry (README's table reads them); the first is its default.
    reasons: ClassVar[tuple[Reason, ...]] = (Reason.INTERNAL_ERROR,)
    reason: str
    # The transport sends these as google.rpc BadRequest and RetryInfo details when set.
    field_violations: tuple[FieldViolation, ...] = ()
    retry_after_seconds: float | None = None

    def __init__(
        self,
        message: str,
        *,
        metadata: dict[str, str] | None = None,
        reason: Reason | None = None,
    ) -> None:
        message = clip(message, MAX_MESSAGE_BYTES)
        super().__init__(message)
        self.message = message
        self.metadata = {k: clip(v, MAX_DETAIL_BYTES) for k, v in (metadata or {}).items()}
        self.reason = reason or type(self).reasons[0]


class ValidationError(DomainError):
    """The request itself is wrong; each violation names the offending field."""

    reasons: ClassVar[tuple[Reason, ...]] = (
        Reason.INVALID_FIELD,
        Reason.MALFORMED_ID,
        Reason.IDEMPOTENCY_KEY_REUSED,
        Reason.INVALID_SETTING,  # config's SettingsError, at start-up
    )

    def __init__(
        self, violations: list[FieldViolation] | FieldViolation, *, reason: Reason | None = None
    ) -> None:
        given = [violations] if isinstance(violations, FieldViolation) else violations
        self.field_violations = tuple(
            FieldViolation(v.field, clip(v.description, MAX_DETAIL_BYTES))
            for v in given[:MAX_VIOLATIONS]
        )
        more = f"; and {len(given) - MAX_VIOLATIONS} more" if len(given) > MAX_VIOLATIONS else ""
        shown = "; ".join(f"{v.field}: {v.description}" for v in self.field_violations)
        super().__init__(shown + more, reason=reason)

    @property
    def violations(self) -> tuple[FieldViolation, ...]:
        """The older name of `field_violations`, still read by config and tests."""
        return self.field_violations


class UndecodableRequestError(ValidationError):
    """The request's bytes do not parse as the method's message (invalid UTF-8 in a string,
    truncated wire data): nothing in it can be trusted, so no field is named."""

    reasons = (Reason.UNDECODABLE_REQUEST,)

    def __init__(self, message_name: str) -> None:
        DomainError.__init__(
            self, f"the request is not a valid {message_name}", reason=Reason.UNDECODABLE_REQUEST
        )


class InvalidTokenError(ValidationError):
    """A page or consistency token this server did not issue (or issued for another
    listing). Tokens are opaque: the message is one plain sentence, never a decoder's."""

    reasons = (Reason.INVALID_PAGE_TOKEN, Reason.INVALID_CONSISTENCY_TOKEN)

    def __init__(self, field: str, reason: Reason, sentence: str) -> None:
        super().__init__(FieldViolation(field, sentence), reason=reason)
        self.message = sentence
        self.args = (sentence,)

    @staticmethod
    def page() -> InvalidTokenError:
        return InvalidTokenError(
            "page_token",
            Reason.INVALID_PAGE_TOKEN,
            "page_token is not a token this server issued for this listing; start again without it",
        )

    @staticmethod
    def consistency() -> InvalidTokenError:
        return InvalidTokenError(
            "consistency_token",
            Reason.INVALID_CONSISTENCY_TOKEN,
            "consistency_token is not a token this server issued; pass one a command "
            "returned, or none",
        )


Resource = Literal["lora", "model", "controlnet", "generation", "recommendation"]
_NOT_FOUND: dict[str, tuple[str, Reason]] = {
    "lora": ("LoRA", Reason.LORA_NOT_FOUND),
    "model": ("model", Reason.MODEL_NOT_FOUND),
    "controlnet": ("ControlNet", Reason.CONTROLNET_NOT_FOUND),
    "generation": ("generation", Reason.GENERATION_NOT_FOUND),
    "recommendation": ("recommendation", Reason.RECOMMENDATION_NOT_FOUND),
}


class NotFoundError(DomainError):
    """The named resource does not exist (or no longer does); `known`, when given, lists
    those there are (the configured models)."""

    reasons = (
        Reason.LORA_NOT_FOUND,
        Reason.MODEL_NOT_FOUND,
        Reason.CONTROLNET_NOT_FOUND,
        Reason.GENERATION_NOT_FOUND,
        Reason.RECOMMENDATION_NOT_FOUND,
    )

    def __init__(self, resource: Resource, resource_id: str, known: Sequence[str] = ()) -> None:
        name, reason = _NOT_FOUND[resource]
        there = f"; there are: {', '.join(known)}" if known else ""
        super().__init__(
            f"{name} {resource_id!r} not found{there}",
            metadata={"resource": resource, "id": resource_id},
            reason=reason,
        )
        self.resource = resource
        self.resource_id = resource_id


class ConflictError(DomainError):
    """The write clashes with existing state: a concurrent write to the same entity."""

    reasons = (Reason.WRITE_CONFLICT,)


class PreconditionError(DomainError):
    """The system is not in a state that allows the operation."""

    reasons = (
        Reason.NO_MODEL,
        Reason.MODEL_NOT_READY,
        Reason.LORA_UNAVAILABLE,
        Reason.LORA_ARCHITECTURE_MISMATCH,
        Reason.LORA_FILE_MISSING,
        Reason.LORA_LOAD_FAILED,
        Reason.MODEL_LOAD_FAILED,
        Reason.CONTROLNET_NOT_READY,
        Reason.CONTROLNET_ARCHITECTURE_MISMATCH,
        Reason.CONTROLNET_LOAD_FAILED,
        Reason.UPSCALER_NOT_READY,
        Reason.GENERATION_NOT_LIVE,
        Reason.IMAGE_NOT_KEPT,
        Reason.WORKER_REFUSED,
    )

    def __init__(
        self,
        message: str,
        *,
        reason: Reason,
        metadata: dict[str, str] | None = None,
        retry_after_seconds: float | None = None,
    ) -> None:
        super().__init__(message, metadata=metadata, reason=reason)
        self.retry_after_seconds = retry_after_seconds


class UnavailableError(DomainError):
    """A dependency (the store) is down; the client may retry."""

    reasons = (
        Reason.STORE_UNAVAILABLE,
        Reason.BROKER_UNAVAILABLE,
        Reason.SERVER_SHUTTING_DOWN,
        Reason.WORKER_LOST,
    )

    retry_after_seconds: float

    def __init__(
        self, message: str, *, retry_after_seconds: float = 1.0, reason: Reason | None = None
    ) -> None:
        super().__init__(message, reason=reason)
        self.retry_after_seconds = retry_after_seconds


class ConsistencyTimeoutError(DomainError):
    """The read model did not reach the requested consistency token in time."""

    reasons = (Reason.CONSISTENCY_TIMEOUT,)


class NotImplementedYetError(DomainError):
    """A v1 method that is specified but not built yet."""

    reasons = (Reason.NOT_IMPLEMENTED,)


class BadLoraFileError(DomainError):
    """A file that cannot be a LoRA: not safetensors, truncated, oversized header, wrong tensors,
    or outside the configured roots."""

    reasons = (Reason.BAD_LORA_FILE,)

    def __init__(self, path: str, why: str) -> None:
        super().__init__(f"{path}: {why}", metadata={"path": path})
        self.path = path
        self.why = why
        self.field_violations = (FieldViolation("path", self.message),)


class ResourceExhaustedError(DomainError):
    """A bounded resource (the generation queue) is full; retry after `retry_after_seconds`."""

    reasons = (
        Reason.QUEUE_FULL,
        Reason.RATE_LIMITED,
        Reason.TOO_MANY_STREAMS,
        Reason.OUT_OF_DEVICE_MEMORY,
    )

    retry_after_seconds: float

    def __init__(
        self, message: str, retry_after_seconds: float = 1.0, *, reason: Reason | None = None
    ) -> None:
        super().__init__(message, reason=reason)
        self.retry_after_seconds = retry_after_seconds


class RequestTooLargeError(DomainError):
    """A request over its method's size limit. RESOURCE_EXHAUSTED like gRPC's own limit, but
    without RetryInfo: the same request will never fit."""

    reasons = (Reason.REQUEST_TOO_LARGE,)

    def __init__(self, method: str, size: int, limit: int) -> None:
        super().__init__(
            f"the request is {size:,} bytes; {method} takes at most {limit:,}",
            metadata={"size_bytes": str(size), "limit_bytes": str(limit)},
        )


class UnauthenticatedError(DomainError):
    """No credentials, or credentials this server does not know."""

    reasons = (Reason.TOKEN_MISSING, Reason.TOKEN_UNKNOWN)


class PermissionDeniedError(DomainError):
    """The caller is known but its scopes do not allow the request."""

    reasons = (Reason.SCOPE_MISSING,)


class DeadlineExceededError(DomainError):
    """The caller's deadline passed; the work was not started (or was stopped)."""

    reasons = (Reason.DEADLINE_PASSED,)


class GenerationFailedError(DomainError):
    """A generation failed for a reason that is the server's fault; the message says what
    happened in one sentence (never an exception's text)."""

    reasons = (Reason.GENERATION_FAILED,)
