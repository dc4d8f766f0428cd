"""Recommends LoRAs for a prompt: lexical retrieval over the catalog's fields, then a
re-ranker whose output is a calibrated probability that the LoRA fits the prompt."""

from __future__ import annotations

import array
import json
import math
import threading
from collections import defaultdict, deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np
import numpy.typing as npt

from server.domain.models import Architecture, LoraView
from server.domain.recommend.index import Arrays, FloatArray, LexicalIndex
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

_K = TypeVar("_K")


@dataclass(frozen=True, slots=True)
class Scored:
    lora: LoraView
    confidence: float
    weight: float
    trigger_words: tuple[str, ...]
    reasons: tuple[str, ...]
    score: float = 0.0


def lora_type(tags: Sequence[str]) -> int:
    """Index in LORA_TYPES of the first tag that names a kind, -1 when none does."""
    for tag in tags:
        kind = tag.strip().casefold()
        if kind in LORA_TYPES:
            return LORA_TYPES.index(kind)
    return -1


ViewLookup = Callable[[Sequence[str]], Mapping[str, LoraView]]
"""The catalog's current views of some LoRA ids (ids it no longer holds left out)."""

# Bump when what the engine keeps per LoRA, or how it derives it from a view, changes: a
# snapshot of another version is then rebuilt from the catalog instead of restored.
STATE_VERSION = 2  # 2: skips of answered recommendations
_STATE_SHAPE = {
    "version": STATE_VERSION,
    "fields": FIELDS,
    "max_description_terms": MAX_DESCRIPTION_TERMS,
    "max_history_terms": MAX_HISTORY_TERMS,
    "lora_types": LORA_TYPES,
}


@dataclass(frozen=True, slots=True)
class _SlotInfo:
    """What ranking needs of a candidate besides its postings (stored packed, see _pack)."""

    phrases: tuple[int, ...]  # distinct trigger phrase ids
    name_terms: frozenset[int]  # term ids of its name and file name
    tag_terms: frozenset[int]  # content term ids of its tags
    kind: int  # index into LORA_TYPES, -1 for none of them


def _pack(kind: int, phrases: Sequence[int], name: Iterable[int], tags: Iterable[int]) -> bytes:
    """One LoRA's _SlotInfo as int32s: kind, #phrases, phrases, #name terms, name terms,
    tag terms; about 60 bytes where a tuple of frozensets of strings took over a kilobyte."""
    names = sorted(name)
    values = [kind, len(phrases), *phrases, len(names), *names, *sorted(tags)]
    return array.array("i", values).tobytes()


def _unpack(data: bytes) -> _SlotInfo:
    values: list[int] = memoryview(data).cast("i").tolist()
    n = values[1]
    m = values[2 + n]
    return _SlotInfo(
        tuple(values[2 : 2 + n]),
        frozenset(values[3 + n : 3 + n + m]),
        frozenset(values[3 + n + m :]),
        values[0],
    )


@dataclass(frozen=True, slots=True)
class _Ranked:
    """A ranked candidate before its view is read."""

    lora_id: str
    confidence: float
    reasons: tuple[str, ...]
    score: float


