"""Recommends LoRAs for a prompt: lexical retrieval over the catalog's fields, then a
re-ranker whose output is a calibrated probability that the LoRA fits the prompt."""

from __future__ import annotations

import math
import threading
from collections import defaultdict, deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

from server.domain.models import Architecture, LoraView
from server.domain.recommend.index import FloatArray, LexicalIndex
from server.domain.recommend.prompt import (
    GENERIC_TERMS,
    STOP_WORDS,
    ParsedPrompt,
    content_terms,
    parse_prompt,
    tokens,
)
from server.domain.recommend.ranker import FEATURES, Ranker

FIELDS = ("all", "name", "file", "trigger", "tags", "description", "training", "history")
# Retrieval: one BM25 over all catalog text (per-field sums over-reward short fields such as
# names), past generations, and matched trigger phrases. The re-ranker sees every field.
FIRST_STAGE_WEIGHTS = {"all": 1.0, "history": 0.5}
TRIGGER_BOOST = 2.0
# Training captions count through "all"; the Civitai data the ranker is fitted on has none.
RANKED_FIELDS = tuple(f for f in FIELDS if f != "training")
CANDIDATES = 100
DEFAULT_WEIGHT = 0.8
MAX_DESCRIPTION_TERMS = 300
MAX_HISTORY_TERMS = 3000
# Learning from use (feedback.py): an accepted recommendation's prompt joins the history of
# the LoRA used, on top of the generation's own prompt (so an accepted generation counts as
# two prompts, a plain one as one; repeating the same words instead scores lower, BM25's
# length normalisation outweighing the term frequency). A skipped LoRA's confidence for
# prompts near the ones it was skipped for is lowered by at most SKIP_PENALTY, reached after
# SKIPS_FOR_FULL_PENALTY skips there. A LoRA keeps its last MAX_SKIPS skipped prompts
# (MAX_SKIP_TERMS words each); an acceptance clears those it covers.
SKIP_PENALTY = 0.3
SKIPS_FOR_FULL_PENALTY = 3
# A skip is cleared by an acceptance of the same LoRA whose prompt holds this share of it.
PROMPT_NEAR = 0.5
MAX_SKIPS = 32
MAX_SKIP_TERMS = 40
# A LoRA's kind, for the ranker: its first Civitai tag among these (catalog text only).
LORA_TYPES = ("style", "character", "celebrity", "clothing", "concept")
# Fields whose scores the ranker also sees relative to the best candidate of the query.
RELATIVE_FIELDS = ("name", "tags", "description", "history")


@dataclass(frozen=True, slots=True)
class Scored:
    lora: LoraView
    confidence: float
    weight: float
    trigger_words: tuple[str, ...]
    reasons: tuple[str, ...]
    score: float = 0.0


@dataclass
class _Doc:
    view: LoraView
    triggers: tuple[tuple[str, ...], ...]
    name_terms: frozenset[str]
    concept: frozenset[str]
    tag_terms: frozenset[str]
    kind: int  # index into LORA_TYPES, -1 for none of them
    history: list[str] = field(default_factory=list)


def lora_type(tags: Sequence[str]) -> int:
    """Index in LORA_TYPES of the first tag that names a kind, -1 when none does."""
    for tag in tags:
        kind = tag.strip().casefold()
        if kind in LORA_TYPES:
            return LORA_TYPES.index(kind)
    return -1


