"""A1111's emphasis syntax, read as A1111 reads it. The expected values are what A1111's own
`parse_prompt_attention` returns for each prompt (its doctests first, then prompts of the
forms Civitai prompts use); a BREAK is shown as ("BREAK", -1) as A1111 shows it."""

from __future__ import annotations

import pytest

from server.domain.emphasis import Fragment, parse_emphasis, plain_text

A1111 = [
    # A1111's doctests
    ("normal text", [("normal text", 1.0)]),
    ("an (important) word", [("an ", 1.0), ("important", 1.1), (" word", 1.0)]),
    ("(unbalanced", [("unbalanced", 1.1)]),
    ("\\(literal\\]", [("(literal]", 1.0)]),
    ("(unnecessary)(parens)", [("unnecessaryparens", 1.1)]),
    (
        "a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).",
        [
            ("a ", 1.0),
            ("house", 1.5730000000000004),
            (" ", 1.1),
            ("on", 1.0),
            (" a ", 1.1),
            ("hill", 0.55),
            (", sun, ", 1.1),
            ("sky", 1.4641000000000006),
            (".", 1.1),
        ],
    ),
    # Forms real prompts use
    (
        "masterpiece, best quality, (ultra detailed:1.2), 1girl, solo",
        [("masterpiece, best quality, ", 1.0), ("ultra detailed", 1.2), (", 1girl, solo", 1.0)],
    ),
    (
        "((masterpiece)), [[blurry]], (red hair:0.8), <lora:fox_v2:0.7>",
        [
            ("masterpiece", 1.2100000000000002),
            (", ", 1.0),
            ("blurry", 0.8264462809917354),
            (", ", 1.0),
            ("red hair", 0.8),
            (", <lora:fox_v2:0.7>", 1.0),
        ],
    ),
    (
        "portrait of a knight, (dramatic lighting), [soft] BREAK forest background",
        [
            ("portrait of a knight, ", 1.0),
            ("dramatic lighting", 1.1),
            (", ", 1.0),
            ("soft", 0.9090909090909091),
            ("", 1.0),
            ("BREAK", -1),
            ("forest background", 1.0),
        ],
    ),
    ("a BREAK b BREAK c", [("a", 1.0), ("BREAK", -1), ("b", 1.0), ("BREAK", -1), ("c", 1.0)]),
    # Inside brackets BREAK is multiplied like any fragment, and is then the word.
    ("(a BREAK b)", [("a", 1.1), ("BREAK", -1.1), ("b", 1.1)]),
    (
        "\\(1990s\\) anime style, (text \\(with parens\\):1.1)",
        [("(1990s) anime style, ", 1.0), ("text (with parens)", 1.1)],
    ),
    ("cat \\ dog", [("cat  dog", 1.0)]),  # a lone backslash disappears
    (
        "[cat:dog:0.5], [red|blue] flowers",
        [
            ("cat:dog:0.5", 0.9090909090909091),
            (", ", 1.0),
            ("red|blue", 0.9090909090909091),
            (" flowers", 1.0),
        ],
    ),
    ("(word: 1.3)", [("word: 1.3", 1.1)]),
    ("(unclosed [square", [("unclosed ", 1.1), ("square", 1.0)]),
    ("):1.2) stray ] close", [("):1.2) stray ] close", 1.0)]),
    (
        "(nested (deep (deeper:1.5)))",
        [("nested ", 1.1), ("deep ", 1.2100000000000002), ("deeper", 1.8150000000000004)],
    ),
    ("(-negative:-0.5)", [("-negative", -0.5)]),
    ("", [("", 1.0)]),
]


def _as_a1111(fragments: list[Fragment]) -> list[tuple[str, float]]:
    return [("BREAK", -1) if f.brk else (f.text, f.weight) for f in fragments]


@pytest.mark.parametrize(("prompt", "expected"), A1111, ids=[p or "empty" for p, _ in A1111])
def test_prompts_parse_as_a1111_parses_them(prompt: str, expected: list[tuple[str, float]]) -> None:
    assert _as_a1111(parse_emphasis(prompt)) == expected


def test_a_malformed_weight_is_ignored_rather_than_an_error() -> None:
    # A1111 raises on float("1.2.3"); a request must not fail on it.
    assert _as_a1111(parse_emphasis("(fox:1.2.3)")) == [("fox", 1.0)]


@pytest.mark.parametrize(
    ("prompt", "expected"),
    [
        ("a red fox, snow at dusk: 16:9", "a red fox, snow at dusk: 16:9"),
        ("a (fox:1.3) in [snow]", "a fox in snow"),
        ("((masterpiece)), \\(literal\\)", "masterpiece, (literal)"),
        ("a fox BREAK snow", "a fox snow"),
        ("", ""),
    ],
)
def test_plain_text_drops_the_syntax_and_keeps_the_words(prompt: str, expected: str) -> None:
    assert plain_text(prompt) == expected
