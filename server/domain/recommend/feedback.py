"""Learning from use: which recorded recommendation a later generation answers, and what
it says about each recommended LoRA (accepted: it was used; skipped: it was not).

Derived from events already recorded (a recommendation's `Made`, a generation's LoRAs), by
the projector, off the request path. The rule (docs/decisions.md, "Acceptance"): a generation
that used LoRAs answers the newest recommendation made for the same principal in the
`LINK_WINDOW` before it was submitted, not answered yet, that either recommended one of the
LoRAs it used or whose prompt's content words are at least `PROMPT_MATCH` in the
generation's prompt. A recommendation is answered once: later generations are plain history."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta

from server.domain.recommend.prompt import content_terms, parse_prompt

LINK_WINDOW = timedelta(minutes=30)
PROMPT_MATCH = 0.5
# Recommendations of one principal the projector looks back over (newest first).
MAX_CANDIDATES = 20


@dataclass(frozen=True, slots=True)
class MadeRecommendation:
    """A recorded recommendation as linking needs it."""

    recommendation_id: str
    principal: str
    prompt: str
    lora_ids: tuple[str, ...]
    made_at: datetime


@dataclass(frozen=True, slots=True)
class UsedLoras:
    """A finished generation that used LoRAs: whose, which prompt, when submitted."""

    principal: str
    prompt: str
    lora_ids: tuple[str, ...]
    submitted_at: datetime


@dataclass(frozen=True, slots=True)
class Feedback:
    """What one answered recommendation taught: the prompt it was asked for, the LoRAs the
    generation used (accepted) and those it did not (skipped). `position` is the event that
    answered it (the generation's history record)."""

    position: int
    recommendation_id: str
    prompt: str
    accepted: tuple[str, ...]
    skipped: tuple[str, ...]


def prompt_terms(prompt: str) -> frozenset[str]:
    """A prompt's content words, `<lora:...>` tags and weights aside."""
    return frozenset(content_terms(parse_prompt(prompt).text))


def answers(generation: UsedLoras, recommendation: MadeRecommendation) -> bool:
    """Whether `generation` may answer `recommendation` (principal, time, LoRAs or prompt)."""
    if recommendation.principal != generation.principal:
        return False
    elapsed = generation.submitted_at - recommendation.made_at
    if elapsed < timedelta(0) or elapsed > LINK_WINDOW:
        return False
    if set(recommendation.lora_ids) & set(generation.lora_ids):
        return True
    asked = prompt_terms(recommendation.prompt)
    if not asked:
        return False
    return len(asked & prompt_terms(generation.prompt)) / len(asked) >= PROMPT_MATCH


def link(
    position: int,
    generation: UsedLoras,
    newest_first: Iterable[MadeRecommendation],
    answered: set[str] | frozenset[str] = frozenset(),
) -> Feedback | None:
    """The feedback of the first recommendation (newest first) `generation` answers, or None
    when it answers none (a plain generation). A recommendation of nothing teaches nothing."""
    for rec in newest_first:
        if rec.recommendation_id in answered or not rec.lora_ids:
            continue
        if answers(generation, rec):
            used = set(generation.lora_ids)
            return Feedback(
                position,
                rec.recommendation_id,
                rec.prompt,
                tuple(i for i in rec.lora_ids if i in used),
                tuple(i for i in rec.lora_ids if i not in used),
            )
    return None
