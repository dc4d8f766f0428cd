"""Real prompts carry A1111 syntax and boilerplate; matching needs the words underneath."""

from __future__ import annotations

import re
from dataclasses import dataclass

_LORA_TAG = re.compile(
    r"<\s*(lora|lyco|hypernet)\s*:\s*([^:>]+?)\s*(?::\s*([-+]?\d*\.?\d+))?"
    r"(?::[^>]*)?>",
    re.IGNORECASE,
)
_EMPHASIS_WEIGHT = re.compile(r":\s*[-+]?\d*\.?\d+\s*(?=\))")
_BREAK = re.compile(r"\bBREAK\b")
_ESCAPED = re.compile(r"\\([()\[\]])")
_TOKEN = re.compile(r"[^\W_]+(?:['\u2019][^\W_]+)?", re.UNICODE)

# Quality and rendering boilerplate that says nothing about which LoRA fits. IDF alone does
# not demote them: LoRA descriptions are full of them too.
GENERIC_TERMS = frozenset(
    [
        "masterpiece",
        "best",
        "quality",
        "high",
        "highest",
        "ultra",
        "super",
        "extremely",
        "very",
        "detailed",
        "detail",
        "details",
        "intricate",
        "8k",
        "4k",
        "2k",
        "uhd",
        "hd",
        "hdr",
        "highres",
        "absurdres",
        "incredibly",
        "absurdres",
        "resolution",
        "res",
        "quality",
        "official",
        "wallpaper",
        "unity",
        "cg",
        "illustration",
        "beautiful",
        "amazing",
        "perfect",
        "sharp",
        "focus",
        "realistic",
        "photorealistic",
        "photo",
        "raw",
        "dslr",
        "film",
        "grain",
        "award",
        "winning",
        "trending",
        "artstation",
        "pixiv",
        "lowres",
        "bad",
        "worst",
        "low",
        "normal",
        "jpeg",
        "artifacts",
    ]
)

STOP_WORDS = frozenset(
    [
        "a",
        "an",
        "and",
        "are",
        "as",
        "at",
        "be",
        "but",
        "by",
        "for",
        "from",
        "has",
        "have",
        "in",
        "into",
        "is",
        "it",
        "its",
        "of",
        "on",
        "or",
        "that",
        "the",
        "their",
        "this",
        "to",
        "was",
        "were",
        "will",
        "with",
        "without",
        "very",
        "more",
        "most",
        "some",
        "any",
        "no",
        "not",
    ]
)


@dataclass(frozen=True, slots=True)
class LoraTag:
    name: str
    weight: float | None


@dataclass(frozen=True, slots=True)
class ParsedPrompt:
    text: str  # the prompt with A1111 syntax removed, lower-case
    lora_tags: tuple[LoraTag, ...]
    terms: tuple[str, ...]  # content tokens in order (no stop words, no boilerplate)


def parse_prompt(prompt: str) -> ParsedPrompt:
    tags = tuple(
        LoraTag(m.group(2).strip(), float(m.group(3)) if m.group(3) else None)
        for m in _LORA_TAG.finditer(prompt)
        if m.group(1).lower() in ("lora", "lyco")
    )
    text = _LORA_TAG.sub(" ", prompt)
    text = _ESCAPED.sub(r"\1", text)
    text = _EMPHASIS_WEIGHT.sub("", text)
    text = _BREAK.sub(",", text)
    text = re.sub(r"[()\[\]{}]", " ", text).lower()
    return ParsedPrompt(" ".join(text.split()), tags, content_terms(text))


def tokens(text: str) -> list[str]:
    """Lower-case word tokens; `snake_case` and `kebab-case` split into their words."""
    return _TOKEN.findall(text.lower())


def content_terms(text: str) -> tuple[str, ...]:
    return tuple(t for t in tokens(text) if t not in STOP_WORDS and t not in GENERIC_TERMS)


def phrases(text: str) -> list[str]:
    """Comma-separated prompt phrases, normalised: how users write tags and trigger words."""
    out = []
    for part in re.split(r"[,\n|]", text.lower()):
        words = tokens(part)
        if words:
            out.append(" ".join(words))
    return out