class RecommendationEngine:
    """Holds the catalog's searchable form; thread-safe, updated one LoRA at a time.

    Per LoRA it keeps arrays and a few packed bytes, not its view: the views of the few
    LoRAs an answer returns are read through `views` (the read model in the server). Without
    `views` the engine keeps the views it is given in a dict (tests, offline evaluation).
    `state()` and `restore()` move the whole state in and out as named numpy arrays."""

    def __init__(
        self,
        ranker: Ranker | None = None,
        *,
        default_weight: float = DEFAULT_WEIGHT,
        views: ViewLookup | None = None,
    ) -> None:
        self.ranker = ranker or Ranker.default()
        self.default_weight = default_weight
        self._own_views: dict[str, LoraView] | None = {} if views is None else None
        self._views = views
        self._lock = threading.RLock()
        self._reset()

    def _reset(self) -> None:
        self.index = LexicalIndex(FIELDS)
        self._slot_of: dict[str, int] = {}
        self._ids: list[str | None] = []  # per slot
        self._info: list[bytes | None] = []  # per slot, see _pack
        self._keys: list[tuple[str, ...] | None] = []  # per slot: its _by_file_name keys
        self._history: dict[int, npt.NDArray[np.int32]] = {}  # slot -> past prompts' term ids
        self._free: list[int] = []
        self._next = 0
        self._arch = np.zeros(1024, dtype=np.int16)
        self._available = np.zeros(1024, dtype=bool)
        self._alive = np.zeros(1024, dtype=bool)
        self._downloads = np.zeros(1024)
        # trigger phrase id -> slots; first token -> phrase ids, for scanning prompts
        self._phrases: dict[tuple[str, ...], int] = {}
        self._phrase_terms: list[tuple[str, ...]] = []
        self._trigger_docs: dict[int, list[int]] = {}
        self._by_first: dict[str, set[int]] = {}
        self._by_file_name: dict[str, list[int]] = {}
        self._pending_history: dict[str, list[list[str]]] = defaultdict(list)
        # lora id -> content words of the prompts it was recently skipped for
        self._skips: dict[str, deque[frozenset[str]]] = {}

    # -- maintenance ---------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self._slot_of)

    def clear(self) -> None:
        """Forgets every LoRA (before indexing the catalog again)."""
        with self._lock:
            if self._own_views is not None:
                self._own_views.clear()
            self._reset()

    def upsert(self, view: LoraView) -> None:
        with self._lock:
            if self._own_views is not None:
                self._own_views[view.id] = view
            slot = self._slot_of.get(view.id)
            history: list[str] = []
            if slot is not None:
                history = self._history_terms(slot)
                self._forget(slot)
            else:
                slot = self._free.pop() if self._free else self._take_slot()
                self._slot_of[view.id] = slot
            for past in self._pending_history.pop(view.id, []):
                history.extend(past)
            self._remember(slot, view, history[-MAX_HISTORY_TERMS:])

    def remove(self, lora_id: str) -> None:
        with self._lock:
            if self._own_views is not None:
                self._own_views.pop(lora_id, None)
            slot = self._slot_of.pop(lora_id, None)
            if slot is None:
                return
            self._forget(slot)
            self._skips.pop(lora_id, None)
            self.index.delete(slot)
            self._ids[slot] = None
            self._info[slot] = None
            self._history.pop(slot, None)
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
            history = (self._history_terms(slot) + terms)[-MAX_HISTORY_TERMS:]
            self._set_history(slot, history)
            # The view as the catalog has it now: a later change to it is queued behind
            # this entry and re-indexes the LoRA again with its history.
            view = self._lookup([lora_id]).get(lora_id)
            if view is not None:
                self.index.put(slot, self._fields(view, history))

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
            chosen: list[Scored | _Ranked] = list(explicit)
            skipped: dict[int, list[str]] = defaultdict(list)
            for candidate in ranked:
                if len(chosen) >= max_loras:
                    break
                if min_confidence is not None and candidate.confidence < min_confidence:
                    break
                twin = self._near_duplicate(candidate.lora_id, chosen) if diversify else None
                if twin is not None:
                    skipped[twin].append(candidate.lora_id)
                    continue
                chosen.append(candidate)
        wanted = [c.lora_id for c in chosen if isinstance(c, _Ranked)]
        wanted += [i for ids in skipped.values() for i in ids[:3]]
        views = self._lookup(wanted) if wanted else {}
        out = []
        for i, rec in enumerate(chosen):
            scored = rec if isinstance(rec, Scored) else self._scored(rec, views)
            if scored is None:  # removed from the catalog since it was ranked
                continue
            names = [views[s].metadata.name for s in skipped.get(i, ())[:3] if s in views]
            if names:
                note = "skipped near-duplicates: " + ", ".join(names)
                scored = Scored(
                    scored.lora,
                    scored.confidence,
                    scored.weight,
                    scored.trigger_words,
                    (*scored.reasons, note),
                    scored.score,
                )
            out.append(scored)
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
            ranked = self._rank(
                parsed, architecture, include_unavailable, exclude=set(), limit=limit
            )
        views = self._lookup([r.lora_id for r in ranked]) if ranked else {}
        return [s for r in ranked if (s := self._scored(r, views)) is not None]

    # -- snapshots -------------------------------------------------------------------------

    def state(self) -> Arrays:
        """The whole state as named arrays (the index's under `index.`), consistent as of
        the last change applied. The views are not part of it."""
        with self._lock:
            out = {f"index.{k}": v for k, v in self.index.state().items()}
            n = self._next
            out["slots.arch"] = self._arch[:n].copy()
            out["slots.available"] = self._available[:n].copy()
            out["slots.alive"] = self._alive[:n].copy()
            out["slots.downloads"] = self._downloads[:n].copy()
            out["slots.info"], out["slots.info_ends"] = _concatenated(
                [np.frombuffer(b or b"", dtype=np.int32) for b in self._info]
            )
            history = sorted(self._history)
            out["history.slots"] = np.array(history, dtype=np.int64)
            out["history.terms"], out["history.ends"] = _concatenated(
                [self._history[s] for s in history]
            )
            text = {
                "shape": _STATE_SHAPE,
                "terms": self.index.vocabulary.terms,
                "phrases": self._phrase_terms,
                "ids": self._ids,
                "keys": self._keys,
                "free": self._free,
                "pending": self._pending_history,
                # answered recommendations' skips (feedback.py), oldest first per LoRA
                "skips": {k: [sorted(s) for s in v] for k, v in self._skips.items()},
            }
            out["text"] = np.frombuffer(json.dumps(text).encode(), dtype=np.uint8)
            return out

    def restore(self, arrays: Mapping[str, npt.NDArray[np.generic]]) -> None:
        """Replaces the state with one `state()` returned (possibly by another process).
        Raises ValueError when it comes from an engine that keeps its state differently."""
        text = json.loads(np.asarray(arrays["text"], dtype=np.uint8).tobytes())
        shape = json.loads(json.dumps(_STATE_SHAPE))
        if text.get("shape") != shape:
            raise ValueError(f"state of shape {text.get('shape')}, this engine's is {shape}")
        with self._lock:
            self.index.restore(
                {k[len("index.") :]: v for k, v in arrays.items() if k.startswith("index.")},
                text["terms"],
            )
            ids: list[str | None] = text["ids"]
            n = len(ids)
            capacity = max(1024, 1 << max(n - 1, 0).bit_length())
            self._next = n
            self._arch = _padded(arrays["slots.arch"], capacity, np.int16)
            self._available = _padded(arrays["slots.available"], capacity, np.bool_)
            self._alive = _padded(arrays["slots.alive"], capacity, np.bool_)
            self._downloads = _padded(arrays["slots.downloads"], capacity, np.float64)
            self._ids = ids
            self._slot_of = {lora_id: s for s, lora_id in enumerate(ids) if lora_id is not None}
            info = np.asarray(arrays["slots.info"], dtype=np.int32)
            self._info = [
                info[a:b].tobytes() if b > a else None for a, b in _spans(arrays["slots.info_ends"])
            ]
            self._keys = [None if k is None else tuple(k) for k in text["keys"]]
            terms = np.asarray(arrays["history.terms"], dtype=np.int32)
            self._history = {
                int(s): terms[a:b].copy()
                for s, (a, b) in zip(
                    np.asarray(arrays["history.slots"]).tolist(),
                    _spans(arrays["history.ends"]),
                    strict=True,
                )
            }
            self._free = [int(s) for s in text["free"]]
            self._pending_history = defaultdict(list, text["pending"])
            self._skips = {
                k: deque((frozenset(s) for s in v), maxlen=MAX_SKIPS)
                for k, v in text["skips"].items()
            }
            self._phrase_terms = [tuple(p) for p in text["phrases"]]
            self._phrases = {p: i for i, p in enumerate(self._phrase_terms)}
            self._trigger_docs, self._by_first, self._by_file_name = {}, {}, {}  # rebuilt
            for pid, slots in _phrase_slots(info, arrays["slots.info_ends"]).items():
                self._trigger_docs[pid] = slots
                self._by_first.setdefault(self._phrase_terms[pid][0], set()).add(pid)
            names = self._by_file_name
            for slot, keys in enumerate(self._keys):
                for key in keys or ():
                    found = names.get(key)
                    if found is None:
                        names[key] = [slot]
                    elif found[-1] != slot:  # slots ascend: a repeat is the last one
                        found.append(slot)

    def nbytes(self) -> int:
        """Bytes the engine's arrays and packed per-LoRA records hold (Python object
        overheads of the id and key strings not included)."""
        with self._lock:
            total = self.index.nbytes()
            total += sum(len(b) for b in self._info if b is not None)
            total += sum(a.nbytes for a in self._history.values())
            total += sum(
                a.nbytes for a in (self._arch, self._available, self._alive, self._downloads)
            )
            return int(total)

    # -- internals ---------------------------------------------------------------------------

    def _lookup(self, lora_ids: Sequence[str]) -> Mapping[str, LoraView]:
        if self._own_views is not None:
            return {i: v for i in lora_ids if (v := self._own_views.get(i)) is not None}
        assert self._views is not None
        return self._views(lora_ids)

    def _scored(self, ranked: _Ranked, views: Mapping[str, LoraView]) -> Scored | None:
        view = views.get(ranked.lora_id)
        if view is None:
            return None
        return Scored(
            view,
            ranked.confidence,
            self._weight(view),
            view.metadata.trigger_words,
            ranked.reasons,
            ranked.score,
        )

    def _history_terms(self, slot: int) -> list[str]:
        found = self._history.get(slot)
        if found is None:
            return []
        terms = self.index.vocabulary.terms
        return [terms[i] for i in found.tolist()]

    def _set_history(self, slot: int, history: Sequence[str]) -> None:
        if not history:
            self._history.pop(slot, None)
            return
        intern = self.index.vocabulary.intern
        self._history[slot] = np.array([intern(t) for t in history], dtype=np.int32)

    def _take_slot(self) -> int:
        slot = self._next
        self._next += 1
        self._ids.append(None)
        self._info.append(None)
        self._keys.append(None)
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
        self.index.put(slot, self._fields(view, history))
        intern = self.index.vocabulary.intern
        phrase_ids = tuple(dict.fromkeys(self._phrase_id(p) for p in triggers))
        self._info[slot] = _pack(
            lora_type(m.tags),
            phrase_ids,
            {intern(t) for t in (*tokens(m.name), *tokens(m.file_name))},
            {intern(t) for t in content_terms(" ".join(m.tags))},
        )
        self._ids[slot] = view.id
        self._set_history(slot, history)
        self._arch[slot] = _ARCH_CODE[m.base_model.architecture]
        self._available[slot] = view.available
        self._alive[slot] = True
        self._downloads[slot] = m.downloads
        self._index_triggers(slot, phrase_ids)
        keys = ((m.file_name.casefold(),) if m.file_name else ()) + (m.name.casefold(),)
        self._keys[slot] = keys
        for key in keys:
            _add(self._by_file_name, key, slot)

    def _phrase_id(self, phrase: tuple[str, ...]) -> int:
        found = self._phrases.get(phrase)
        if found is None:
            found = self._phrases[phrase] = len(self._phrase_terms)
            self._phrase_terms.append(phrase)
        return found

    def _index_triggers(self, slot: int, phrase_ids: Iterable[int]) -> None:
        for pid in phrase_ids:
            slots = self._trigger_docs.get(pid)
            if slots is None:
                self._trigger_docs[pid] = [slot]
                self._by_first.setdefault(self._phrase_terms[pid][0], set()).add(pid)
            else:
                slots.append(slot)

    def _forget(self, slot: int) -> None:
        packed = self._info[slot]
        if packed is None:
            return
        for pid in _unpack(packed).phrases:
            slots = self._trigger_docs[pid]
            slots.remove(slot)
            if not slots:
                del self._trigger_docs[pid]
                first = self._by_first[self._phrase_terms[pid][0]]
                first.discard(pid)
                if not first:
                    del self._by_first[self._phrase_terms[pid][0]]
        for key in self._keys[slot] or ():
            _discard(self._by_file_name, key, slot)
        self._keys[slot] = None

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
                if self._arch[slot] != _ARCH_CODE[architecture]:
                    continue
                if not (self._available[slot] or include_unavailable):
                    continue
                lora_id = self._ids[slot]
                view = None if lora_id is None else self._lookup([lora_id]).get(lora_id)
                if view is None:
                    continue
                weight = tag.weight if tag.weight is not None else self._weight(view)
                out.append(
                    Scored(
                        view,
                        1.0,
                        weight,
                        view.metadata.trigger_words,
                        (f"explicitly chosen with <lora:{tag.name}>",),
                        math.inf,
                    )
                )
                break
        return out

    def _concept(self, lora_id: str) -> frozenset[int]:
        """Term ids of its trigger phrases or, without triggers, of its name."""
        slot = self._slot_of.get(lora_id)
        packed = None if slot is None else self._info[slot]
        if packed is None:
            return frozenset()
        info = _unpack(packed)
        if not info.phrases:
            return info.name_terms
        ids = self.index.vocabulary.ids
        return frozenset(ids[t] for pid in info.phrases for t in self._phrase_terms[pid])

    def _near_duplicate(self, lora_id: str, chosen: Sequence[Scored | _Ranked]) -> int | None:
        """Index of an already chosen recommendation of the same concept (mostly the same
        trigger words or, without triggers, name words), else None."""
        concept = self._concept(lora_id)
        if not concept:
            return None
        for i, other in enumerate(chosen):
            other_id = other.lora.id if isinstance(other, Scored) else other.lora_id
            other_concept = self._concept(other_id)
            if other_concept and len(concept & other_concept) / len(concept | other_concept) >= 0.6:
                return i
        return None

    def _weight(self, view: LoraView) -> float:
        w = view.metadata.preferred_weight
        return self.default_weight if w is None else w

    def _trigger_matches(self, prompt_tokens: Sequence[str]) -> dict[int, list[int]]:
        """Trigger phrases (ids) that occur in the prompt, with the LoRAs that have them."""
        found: dict[int, list[int]] = {}
        for i, token in enumerate(prompt_tokens):
            for pid in self._by_first.get(token, ()):
                phrase = self._phrase_terms[pid]
                if pid not in found and tuple(prompt_tokens[i : i + len(phrase)]) == phrase:
                    found[pid] = self._trigger_docs[pid]
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
            return [self._id(int(s)) for s in found.slots], found.matrix

    def _id(self, slot: int) -> str:
        lora_id = self._ids[slot]
        assert lora_id is not None, "a live slot has an id"
        return lora_id

    def _candidates(
        self,
        parsed: ParsedPrompt,
        architecture: Architecture | None,
        include_unavailable: bool,
        exclude: set[str],
    ) -> _Candidates | None:
        n = self._next
        if n == 0 or not self._slot_of:
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
        for pid, slots in triggers.items():
            idx = np.fromiter(slots, dtype=np.int64, count=len(slots))
            trigger_idf[idx] = np.maximum(trigger_idf[idx], self._phrase_idf(pid))
            specificity[idx] = np.maximum(specificity[idx], self._specificity(pid))
        first += TRIGGER_BOOST * trigger_idf
        first = np.where(mask, first, -np.inf)
        k = min(CANDIDATES, int(np.count_nonzero(first > 0)))
        if k == 0:
            return None
        top = np.argpartition(-first, k - 1)[:k]
        top = top[np.argsort(-first[top], kind="stable")]
        best = float(first[top[0]])
        get = self.index.vocabulary.get
        prompt_set = frozenset(i for t in set(prompt_tokens) if (i := get(t)) is not None)
        per_doc = np.zeros((k, 4))
        kinds = np.zeros((k, len(LORA_TYPES)))
        for row, slot in enumerate(top.tolist()):
            packed = self._info[slot]
            assert packed is not None, "a candidate is a live slot"
            info = _unpack(packed)
            if info.phrases:
                per_doc[row, 0] = len(triggers.keys() & set(info.phrases)) / len(info.phrases)
                per_doc[row, 1] = 1.0
            if info.name_terms:
                per_doc[row, 2] = len(info.name_terms & prompt_set) / len(info.name_terms)
            if info.tag_terms:
                per_doc[row, 3] = len(info.tag_terms & prompt_set) / len(info.tag_terms)
            if info.kind >= 0:
                kinds[row, info.kind] = 1.0
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
        named = {self._phrase_terms[pid]: slots for pid, slots in triggers.items()}
        return _Candidates(top, np.column_stack(columns), named, per_field, first)

    def _rank(
        self,
        parsed: ParsedPrompt,
        architecture: Architecture | None,
        include_unavailable: bool,
        exclude: set[str],
        limit: int = CANDIDATES,
    ) -> list[_Ranked]:
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
                self._id(int(found.slots[r])),
            ),
        )
        ranked = []
        for row in order[:limit]:
            slot = int(found.slots[row])
            ranked.append(
                _Ranked(
                    self._id(slot),
                    float(probabilities[row]),
                    _reasons(found, row, slot),
                    float(found.first[slot]),
                )
            )
        return ranked

    def _skip_factors(self, parsed: ParsedPrompt, slots: npt.NDArray[np.int64]) -> FloatArray:
        """1 for a candidate never skipped near this prompt, down to 1 - SKIP_PENALTY for one
        skipped SKIPS_FOR_FULL_PENALTY times for prompts holding all of its words. Each word
        counts by its IDF, so shared boilerplate (`masterpiece`) says little."""
        factors = np.ones(len(slots))
        terms = set(parsed.terms)
        if not terms:
            return factors
        n = len(self._slot_of)
        idf = {t: math.log1p(n / (1 + self.index.document_frequency("all", t))) for t in terms}
        total = sum(idf.values())
        if total <= 0:
            return factors
        for row, slot in enumerate(slots.tolist()):
            skips = self._skips.get(self._ids[slot] or "")
            if not skips:
                continue
            near = sum(
                w * min(SKIPS_FOR_FULL_PENALTY, sum(t in s for s in skips)) for t, w in idf.items()
            )
            factors[row] = 1.0 - SKIP_PENALTY * near / (SKIPS_FOR_FULL_PENALTY * total)
        return factors

    def _phrase_idf(self, pid: int) -> float:
        df = len(self._trigger_docs.get(pid, ()))
        return math.log1p(len(self._slot_of) / (1 + df))

    def _specificity(self, pid: int) -> float:
        """How surely a trigger phrase in a prompt points at its LoRAs: low when many LoRAs
        share it or when its rarest word is common in catalog text (`eyes`, `long hair`),
        zero for boilerplate. An IDF over the largest possible one, so a phrase unique to one
        LoRA scores alike in a catalog of ten and of 100,000. The ranker picks its model by
        the best one in the prompt."""
        phrase = self._phrase_terms[pid]
        if all(t in GENERIC_TERMS or t in STOP_WORDS for t in phrase):
            return 0.0
        n = len(self._slot_of)
        df = min(self.index.document_frequency("all", t) for t in phrase)
        idf = min(self._phrase_idf(pid), math.log1p(n / (1 + df)))
        return idf / math.log1p(n) if n > 0 else 0.0


