"""Page and consistency tokens are signed: only what this deployment issued is accepted, and a
forged token is refused before anything parses it, whatever its bytes."""

from __future__ import annotations

import base64
import json
import time
from typing import Any

import pytest

from server.domain.errors import InvalidTokenError, Reason
from server.domain.tokens import MAX_TOKEN_CHARS, TokenSigner, parse_key, typed

KEY = bytes(range(32))


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def _offset(p: dict[str, Any]) -> int:
    return typed(p, "o", int)


def test_a_page_token_round_trips_only_for_its_listing_and_key() -> None:
    signer = TokenSigner(KEY)
    token = signer.page_token("search|cat|", o=20)
    assert signer.page_position(token, "search|cat|", _offset) == 20
    with pytest.raises(InvalidTokenError):  # another listing's filter: a replay
        signer.page_position(token, "search|dog|", _offset)
    with pytest.raises(InvalidTokenError):  # another deployment's key
        TokenSigner(bytes(32)).page_position(token, "search|cat|", _offset)


def test_a_consistency_token_round_trips_and_is_not_a_page_token() -> None:
    signer = TokenSigner(KEY)
    token = signer.consistency_token(42)
    assert signer.consistency_position(token) == 42
    assert signer.consistency_token(0) == ""
    assert signer.consistency_position("") == 0
    with pytest.raises(InvalidTokenError) as info:
        signer.consistency_position(signer.page_token("", p=42))
    assert info.value.reason is Reason.INVALID_CONSISTENCY_TOKEN
    with pytest.raises(InvalidTokenError) as info:
        signer.page_position(token, "", lambda p: p)
    assert info.value.reason is Reason.INVALID_PAGE_TOKEN


# What the unsigned tokens of the older build accepted as far as their parser (base64 of
# JSON), and some that made it slow or answer INTERNAL: now all fail at the MAC.
FORGED = [
    "garbage",
    "eyJmIjogIk5vbmV8fEZhbHNlIn0",  # {"f": "None||False"}: the listing, no position
    _b64(json.dumps({"f": "None||False", "n": 1, "i": None}).encode()),
    _b64(json.dumps({"f": "", "p": 1e30}).encode()),
    _b64(("[" * 5000).encode()),
    _b64(b"x" * 40),
    "A" * 5000,  # over the length cap
    "%%%%",
    "12345",  # the older build's consistency token
]


@pytest.mark.parametrize("token", FORGED)
def test_forged_tokens_are_one_plain_sentence(token: str) -> None:
    signer = TokenSigner(KEY)
    with pytest.raises(InvalidTokenError) as page:
        signer.page_position(token, "None||False", lambda p: p)
    assert page.value.message.startswith("page_token is not a token this server issued")
    with pytest.raises(InvalidTokenError) as cons:
        signer.consistency_position(token)
    assert cons.value.message.startswith("consistency_token is not a token this server issued")


def test_a_flipped_bit_anywhere_is_refused() -> None:
    signer = TokenSigner(KEY)
    raw = base64.urlsafe_b64decode(signer.page_token("l", o=3) + "==")
    for i in range(len(raw)):
        tampered = bytearray(raw)
        tampered[i] ^= 1
        with pytest.raises(InvalidTokenError):
            signer.page_position(_b64(bytes(tampered)), "l", _offset)


def test_a_signed_payload_is_still_parsed_strictly() -> None:
    signer = TokenSigner(KEY)
    for position in ({"o": "3"}, {"o": True}, {"x": 1}):
        with pytest.raises(InvalidTokenError):
            signer.page_position(signer.page_token("l", **position), "l", _offset)


def test_a_long_name_fits_under_the_cap() -> None:
    signer = TokenSigner(KEY)
    name = "\U0001f600" * 512  # the longest name, all 4-byte UTF-8
    token = signer.page_token("x", n=name, i="0" * 36)
    assert len(token) <= MAX_TOKEN_CHARS
    assert signer.page_position(token, "x", lambda p: typed(p, "n", str)) == name


def test_forged_tokens_are_refused_in_microseconds() -> None:
    """Memory, not timing, is the soak's concern; this only guards the order of the checks
    (a deep "[" nest parsed before the MAC took milliseconds). 5 ms is a generous bound."""
    signer = TokenSigner(KEY)
    for token in FORGED[1:7]:
        start = time.perf_counter()
        for _ in range(100):
            with pytest.raises(InvalidTokenError):
                signer.page_position(token, "None||False", lambda p: p)
        assert (time.perf_counter() - start) / 100 < 0.005


def test_keys_are_hex_or_base64_of_at_least_16_bytes() -> None:
    assert parse_key("ab" * 16) == b"\xab" * 16
    assert parse_key(base64.b64encode(KEY).decode()) == KEY
    assert parse_key(_b64(KEY)) == KEY
    for bad in ("ab" * 8, "not a key!", "zz"):
        with pytest.raises(ValueError, match="must be"):
            parse_key(bad)
    with pytest.raises(ValueError, match="at least 16 bytes"):
        TokenSigner(b"short")
