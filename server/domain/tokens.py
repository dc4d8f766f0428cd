"""Page and consistency tokens: opaque to clients, and tamper-evident. Each is base64 of a
small payload followed by a truncated HMAC-SHA256 under the deployment's key (the page
token's MAC also covers the listing's filter, so a token cannot be replayed against another
listing). A token is checked cheaply before anything parses it: its length, its base64, its
MAC (in constant time); only a payload this server signed is then read, strictly typed. So a
forged token costs microseconds, whatever its bytes, and is refused with one plain sentence."""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import os
import re
from collections.abc import Callable
from typing import Any, TypeVar

from server.domain.errors import InvalidTokenError

T = TypeVar("T")

MAC_BYTES = 16
KEY_BYTES = 32  # a generated key's length
MIN_KEY_BYTES = 16
# Longest token accepted, checked before decoding: a page token of a LoRA whose 512-character
# name is all 4-byte UTF-8 is about 2,800 characters, far below this.
MAX_TOKEN_CHARS = 4096
_PAGE = b"page\x00"
_CONSISTENCY = b"consistency\x00"
_BASE64URL = re.compile(r"[A-Za-z0-9_-]*")
_HEX = re.compile(r"(?:[0-9a-fA-F]{2})+")


def parse_key(text: str) -> bytes:
    """The key a `token_key` setting names: hex, else base64 (standard or URL-safe), of at
    least 16 bytes. ValueError with a plain sentence otherwise."""
    text = text.strip()
    if _HEX.fullmatch(text):
        key = bytes.fromhex(text)
    else:
        try:
            key = base64.b64decode(
                text.replace("-", "+").replace("_", "/") + "=" * (-len(text) % 4), validate=True
            )
        except (binascii.Error, ValueError):
            raise ValueError("must be hex or base64") from None
    if len(key) < MIN_KEY_BYTES:
        raise ValueError(f"must be at least {MIN_KEY_BYTES} bytes (hex or base64)")
    return key


def new_key() -> bytes:
    return os.urandom(KEY_BYTES)


class TokenSigner:
    """Issues and checks this deployment's tokens. One per process, built by the composition
    root from the configured key or the one kept in the shared store (so every replica of a
    cluster accepts the others' tokens)."""

    def __init__(self, key: bytes) -> None:
        if len(key) < MIN_KEY_BYTES:
            raise ValueError(f"a token key needs at least {MIN_KEY_BYTES} bytes")
        self._key = key

    # -- page tokens ---------------------------------------------------------------------

    def page_token(self, listing: str, **position: Any) -> str:
        """A token for the page after `position` of `listing` (its filter)."""
        payload = json.dumps(position, separators=(",", ":"), ensure_ascii=False)
        return self._seal(_listing(listing), payload.encode("utf-8", "surrogatepass"))

    def page_position(self, token: str, listing: str, parse: Callable[[dict[str, Any]], T]) -> T:
        """The position `parse` reads from a token this server issued for `listing`. Any
        other token (too long, not base64, wrong MAC, another listing's, or a payload `parse`
        refuses) is InvalidTokenError; nothing of a decoder's message reaches the client."""
        payload = self._open(_listing(listing), token)
        if payload is None:
            raise InvalidTokenError.page()
        try:
            data = json.loads(payload.decode("utf-8", "surrogatepass"))
            if not isinstance(data, dict):
                raise TypeError("not an object")
            return parse(data)
        except (ValueError, TypeError, KeyError, RecursionError):
            raise InvalidTokenError.page() from None

    # -- consistency tokens --------------------------------------------------------------

    def consistency_token(self, position: int) -> str:
        """A token naming log `position` ("" for none: nothing to wait for)."""
        if position <= 0:
            return ""
        return self._seal(_CONSISTENCY, position.to_bytes(8, "big"))

    def consistency_position(self, token: str) -> int:
        """The log position of a token this server issued; 0 for none."""
        if not token:
            return 0
        payload = self._open(_CONSISTENCY, token)
        if payload is None or len(payload) != 8:
            raise InvalidTokenError.consistency()
        position = int.from_bytes(payload, "big")
        if not 0 < position < 2**63:
            raise InvalidTokenError.consistency()
        return position

    # -- the envelope --------------------------------------------------------------------

    def _mac(self, context: bytes, payload: bytes) -> bytes:
        return hmac.new(self._key, context + payload, hashlib.sha256).digest()[:MAC_BYTES]

    def _seal(self, context: bytes, payload: bytes) -> str:
        raw = payload + self._mac(context, payload)
        return base64.urlsafe_b64encode(raw).decode("ascii").rstrip("=")

    def _open(self, context: bytes, token: str) -> bytes | None:
        """The payload of a token sealed under `context`, or None: checked in the order
        cheapest first, the MAC last, so nothing unsigned is ever parsed."""
        if len(token) > MAX_TOKEN_CHARS or not _BASE64URL.fullmatch(token):
            return None
        try:
            raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
        except (binascii.Error, ValueError):
            return None
        if len(raw) <= MAC_BYTES:
            return None
        payload, mac = raw[:-MAC_BYTES], raw[-MAC_BYTES:]
        if not hmac.compare_digest(mac, self._mac(context, payload)):
            return None
        return payload


def _listing(listing: str) -> bytes:
    """The MAC context of a listing's page tokens: a fixed-length digest of its filter, so
    no filter and payload can be split another way to forge a third."""
    return _PAGE + hashlib.sha256(listing.encode("utf-8", "surrogatepass")).digest()


def typed(payload: dict[str, Any], key: str, kind: type[T]) -> T:
    """`payload[key]` if it is a `kind` (bools are not ints here); TypeError otherwise."""
    value = payload[key]
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise TypeError(key)
    return value
