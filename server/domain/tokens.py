"""Page tokens: opaque to clients (base64 of a small JSON object naming the listing it
pages), and refused with one plain sentence when they are not one this server issued."""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Callable
from typing import Any, TypeVar

from server.domain.errors import InvalidTokenError

T = TypeVar("T")


def encode_page_token(listing: str, **position: Any) -> str:
    """A token for the page after `position` of `listing` (its filter, so a token cannot be
    used with another one)."""
    payload = {"f": listing, **position}
    return base64.urlsafe_b64encode(json.dumps(payload).encode()).decode().rstrip("=")


def decode_page_token(token: str, listing: str, parse: Callable[[dict[str, Any]], T]) -> T:
    """The position `parse` reads from a token of `listing`. Anything else, whatever its
    bytes (not base64, not JSON, another listing's, missing or mistyped keys), is
    InvalidTokenError; nothing of the decoder's own message reaches the client."""
    try:
        raw = base64.urlsafe_b64decode(token.encode("ascii") + b"=" * (-len(token) % 4))
        payload = json.loads(raw)
        if not isinstance(payload, dict) or payload.get("f") != listing:
            raise ValueError("another listing's token")
        return parse(payload)
    except (ValueError, TypeError, KeyError, UnicodeError, binascii.Error, RecursionError):
        raise InvalidTokenError.page() from None


def typed(payload: dict[str, Any], key: str, kind: type[T]) -> T:
    """`payload[key]` if it is a `kind` (bools are not ints here); TypeError otherwise."""
    value = payload[key]
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise TypeError(key)
    return value
