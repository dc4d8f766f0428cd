"""Who may do what: bearer tokens (stored as SHA-256 only) name a principal with scopes, and
one table says which scope each command and query needs. The table is checked once, in the
bus middleware every dispatch runs through; a message type missing from it is refused, so a
new RPC cannot ship unprotected."""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Sequence
from dataclasses import dataclass

from server.application.commands import (
    CancelGenerationCommand,
    DeleteLoRACommand,
    FilterConfidentRecommendationsCommand,
    GenerateImageCommand,
    ImportLoRACatalogCommand,
    ImportLoRAsCommand,
    QuickGenerateCommand,
    RecommendLoRAsCommand,
    RecommendTopLoRACommand,
    RecordGenerationCommand,
    RegisterLoRACommand,
    SubmitGenerationCommand,
    UpdateLoRACommand,
    UpscaleImageCommand,
)
from server.application.context import DispatchContext
from server.application.queries import (
    GetAllLoRAsQuery,
    GetGenerationQuery,
    GetLoRAByIdQuery,
    GetLoRAsByBaseModelQuery,
    ListBaseModelsQuery,
    ListEventsQuery,
    ListGenerationsQuery,
    SearchLoRAsByPromptQuery,
    WatchGenerationQuery,
)
from server.domain.errors import PermissionDeniedError, Reason, UnauthenticatedError

READ, WRITE, GENERATE, ADMIN = "read", "write", "generate", "admin"
ALL_SCOPES = frozenset({READ, WRITE, GENERATE, ADMIN})

REQUIRED_SCOPE: dict[type, str] = {
    # QueryService: reads.
    GetLoRAByIdQuery: READ,
    GetAllLoRAsQuery: READ,
    GetLoRAsByBaseModelQuery: READ,
    SearchLoRAsByPromptQuery: READ,
    ListBaseModelsQuery: READ,
    GetGenerationQuery: READ,
    ListGenerationsQuery: READ,
    WatchGenerationQuery: READ,
    ListEventsQuery: READ,
    # The catalog.
    RegisterLoRACommand: WRITE,
    ImportLoRAsCommand: WRITE,
    ImportLoRACatalogCommand: WRITE,
    UpdateLoRACommand: WRITE,
    DeleteLoRACommand: WRITE,
    # Generation and the recommendations that feed it.
    RecommendLoRAsCommand: GENERATE,
    RecommendTopLoRACommand: GENERATE,
    FilterConfidentRecommendationsCommand: GENERATE,
    GenerateImageCommand: GENERATE,
    UpscaleImageCommand: GENERATE,
    QuickGenerateCommand: GENERATE,
    SubmitGenerationCommand: GENERATE,
    CancelGenerationCommand: GENERATE,
    # Only the server itself records history (after a generation finishes).
    RecordGenerationCommand: ADMIN,
}


@dataclass(frozen=True, slots=True)
class Credential:
    name: str
    sha256: str
    scopes: frozenset[str]


@dataclass(frozen=True, slots=True)
class Principal:
    name: str
    scopes: frozenset[str]


ANONYMOUS = Principal("anonymous", ALL_SCOPES)


def token_sha256(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


class TokenAuthenticator:
    """Maps an `authorization: Bearer <token>` header to a principal. With no credentials
    configured, everyone is `anonymous` with every scope (the loopback-only default)."""

    def __init__(self, credentials: Sequence[Credential]) -> None:
        self._by_hash = {c.sha256: c for c in credentials}

    @property
    def enabled(self) -> bool:
        return bool(self._by_hash)

    def authenticate(self, authorization: str | None) -> Principal:
        if not self.enabled:
            return ANONYMOUS
        if not authorization:
            raise UnauthenticatedError("this server needs a bearer token (authorization metadata)")
        scheme, _, token = authorization.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise UnauthenticatedError("authorization metadata must be 'Bearer <token>'")
        digest = token_sha256(token.strip())
        for known, credential in self._by_hash.items():
            if hmac.compare_digest(known, digest):
                return Principal(credential.name, credential.scopes)
        raise UnauthenticatedError(
            "this server does not know that token", reason=Reason.TOKEN_UNKNOWN
        )


class ScopeAuthorizer:
    """Refuses a dispatch whose message needs a scope the caller lacks (`admin` has all)."""

    def authorize(self, message: object, ctx: DispatchContext) -> None:
        needed = REQUIRED_SCOPE.get(type(message))
        if needed is None:
            raise PermissionDeniedError(
                f"{type(message).__name__} has no required scope; refusing by default"
            )
        if needed in ctx.scopes or ADMIN in ctx.scopes:
            return
        raise PermissionDeniedError(
            f"{ctx.principal!r} may not do this: it needs the {needed!r} scope",
            metadata={"required_scope": needed, "principal": ctx.principal},
        )
