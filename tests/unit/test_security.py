"""Tokens, scopes and their configuration, without a server."""

from __future__ import annotations

from pathlib import Path

import pytest

from server.application.commands import RegisterLoRACommand
from server.application.context import SYSTEM_CONTEXT, DispatchContext
from server.application.queries import GetLoRAByIdQuery
from server.application.security import (
    ANONYMOUS,
    Credential,
    ScopeAuthorizer,
    TokenAuthenticator,
    token_sha256,
)
from server.config import load_settings
from server.domain.errors import PermissionDeniedError, UnauthenticatedError, ValidationError


def authenticator() -> TokenAuthenticator:
    return TokenAuthenticator([Credential("ci", token_sha256("s3cret"), frozenset({"read"}))])


def test_without_credentials_everyone_is_anonymous_with_every_scope() -> None:
    assert TokenAuthenticator([]).authenticate(None) == ANONYMOUS
    assert TokenAuthenticator([]).authenticate("Bearer whatever") == ANONYMOUS


@pytest.mark.parametrize("header", [None, "", "s3cret", "Basic s3cret", "Bearer ", "Bearer nope"])
def test_missing_malformed_or_unknown_tokens_are_unauthenticated(header: str | None) -> None:
    with pytest.raises(UnauthenticatedError):
        authenticator().authenticate(header)


def test_a_known_token_names_its_principal_and_scopes() -> None:
    principal = authenticator().authenticate("Bearer s3cret")
    assert (principal.name, principal.scopes) == ("ci", frozenset({"read"}))
    assert authenticator().authenticate("bearer s3cret").name == "ci"


def test_scopes_per_message_and_admin_has_all() -> None:
    authorize = ScopeAuthorizer().authorize
    reader = DispatchContext(principal="ci", scopes=frozenset({"read"}))
    authorize(GetLoRAByIdQuery(lora_id="x"), reader)
    with pytest.raises(PermissionDeniedError) as denied:
        authorize(RegisterLoRACommand(path="a.safetensors"), reader)
    assert denied.value.metadata["required_scope"] == "write"
    authorize(RegisterLoRACommand(path="a"), DispatchContext(scopes=frozenset({"admin"})))
    authorize(RegisterLoRACommand(path="a"), SYSTEM_CONTEXT)


def test_a_message_without_a_declared_scope_is_refused() -> None:
    class NewCommand:
        pass

    with pytest.raises(PermissionDeniedError):
        ScopeAuthorizer().authorize(NewCommand(), DispatchContext(scopes=frozenset({"admin"})))


def test_tokens_are_configured_by_hash(tmp_path: Path) -> None:
    digest = token_sha256("t")
    toml = tmp_path / "s.toml"
    toml.write_text(
        'tls_cert = "certs/server.pem"\n'
        f'[[tokens]]\nname = "ci"\nsha256 = "{digest}"\nscopes = ["read", "generate"]\n'
    )
    settings = load_settings(["--config", str(toml)])
    assert [(t.name, t.sha256, t.scopes) for t in settings.tokens] == [
        ("ci", digest, frozenset({"read", "generate"}))
    ]
    assert settings.tls_cert == tmp_path / "certs" / "server.pem"
    for bad in (
        'name = "x"\nsha256 = "abc"\nscopes = ["read"]',
        f'name = "x"\nsha256 = "{digest}"\nscopes = ["root"]',
        f'name = "x"\nsha256 = "{digest}"\nscopes = ["read"]\ntls_cert = "oops.pem"',
    ):
        toml.write_text(f"[[tokens]]\n{bad}\n")
        with pytest.raises(ValidationError):
            load_settings(["--config", str(toml)])
