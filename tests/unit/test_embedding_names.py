"""How a prompt names a textual-inversion embedding: its file name as a whole word, case aside
(A1111 matches CLIP tokens, which are lowercased)."""

from __future__ import annotations

import pytest

from server.domain.embeddings import named_in, substitute

NAMES = ["EasyNegative", "bad-hands-5", "bad"]


@pytest.mark.parametrize(
    ("prompt", "named"),
    [
        ("EasyNegative, blurry", {"EasyNegative"}),
        ("(easynegative:1.2), lowres", {"EasyNegative"}),  # case aside, inside emphasis
        ("EasyNegatives", set()),  # inside a longer word: not a match
        ("myEasyNegative", set()),
        ("bad-hands-5, bad anatomy", {"bad-hands-5", "bad"}),
        ("bad-hands-50", {"bad"}),  # the longer name does not fit; "bad" does
        ("", set()),
    ],
)
def test_names_in_a_prompt(prompt: str, named: set[str]) -> None:
    assert named_in(prompt, NAMES) == named


def test_substitution_replaces_each_mention_longest_name_first() -> None:
    replaced = substitute(
        "bad-hands-5, Bad anatomy, (EASYNEGATIVE:1.2)",
        {"bad-hands-5": "<h> <h>_1", "bad": "<b>", "EasyNegative": "<e>"},
    )
    assert replaced == "<h> <h>_1, <b> anatomy, (<e>:1.2)"
    assert substitute("no names here", {}) == "no names here"
