"""Deterministic catalog records shaped like the Civitai LoRA sample, in any number.

The scale benchmark needs a million records that stress the store and the indexes the way real
ones would: field lengths follow the sample's distributions (name 1-12 words, 2-19 tags, 0-16
trigger phrases, descriptions up to 2,000 characters with a median near 460), and words follow
a Zipf law over a vocabulary that keeps growing with the catalog, as real text does. A record
depends only on (seed, index), so any slice of the stream can be rebuilt on its own and two
runs import byte-identical catalogs. Nothing here is read from the sample itself."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np

# Distinct words grow with the catalog (Heaps' law); 60k in 8k real records.
VOCABULARY = 400_000
TAG_VOCABULARY = 12_000
KINDS = ("style", "character", "celebrity", "clothing", "concept")
BASE_MODELS = ("SD 1.5", "Other", "SD 2.1")
BASE_MODEL_SHARES = (0.885, 0.112, 0.003)
CHUNK = 4096
_SYLLABLES = tuple(
    c + v for c in "bdfghklmnprstvz" for v in ("a", "e", "i", "o", "u", "ai", "ou", "ei")
)


def word(rank: int) -> str:
    """The word of a Zipf rank: short words for frequent ranks, as in real text."""
    n = len(_SYLLABLES)
    parts = [_SYLLABLES[rank % n], _SYLLABLES[(rank * 7 + 3) % n]]
    rank //= n
    while rank:
        parts.append(_SYLLABLES[rank % n])
        rank //= n
    return "".join(parts)


def _zipf_table(size: int, exponent: float) -> np.ndarray[Any, np.dtype[np.float64]]:
    weights = 1.0 / np.arange(1, size + 1, dtype=np.float64) ** exponent
    cdf = np.cumsum(weights)
    out: np.ndarray[Any, np.dtype[np.float64]] = cdf / cdf[-1]
    return out


class SyntheticCatalog:
    """`records(start, stop)` yields the catalog's records in order, as ImportLoraCatalog
    JSON objects (`catalog_record_from_json` reads them)."""

    def __init__(self, count: int, *, seed: int = 0) -> None:
        self.count = count
        self.seed = seed
        self._words = _zipf_table(VOCABULARY, 1.07)
        self._tags = _zipf_table(TAG_VOCABULARY, 1.0)
        self._vocab = [word(r) for r in range(VOCABULARY)]
        self._tag_names = [f"tag{word(r)}" for r in range(TAG_VOCABULARY)]

    def __len__(self) -> int:
        return self.count

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return self.records(0, self.count)

    def records(self, start: int, stop: int) -> Iterator[dict[str, Any]]:
        first_chunk = start // CHUNK
        for chunk in range(first_chunk, (stop - 1) // CHUNK + 1 if stop > start else first_chunk):
            for index, record in enumerate(self._chunk(chunk), start=chunk * CHUNK):
                if start <= index < stop:
                    yield record

    def _chunk(self, chunk: int) -> Iterator[dict[str, Any]]:
        """One chunk's records, its random draws made in a few vectorised calls."""
        rng = np.random.default_rng([self.seed, chunk])
        first = chunk * CHUNK
        n = max(0, min(first + CHUNK, self.count) - first)
        vocab, tag_names = self._vocab, self._tag_names
        name_len = rng.integers(1, 9, n)
        tag_len = np.clip(rng.poisson(4.6, n), 1, 19)
        has_kind = rng.random(n) < 0.8
        kinds = rng.integers(0, len(KINDS), n)
        trigger_count = np.clip(rng.poisson(1.6, n), 0, 16)
        trigger_len = rng.integers(1, 4, int(trigger_count.sum()))
        trigger_tail = rng.integers(0, VOCABULARY, int(trigger_count.sum()))
        description_len = np.minimum(rng.lognormal(4.2, 0.9, n).astype(np.int64), 330)
        base_models = np.searchsorted(np.cumsum(BASE_MODEL_SHARES), rng.random(n))
        downloads = rng.lognormal(7.3, 0.9, n).astype(np.int64)
        words = np.searchsorted(
            self._words, rng.random(int(name_len.sum() + trigger_len.sum() + description_len.sum()))
        ).tolist()
        tags = np.searchsorted(self._tags, rng.random(int(tag_len.sum()))).tolist()
        # Python lists: indexing numpy arrays one element at a time is the slow part.
        name_len, tag_len, has_kind, kinds = (
            a.tolist() for a in (name_len, tag_len, has_kind, kinds)
        )
        trigger_count, trigger_len, trigger_tail = (
            a.tolist() for a in (trigger_count, trigger_len, trigger_tail)
        )
        description_len, base_models, downloads = (
            a.tolist() for a in (description_len, base_models, downloads)
        )
        w = t = trig = 0
        for i in range(n):
            index = first + i
            name_words = [vocab[r] for r in words[w : w + name_len[i]]]
            w += name_len[i]
            record_tags = [tag_names[r] for r in tags[t : t + tag_len[i]]]
            t += tag_len[i]
            if has_kind[i]:  # most carry their kind as the first tag
                record_tags.insert(0, KINDS[kinds[i]])
            triggers = []
            for _ in range(trigger_count[i]):
                phrase = [vocab[r] for r in words[w : w + trigger_len[trig]]]
                w += trigger_len[trig]
                phrase.append(f"{vocab[trigger_tail[trig]]}{index % 997}")
                triggers.append(" ".join(phrase))
                trig += 1
            description = " ".join([vocab[r] for r in words[w : w + description_len[i]]])
            w += description_len[i]
            yield {
                "source_id": f"synthetic:{index}",
                "name": " ".join(name_words).title() + f" {index}",
                "base_model": BASE_MODELS[base_models[i]],
                "tags": list(dict.fromkeys(record_tags)),
                "trigger_words": triggers,
                "file_name": "_".join(name_words) + f"_{index}",
                "description": description[:2000],
                "downloads": downloads[i],
            }
