"""A1111's prompt emphasis syntax, read the way A1111 reads it, so a prompt pasted from A1111,
Forge or Civitai weights the same words by the same amounts here.

`(text)` multiplies the weight of `text` by 1.1, `[text]` divides it by 1.1, `(text:1.3)`
multiplies it by 1.3; they nest (`((text))` is 1.21). `\\(`, `\\)`, `\\[`, `\\]` and `\\\\`
are the literal characters. A bracket never closed applies to the end of the prompt; a
closing bracket never opened is text. `BREAK` (a whole word, upper case) ends the current
75-token chunk. A1111's quirks are kept on purpose: a lone backslash disappears, a `BREAK`
inside brackets is the word BREAK, `(text: 1.3)` (a space before the number) is text with a
1.1 weight. Prompt editing (`[a:b:0.5]`) and alternation (`[a|b]`) are not supported: they
are read as text in square brackets (weight 1/1.1), as A1111's emphasis parser alone reads
them. Pure Python: the text encoders live in infrastructure/diffusion/conditioning.py."""

from __future__ import annotations

import re
from dataclasses import dataclass

ROUND = 1.1
SQUARE = 1 / 1.1

# One lexeme at a time, longest alternatives first: escapes, brackets, an explicit weight
# closing a round bracket, runs of plain text, a stray colon.
_LEXEME = re.compile(
    r"""
    (?P<escape>\\[()\[\]\\]) |
    (?P<lone>\\) |
    (?P<open>[(\[]) |
    :(?P<weight>[+-]?[.\d]+)\) |
    (?P<close>[)\]]) |
    (?P<text>[^\\()\[\]:]+) |
    (?P<colon>:)
    """,
    re.VERBOSE,
)
_BREAK = re.compile(r"\s*\bBREAK\b\s*", re.S)


@dataclass(frozen=True, slots=True)
class Fragment:
    """A run of prompt text and its weight. `brk` marks a chunk break (its text is empty)."""

    text: str
    weight: float = 1.0
    brk: bool = False


class _Run:
    """A mutable fragment while parsing: brackets closing later multiply earlier runs."""

    __slots__ = ("brk", "text", "weight")

    def __init__(self, text: str, weight: float, brk: bool = False) -> None:
        self.text, self.weight, self.brk = text, weight, brk


def parse_emphasis(prompt: str) -> list[Fragment]:
    """The prompt as weighted fragments, adjacent equal weights merged, as A1111's
    `parse_prompt_attention` returns them (`[("", 1.0)]` for an empty prompt)."""
    runs: list[_Run] = []
    round_opened: list[int] = []
    square_opened: list[int] = []

    def scale(start: int, factor: float) -> None:
        for run in runs[start:]:
            run.weight *= factor

    for match in _LEXEME.finditer(prompt):
        kind, lexeme = match.lastgroup, match.group(0)
        if kind in ("escape", "lone"):
            runs.append(_Run(lexeme[1:], 1.0))
        elif kind == "open":
            (round_opened if lexeme == "(" else square_opened).append(len(runs))
        elif kind == "weight" and round_opened:
            scale(round_opened.pop(), float(_number(match.group("weight"))))
        elif lexeme == ")" and round_opened:
            scale(round_opened.pop(), ROUND)
        elif lexeme == "]" and square_opened:
            scale(square_opened.pop(), SQUARE)
        else:
            for i, part in enumerate(_BREAK.split(lexeme)):
                if i:
                    # A1111 marks a break with weight -1; brackets around it multiply that,
                    # and then it is no longer a break but the word.
                    runs.append(_Run("BREAK", -1.0, brk=True))
                runs.append(_Run(part, 1.0))
    for start in round_opened:
        scale(start, ROUND)
    for start in square_opened:
        scale(start, SQUARE)
    if not runs:
        return [Fragment("", 1.0)]
    merged: list[_Run] = [runs[0]]
    for run in runs[1:]:
        if run.weight == merged[-1].weight:
            merged[-1].text += run.text
        else:
            merged.append(run)
    return [
        Fragment("", 1.0, brk=True) if r.brk and r.weight == -1.0 else Fragment(r.text, r.weight)
        for r in merged
    ]


def plain_text(prompt: str) -> str:
    """The prompt's text without the syntax, for text encoders that take no per-token weights
    (Qwen-Image's and Z-Image's language models): `a (fox:1.3) BREAK snow` is `a fox snow`,
    `\\(` is `(`. A prompt without syntax comes back as it is."""
    return "".join(" " if f.brk else f.text for f in parse_emphasis(prompt))


def _number(text: str) -> float:
    """A1111 calls float() on `[+-]?[.\\d]+`, which refuses "1.2.3" with a ValueError (an
    error page); here such a weight is 1.0, the nearest thing to ignoring it."""
    try:
        return float(text)
    except ValueError:
        return 1.0
