"""Where a prompt names a textual-inversion embedding, as A1111 finds them: the embedding's
file name (without `.safetensors`) anywhere in the prompt as a whole word. A1111 matches the
name's CLIP tokens against the prompt's, and CLIP lowercases text before tokenizing, so the
match ignores case (`easynegative` is EasyNegative too); a name inside a longer word
(`EasyNegatives`) is not a match. One rule, used twice: by the application to decide which
embeddings a job needs, and by the executor to put each one's tokens where its name stands,
so the two cannot disagree. Pure: no torch."""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping


def _pattern(names: Iterable[str]) -> re.Pattern[str] | None:
    """Longest names first, so `bad-hands-5` wins over `bad` where both would match."""
    unique = sorted({n for n in names if n}, key=lambda n: (-len(n), n))
    if not unique:
        return None
    words = "|".join(re.escape(n) for n in unique)
    return re.compile(rf"(?<!\w)(?:{words})(?!\w)", re.IGNORECASE)


def named_in(text: str, names: Iterable[str]) -> set[str]:
    """The names (as given) that `text` mentions."""
    by_key = {n.casefold(): n for n in names if n}
    pattern = _pattern(by_key.values())
    if pattern is None:
        return set()
    return {by_key[m.group(0).casefold()] for m in pattern.finditer(text)}


def substitute(text: str, replacements: Mapping[str, str]) -> str:
    """`text` with each mention of a name replaced by its replacement (the embedding's
    tokens)."""
    by_key = {n.casefold(): r for n, r in replacements.items() if n}
    pattern = _pattern(replacements)
    if pattern is None:
        return text

    def replace(match: re.Match[str]) -> str:
        return by_key[match.group(0).casefold()]

    return pattern.sub(replace, text)