class RecommendationEngine:
    """Holds the catalog's searchable form; thread-safe, updated one LoRA at a time."""

    def __init__(
        self, ranker: Ranker | None = None, *, default_weight: float = DEFAULT_WEIGHT
    ) -> None:
        self.ranker = ranker or Ranker.default()
        self.default_weight = default_weight
        self.index = LexicalIndex(FIELDS)
        self._lock = threading.RLock()
        self._slot_of: dict[str, int] = {}
        self._docs: dict[int, _Doc] = {}
        self._free: list[int] = []
        self._next = 0
        self._arch = np.zeros(1024, dtype=np.int16)
        self._available = np.zeros(1024, dtype=bool)
        self._alive = np.zeros(1024, dtype=bool)
        self._downloads = np.zeros(1024)
        # trigger phrase -> slots; first token -> (phrase, slot) for scanning prompts
        self._trigger_docs: dict[tuple[str, ...], set[int]] = defaultdict(set)
        self._by_first: dict[str, dict[tuple[str, ...], set[int]]] = defaultdict(dict)
        self._by_file_name: dict[str, set[int]] = defaultdict(set)
        self._pending_history: dict[str, list[list[str]]] = defaultdict(list)
        # lora id -> content words of the prompts it was recently skipped for
        self._skips: dict[str, deque[frozenset[str]]] = {}

    # -- maintenance ---------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self._docs)

    def upsert(self, view: LoraView) -> None:
        with self._lock:
            slot = self._slot_of.get(view.id)
            history: list[str] = []
            if slot is not None:
                history = self._docs[slot].history
                self._forget(slot)
            else:
                slot = self._free.pop() if self._free else self._take_slot()
                self._slot_of[view.id] = slot
            for past in self._pending_history.pop(view.id, []):
                history.extend(past)
            self._remember(slot, view, history[-MAX_HISTORY_TERMS:])

    def remove(self, lora_id: str) -> None:
        with self._lock:
            slot = self._slot_of.pop(lora_id, None)
            if slot is None:
                return
            self._forget(slot)
            self._skips.pop(lora_id, None)
            self.index.delete(slot)
            del self._docs[slot]
            self._alive[slot] = False
            self._free.append(slot)

    def record_generation(self, prompt: str, lora_ids: Iterable[str]) -> None:
        """What users generated is the strongest signal: a prompt joins the history field of
        each LoRA it used, so similar prompts find those LoRAs later."""
        terms = list(content_terms(parse_prompt(prompt).text))
        if not terms:
            return
        with self._lock:
            self._add_history(terms, lora_ids)

    def record_feedback(self, prompt: str, accepted: Iterable[str], skipped: Iterable[str]) -> None:
        """An answered recommendation (feedback.py): the prompt it was asked for joins the
        history of each accepted LoRA (whose generation's own prompt arrives as plain history
        too: an accepted generation counts twice) and clears skips of that LoRA it covers;
        each skipped LoRA remembers the prompt as a mild negative for prompts near it."""
        terms = list(content_terms(parse_prompt(prompt).text))
        if not terms:
            return
        asked = frozenset(terms[:MAX_SKIP_TERMS])
        with self._lock:
            used = list(accepted)
            self._add_history(terms, used)
            for lora_id in used:
                kept = [
                    s for s in self._skips.get(lora_id, ()) if len(s & asked) < PROMPT_NEAR * len(s)
                ]
                if kept:
                    self._skips[lora_id] = deque(kept, maxlen=MAX_SKIPS)
                else:
                    self._skips.pop(lora_id, None)
            for lora_id in skipped:
                if lora_id in self._slot_of:
                    self._skips.setdefault(lora_id, deque(maxlen=MAX_SKIPS)).append(asked)

    def _add_history(self, terms: list[str], lora_ids: Iterable[str]) -> None:
        for lora_id in lora_ids:
            slot = self._slot_of.get(lora_id)
            if slot is None:
                self._pending_history[lora_id].append(terms)
                continue
            doc = self._docs[slot]
            doc.history = (doc.history + terms)[-MAX_HISTORY_TERMS:]
            self.index.put(slot, self._fields(doc.view, doc.history))

    # -- queries ---------------------------------------------------------------------------

    def recommend(
        self,
        prompt: str,
        architecture: Architecture,
        *,
        max_loras: int = 3,
        min_confidence: float | None = None,
        include_unavailable: bool = False,
        diversify: bool = True,
    ) -> list[Scored]:
        parsed = parse_prompt(prompt)
        with self._lock:
            explicit = self._explicit(parsed, architecture, include_unavailable)
            ranked = self._rank(
                parsed,
                architecture,
                include_unavailable,
                exclude={s.lora.id for s in explicit},
                limit=4 * max_loras + 10,
            )
        chosen = list(explicit)
        skipped: dict[int, list[str]] = defaultdict(list)
        for candidate in ranked:
            if len(chosen) >= max_loras:
                break
            if min_confidence is not None and candidate.confidence < min_confidence:
                break
            twin = self._near_duplicate(candidate, chosen) if diversify else None
            if twin is not None:
                skipped[twin].append(candidate.lora.name)
                continue
            chosen.append(candidate)
        out = []
        for i, rec in enumerate(chosen):
            if skipped.get(i):
                note = "skipped near-duplicates: " + ", ".join(skipped[i][:3])
                rec = Scored(
                    rec.lora,
                    rec.confidence,
                    rec.weight,
                    rec.trigger_words,
                    (*rec.reasons, note),
                    rec.score,
                )
            out.append(rec)
        return out

    def search(
        self,
        query: str,
        architecture: Architecture | None,
        *,
        limit: int,
        include_unavailable: bool = True,
    ) -> list[Scored]:
        parsed = parse_prompt(query)
        with self._lock:
            return self._rank(parsed, architecture, include_unavailable, exclude=set(), limit=limit)

    # -- internals ---------------------------------------------------------------------------

    def _take_slot(self) -> int:
        slot = self._next
        self._next += 1
        if slot >= len(self._arch):
            size = len(self._arch) * 2
            self._arch = np.resize(self._arch, size)
            self._available = np.resize(self._available, size)
            self._alive = np.resize(self._alive, size)
            self._downloads = np.resize(self._downloads, size)
            self._arch[slot:] = 0
            self._available[slot:] = False
            self._alive[slot:] = False
            self._downloads[slot:] = 0
        return slot

    def _fields(self, view: LoraView, history: list[str]) -> dict[str, list[str]]:
        m = view.metadata
        training: list[str] = []
        for tag, count in m.training_tags[:100]:
            training.extend(tokens(tag) * min(3, 1 + int(math.log10(max(count, 1)))))
        fields = {
            "name": tokens(m.name),
            "file": tokens(m.file_name),
            "trigger": [t for w in m.trigger_words for t in tokens(w)],
            "tags": [t for tag in m.tags for t in tokens(tag)],
            "description": list(content_terms(m.description))[:MAX_DESCRIPTION_TERMS],
            "training": training,
            "history": history,
        }
        # Past prompts join the catalog text too: a LoRA is described by how it is used.
        fields["all"] = [
            t
            for f in ("name", "file", "trigger", "tags", "description", "training", "history")
            for t in fields[f]
        ]
        return fields

    def _remember(self, slot: int, view: LoraView, history: list[str]) -> None:
        m = view.metadata
        triggers = tuple(
            phrase
            for w in m.trigger_words
            for part in w.split(",")
            if (phrase := tuple(tokens(part)))
        )
        name_terms = frozenset(tokens(m.name)) | frozenset(tokens(m.file_name))
        concept = frozenset(triggers) if triggers else frozenset({tuple(sorted(name_terms))})
        self._docs[slot] = _Doc(
            view,
            triggers,
            name_terms,
            frozenset(t for p in concept for t in p),
            frozenset(content_terms(" ".join(m.tags))),
            lora_type(m.tags),
            history,
        )
        self.index.put(slot, self._fields(view, history))
        self._arch[slot] = _ARCH_CODE[m.base_model.architecture]
        self._available[slot] = view.available
        self._alive[slot] = True
        self._downloads[slot] = m.downloads
        for phrase in triggers:
            self._trigger_docs[phrase].add(slot)
            self._by_first[phrase[0]].setdefault(phrase, set()).add(slot)
        if m.file_name:
            self._by_file_name[m.file_name.casefold()].add(slot)
        self._by_file_name[m.name.casefold()].add(slot)

    def _forget(self, slot: int) -> None:
        doc = self._docs.get(slot)
        if doc is None:
            return
        for phrase in doc.triggers:
            self._trigger_docs[phrase].discard(slot)
            if not self._trigger_docs[phrase]:
                del self._trigger_docs[phrase]
            slots = self._by_first[phrase[0]].get(phrase)
            if slots is not None:
                slots.discard(slot)
                if not slots:
                    del self._by_first[phrase[0]][phrase]
        m = doc.view.metadata
        for key in (m.file_name.casefold(), m.name.casefold()):
            self._by_file_name.get(key, set()).discard(slot)

    def _mask(self, architecture: Architecture | None, include_unavailable: bool) -> np.ndarray:
        n = self._next
        mask = self._alive[:n].copy()
        if architecture is not None:
            mask &= self._arch[:n] == _ARCH_CODE[architecture]
        if not include_unavailable:
            mask &= self._available[:n]
        return mask

    def _explicit(
        self, parsed: ParsedPrompt, architecture: Architecture, include_unavailable: bool
    ) -> list[Scored]:
        out = []
        for tag in parsed.lora_tags:
            for slot in sorted(self._by_file_name.get(tag.name.casefold(), ())):
                doc = self._docs[slot]
                if doc.view.metadata.base_model.architecture != architecture:
                    continue
                if not (doc.view.available or include_unavailable):
                    continue
                weight = tag.weight if tag.weight is not None else self._weight(doc.view)
                out.append(
                    Scored(
                        doc.view,
                        1.0,
                        weight,
                        doc.view.metadata.trigger_words,
                        (f"explicitly chosen with <lora:{tag.name}>",),
                        math.inf,
                    )
                )
                break
        return out

    def _concept(self, lora_id: str) -> frozenset[str]:
        slot = self._slot_of.get(lora_id)
        return frozenset() if slot is None else self._docs[slot].concept

    def _near_duplicate(self, candidate: Scored, chosen: list[Scored]) -> int | None:
        """Index of an already chosen recommendation of the same concept (mostly the same
        trigger words or, without triggers, name words), else None."""
        concept = self._concept(candidate.lora.id)
        if not concept:
            return None
        for i, other in enumerate(chosen):
            other_concept = self._concept(other.lora.id)
            if other_concept and len(concept & other_concept) / len(concept | other_concept) >= 0.6:
                return i
        return None

    def _weight(self, view: LoraView) -> float:
        w = view.metadata.preferred_weight
        return self.default_weight if w is None else w

    def _trigger_matches(self, prompt_tokens: Sequence[str]) -> dict[tuple[str, ...], set[int]]:
        """Trigger phrases that occur in the prompt, with the LoRAs that have them."""
        found: dict[tuple[str, ...], set[int]] = {}
        for i, token in enumerate(prompt_tokens):
            for phrase, slots in self._by_first.get(token, {}).items():
                if phrase not in found and tuple(prompt_tokens[i : i + len(phrase)]) == phrase:
                    found[phrase] = slots
        return found

    def candidate_features(
        self, prompt: str, architecture: Architecture | None, include_unavailable: bool
    ) -> tuple[list[str], FloatArray]:
        """Candidate ids (best first-stage score first) and their feature rows, for fitting
        the ranker offline."""
        with self._lock:
            found = self._candidates(
                parse_prompt(prompt), architecture, include_unavailable, exclude=set()
            )
            if found is None:
                return [], np.zeros((0, len(FEATURES)))
            return [self._docs[int(s)].view.id for s in found.slots], found.matrix

    def _candidates(
        self,
        parsed: ParsedPrompt,
        architecture: Architecture | None,
        include_unavailable: bool,
        exclude: set[str],
    ) -> _Candidates | None:
        n = self._next
        if n == 0 or not self._docs:
            return None
        prompt_tokens = tokens(parsed.text)
        terms = list(parsed.terms)
        mask = self._mask(architecture, include_unavailable)
        for lora_id in exclude:
            slot = self._slot_of.get(lora_id)
            if slot is not None:
                mask[slot] = False
        coverage = np.zeros(self.index.capacity())
        per_field = {
            f: self.index.field_scores(f, terms, coverage if f == "all" else None)[:n]
            for f in FIELDS
        }
        first = np.zeros(n)
        for f, w in FIRST_STAGE_WEIGHTS.items():
            first += w * per_field[f]
        triggers = self._trigger_matches(prompt_tokens)
        trigger_idf = np.zeros(n)
        specificity = np.zeros(n)
        for phrase, slots in triggers.items():
            idx = np.fromiter(slots, dtype=np.int64, count=len(slots))
            trigger_idf[idx] = np.maximum(trigger_idf[idx], self._phrase_idf(phrase))
            specificity[idx] = np.maximum(specificity[idx], self._specificity(phrase))
        first += TRIGGER_BOOST * trigger_idf
        first = np.where(mask, first, -np.inf)
        k = min(CANDIDATES, int(np.count_nonzero(first > 0)))
        if k == 0:
            return None
        top = np.argpartition(-first, k - 1)[:k]
        top = top[np.argsort(-first[top], kind="stable")]
        best = float(first[top[0]])
        prompt_set = frozenset(prompt_tokens)
        per_doc = np.zeros((k, 4))
        kinds = np.zeros((k, len(LORA_TYPES)))
        for row, slot in enumerate(top.tolist()):
            doc = self._docs[slot]
            if doc.triggers:
                own = set(doc.triggers)
                per_doc[row, 0] = len(own.intersection(triggers)) / len(own)
                per_doc[row, 1] = 1.0
            if doc.name_terms:
                per_doc[row, 2] = len(doc.name_terms & prompt_set) / len(doc.name_terms)
            if doc.tag_terms:
                per_doc[row, 3] = len(doc.tag_terms & prompt_set) / len(doc.tag_terms)
            if doc.kind >= 0:
                kinds[row, doc.kind] = 1.0
        columns = [np.log1p(per_field[f][top]) for f in RANKED_FIELDS]
        columns += [
            trigger_idf[top],
            per_doc[:, 0],
            per_doc[:, 1],
            per_doc[:, 2],
            np.log1p(self._downloads[top]) / 10.0,
            first[top] / best if best > 0 else np.zeros(k),
            1.0 / np.arange(1, k + 1),
            # Query-level context: the same for every candidate, it lets the model tell a
            # prompt with strong evidence (history, triggers) from a vague one.
            np.full(k, math.log1p(float(per_field["history"][top].max()))),
            np.full(k, min(len(triggers), 5) / 5.0),
            # Signals that do not depend on trigger words.
            specificity[top],
            np.full(k, float(specificity[top].max())),
            per_doc[:, 3],
            coverage[top],
            *(_relative(per_field[f][top]) for f in RELATIVE_FIELDS),
            np.log1p(self.index.field_length("all")[top]) / 10.0,
            *kinds.T,
            np.full(k, math.log1p(len(terms)) / 5.0),
            np.full(k, math.log1p(best) / 5.0),
        ]
        return _Candidates(top, np.column_stack(columns), triggers, per_field, first)

    def _rank(
        self,
        parsed: ParsedPrompt,
        architecture: Architecture | None,
        include_unavailable: bool,
        exclude: set[str],
        limit: int = CANDIDATES,
    ) -> list[Scored]:
        found = self._candidates(parsed, architecture, include_unavailable, exclude)
        if found is None:
            return []
        probabilities = self.ranker.predict(found.matrix)
        if self._skips:
            probabilities = probabilities * self._skip_factors(parsed, found.slots)
        order = sorted(
            range(len(found.slots)),
            key=lambda r: (
                -probabilities[r],
                -found.first[found.slots[r]],
                self._docs[int(found.slots[r])].view.id,
            ),
        )
        scored = []
        for row in order[:limit]:
            slot = int(found.slots[row])
            view = self._docs[slot].view
            scored.append(
                Scored(
                    view,
                    float(probabilities[row]),
                    self._weight(view),
                    view.metadata.trigger_words,
                    _reasons(found, row, slot),
                    float(found.first[slot]),
                )
            )
        return scored

    def _skip_factors(self, parsed: ParsedPrompt, slots: npt.NDArray[np.int64]) -> FloatArray:
        """1 for a candidate never skipped near this prompt, down to 1 - SKIP_PENALTY for one
        skipped SKIPS_FOR_FULL_PENALTY times for prompts holding all of its words. Each word
        counts by its IDF, so shared boilerplate (`masterpiece`) says little."""
        factors = np.ones(len(slots))
        terms = set(parsed.terms)
        if not terms:
            return factors
        n = len(self._docs)
        idf = {t: math.log1p(n / (1 + self.index.document_frequency("all", t))) for t in terms}
        total = sum(idf.values())
        if total <= 0:
            return factors
        for row, slot in enumerate(slots.tolist()):
            skips = self._skips.get(self._docs[slot].view.id)
            if not skips:
                continue
            near = sum(
                w * min(SKIPS_FOR_FULL_PENALTY, sum(t in s for s in skips)) for t, w in idf.items()
            )
            factors[row] = 1.0 - SKIP_PENALTY * near / (SKIPS_FOR_FULL_PENALTY * total)
        return factors

    def _phrase_idf(self, phrase: tuple[str, ...]) -> float:
        df = len(self._trigger_docs.get(phrase, ()))
        return math.log1p(len(self._docs) / (1 + df))

    def _specificity(self, phrase: tuple[str, ...]) -> float:
        """How surely a trigger phrase in a prompt points at its LoRAs: low when many LoRAs
        share it or when its rarest word is common in catalog text (`eyes`, `long hair`),
        zero for boilerplate. An IDF over the largest possible one, so a phrase unique to one
        LoRA scores alike in a catalog of ten and of 100,000. The ranker picks its model by
        the best one in the prompt."""
        if all(t in GENERIC_TERMS or t in STOP_WORDS for t in phrase):
            return 0.0
        n = len(self._docs)
        df = min(self.index.document_frequency("all", t) for t in phrase)
        idf = min(self._phrase_idf(phrase), math.log1p(n / (1 + df)))
        return idf / math.log1p(n) if n > 0 else 0.0