def _add(table: dict[_K, list[int]], key: _K, value: int) -> None:
    values = table.get(key)
    if values is None:
        table[key] = [value]
    elif value not in values:
        values.append(value)


def _discard(table: dict[_K, list[int]], key: _K, value: int) -> None:
    values = table.get(key)
    if values is not None and value in values:
        values.remove(value)
        if not values:
            del table[key]


def _concatenated(
    parts: Sequence[npt.NDArray[np.int32]],
) -> tuple[npt.NDArray[np.int32], npt.NDArray[np.int64]]:
    """`parts` as one array and the end offset of each."""
    ends = np.cumsum([len(p) for p in parts], dtype=np.int64)
    flat = np.concatenate(parts) if parts else np.zeros(0, dtype=np.int32)
    return flat.astype(np.int32, copy=False), ends


def _spans(ends: npt.NDArray[np.generic]) -> list[tuple[int, int]]:
    """(start, end) of each part of a `_concatenated` array, from its end offsets."""
    stops: list[int] = np.asarray(ends, dtype=np.int64).tolist()
    return list(zip([0, *stops][: len(stops)], stops, strict=True))


def _phrase_slots(
    info: npt.NDArray[np.int32], ends: npt.NDArray[np.generic]
) -> dict[int, list[int]]:
    """Trigger phrase id -> slots, read off the packed records (see _pack) in a few vector
    operations rather than a loop over every LoRA."""
    stops = np.asarray(ends, dtype=np.int64)
    starts = np.concatenate([[0], stops[:-1]]).astype(np.int64)
    used = stops > starts
    slots = np.flatnonzero(used)
    starts = starts[used]
    counts = info[starts + 1].astype(np.int64)
    owner = np.repeat(slots, counts)
    offset = np.arange(int(counts.sum())) - np.repeat(np.cumsum(counts) - counts, counts)
    phrase = info[np.repeat(starts + 2, counts) + offset]
    out: dict[int, list[int]] = {}
    for pid, slot in zip(phrase.tolist(), owner.tolist(), strict=True):
        found = out.get(pid)
        if found is None:
            out[pid] = [slot]
        else:
            found.append(slot)
    return out


def _padded(array: npt.NDArray[np.generic], size: int, dtype: type[np.generic]) -> Any:
    out = np.zeros(size, dtype=dtype)
    out[: len(array)] = array
    return out


@dataclass(frozen=True, slots=True)
class _Candidates:
    slots: npt.NDArray[np.int64]
    matrix: FloatArray  # one row of FEATURES per slot, best first-stage score first
    triggers: dict[tuple[str, ...], list[int]]
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
