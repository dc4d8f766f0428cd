"""A field-weighted BM25 index that grows and shrinks one document at a time.

Postings live in Python dicts (cheap to update) and are frozen into numpy arrays per term on
first use after a change, so a query costs a few vector operations per query term whatever
the catalog size."""

from __future__ import annotations

import math
import threading
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

FloatArray = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.int64]

K1 = 1.2
B = 0.75


@dataclass
class _Postings:
    docs: dict[int, int]
    frozen: tuple[IntArray, FloatArray] | None = None


class FieldIndex:
    def __init__(self) -> None:
        self._postings: dict[str, _Postings] = {}
        self._lengths: dict[int, int] = {}
        self._total_length = 0

    def add(self, doc: int, terms: Sequence[str]) -> None:
        for term, tf in Counter(terms).items():
            postings = self._postings.get(term)
            if postings is None:
                postings = self._postings[term] = _Postings({})
            postings.docs[doc] = tf
            postings.frozen = None
        self._lengths[doc] = len(terms)
        self._total_length += len(terms)

    def remove(self, doc: int, terms: Sequence[str]) -> None:
        for term in set(terms):
            postings = self._postings.get(term)
            if postings is not None and postings.docs.pop(doc, None) is not None:
                postings.frozen = None
                if not postings.docs:
                    del self._postings[term]
        self._total_length -= self._lengths.pop(doc, 0)

    def document_frequency(self, term: str) -> int:
        postings = self._postings.get(term)
        return 0 if postings is None else len(postings.docs)

    def scores(
        self,
        terms: Iterable[str],
        n_docs: int,
        capacity: int,
        lengths: FloatArray,
        coverage: FloatArray | None = None,
    ) -> FloatArray:
        """BM25 of every document slot for `terms` (a term counted once per query). With
        `coverage`, also the share of the query's IDF mass (terms the field knows) that each
        document contains, written into it."""
        out = np.zeros(capacity)
        if not self._lengths:
            return out
        total_idf = 0.0
        avg = self._total_length / len(self._lengths) or 1.0
        for term in set(terms):
            postings = self._postings.get(term)
            if postings is None:
                continue
            if postings.frozen is None:
                docs = np.fromiter(postings.docs.keys(), dtype=np.int64, count=len(postings.docs))
                tfs = np.fromiter(
                    postings.docs.values(), dtype=np.float64, count=len(postings.docs)
                )
                postings.frozen = (docs, tfs)
            docs, tfs = postings.frozen
            df = len(docs)
            idf = math.log(1.0 + (n_docs - df + 0.5) / (df + 0.5))
            norm = K1 * (1.0 - B + B * lengths[docs] / avg)
            out[docs] += idf * tfs * (K1 + 1.0) / (tfs + norm)
            if coverage is not None:
                coverage[docs] += idf
                total_idf += idf
        if coverage is not None and total_idf > 0:
            coverage /= total_idf
        return out

    def length_of(self, doc: int) -> int:
        return self._lengths.get(doc, 0)


class LexicalIndex:
    """Documents are integer slots; callers map their own ids to slots."""

    def __init__(self, fields: Sequence[str]) -> None:
        self.fields = tuple(fields)
        self._index = {f: FieldIndex() for f in fields}
        self._terms: dict[int, dict[str, list[str]]] = {}
        self._lengths = {f: np.zeros(1024) for f in fields}
        self.lock = threading.RLock()

    @property
    def size(self) -> int:
        return len(self._terms)

    def capacity(self) -> int:
        return len(next(iter(self._lengths.values())))

    def put(self, doc: int, fields: Mapping[str, Sequence[str]]) -> None:
        with self.lock:
            self.delete(doc)
            self._grow(doc + 1)
            stored = {f: list(fields.get(f, ())) for f in self.fields}
            for name, terms in stored.items():
                self._index[name].add(doc, terms)
                self._lengths[name][doc] = len(terms)
            self._terms[doc] = stored

    def delete(self, doc: int) -> None:
        with self.lock:
            stored = self._terms.pop(doc, None)
            if stored is None:
                return
            for name, terms in stored.items():
                self._index[name].remove(doc, terms)
                self._lengths[name][doc] = 0

    def terms_of(self, doc: int, field: str) -> list[str]:
        return self._terms.get(doc, {}).get(field, [])

    def field_scores(
        self, field: str, terms: Sequence[str], coverage: FloatArray | None = None
    ) -> FloatArray:
        """BM25 per slot; `coverage` (zeros, one per slot), when given, receives the share
        of the query's IDF mass each document contains (see FieldIndex.scores)."""
        with self.lock:
            return self._index[field].scores(
                terms, max(self.size, 1), self.capacity(), self._lengths[field], coverage
            )

    def field_length(self, field: str) -> FloatArray:
        return self._lengths[field]

    def document_frequency(self, field: str, term: str) -> int:
        return self._index[field].document_frequency(term)

    def _grow(self, needed: int) -> None:
        size = self.capacity()
        if needed <= size:
            return
        while size < needed:
            size *= 2
        for name in self.fields:
            grown = np.zeros(size)
            grown[: len(self._lengths[name])] = self._lengths[name]
            self._lengths[name] = grown
