"""Every generation belongs to the principal that submitted it. This is the one rule every
generation use case asks: a principal sees and acts on only its own generations, and one with
the `admin` scope sees all. To anyone else a generation does not exist: they get the same
NOT_FOUND as for an unknown id, so its existence leaks nothing."""

from __future__ import annotations

from dataclasses import dataclass

from server.application.context import DispatchContext
from server.domain.errors import (
    FieldViolation,
    NotFoundError,
    PermissionDeniedError,
    ValidationError,
)

ADMIN_SCOPE = "admin"


def is_admin(ctx: DispatchContext) -> bool:
    return ADMIN_SCOPE in ctx.scopes


def can_see(ctx: DispatchContext, owner: str) -> bool:
    """Whether the caller may see (and act on) a generation `owner` submitted."""
    return is_admin(ctx) or owner == ctx.principal


def require_visible(ctx: DispatchContext, generation_id: str, owner: str | None) -> None:
    """Raises the NOT_FOUND of an unknown id unless the generation exists (`owner` is not
    None) and the caller may see it."""
    if owner is None or not can_see(ctx, owner):
        raise NotFoundError("generation", generation_id)


@dataclass(frozen=True, slots=True)
class Viewer:
    """Who a query answers: part of its cache key, so one principal's cached answer is never
    handed to another."""

    principal: str
    admin: bool

    @staticmethod
    def of(ctx: DispatchContext) -> Viewer:
        return Viewer(ctx.principal, is_admin(ctx))


def owners_filter(ctx: DispatchContext, *, all_owners: bool, owner: str) -> str | None:
    """The owner a listing is limited to (None: every owner). Without arguments a caller
    lists its own, an admin too; `all_owners` and another principal's `owner` need admin."""
    if all_owners:
        if owner:
            raise ValidationError(
                FieldViolation("owner", "give either owner or all_owners, not both")
            )
        _require_admin(ctx, "every principal's generations")
        return None
    if owner and owner != ctx.principal:
        _require_admin(ctx, "another principal's generations")
        return owner
    return ctx.principal


def events_owner(ctx: DispatchContext) -> str | None:
    """The generations whose audit events the caller may list (None: all of them); catalog
    events are everyone's."""
    return None if is_admin(ctx) else ctx.principal


def _require_admin(ctx: DispatchContext, what: str) -> None:
    if not is_admin(ctx):
        raise PermissionDeniedError(
            f"{ctx.principal!r} may not list {what}: it needs the {ADMIN_SCOPE!r} scope",
            metadata={"required_scope": ADMIN_SCOPE, "principal": ctx.principal},
        )