@dataclass(frozen=True, slots=True)
class _Candidates:
    slots: npt.NDArray[np.int64]
    matrix: FloatArray  # one row of FEATURES per slot, best first-stage score first
    triggers: dict[tuple[str, ...], set[int]]
    per_field: dict[str, FloatArray]
    first: FloatArray


def _relative(scores: FloatArray) -> FloatArray:
    best = float(scores.max())
    return scores / best if best > 0 else np.zeros(len(scores))


_FIELD_LABELS = {
    "name": "name",
    "file": "file name",
    "tags": "tags",
    "description": "description",
    "training": "training captions",
    "history": "past generations",
}
_NAME_COVERAGE = FEATURES.index("name_coverage")


def _reasons(found: _Candidates, row: int, slot: int) -> tuple[str, ...]:
    out = []
    matched = sorted(" ".join(p) for p, slots in found.triggers.items() if slot in slots)
    if matched:
        out.append("trigger words in prompt: " + ", ".join(matched))
    strong = sorted(
        (
            (float(found.per_field[f][slot]), label)
            for f, label in _FIELD_LABELS.items()
            if found.per_field[f][slot] > 0
        ),
        reverse=True,
    )
    if strong:
        out.append("matched " + ", ".join(label for _, label in strong[:3]))
    if found.matrix[row, _NAME_COVERAGE] >= 0.5:
        out.append("prompt names the LoRA")
    return tuple(out)


_ARCH_CODE = {arch: i for i, arch in enumerate(Architecture)}
