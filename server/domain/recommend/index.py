"""A field-weighted BM25 index that grows and shrinks one document at a time, in arrays.

Terms are interned to integer ids (one vocabulary for every field). Each field's postings are
a compressed sparse row base (per term id: document slots and term frequencies, in numpy
arrays, a few bytes a posting) plus a small overlay of Python dicts for the documents put
since the last compaction. Removing or replacing a document only clears its bit in the
base's validity mask; compaction (when the overlay has grown to a fraction of the base, or
before a snapshot) folds the overlay in and drops the stale postings. A query costs a few
vector operations per query term whatever the catalog size, and the state is a handful of
arrays that `state()` hands out and `restore()` takes back, for snapshots."""

from __future__ import annotations

import math
import threading
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

FloatArray = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.int64]
BoolArray = npt.NDArray[np.bool_]
Arrays = dict[str, npt.NDArray[np.generic]]

K1 = 1.2
B = 0.75
# The overlay is folded into the base once it holds this many documents, or an eighth of the
# base: amortised O(1) per document, and a bulk load never holds more than that in dicts.
MIN_COMPACT_DOCS = 2000
COMPACT_FRACTION = 8


class Vocabulary:
    """Term <-> id; ids are never reused, so arrays keyed by them stay valid."""

    def __init__(self, terms: Sequence[str] = ()) -> None:
        self.terms: list[str] = list(terms)
        self.ids: dict[str, int] = {t: i for i, t in enumerate(self.terms)}

    def __len__(self) -> int:
        return len(self.terms)

    def intern(self, term: str) -> int:
        found = self.ids.get(term)
        if found is None:
            found = self.ids[term] = len(self.terms)
            self.terms.append(term)
        return found

    def get(self, term: str) -> int | None:
        return self.ids.get(term)


class FieldIndex:
    """One field's postings: CSR base over term ids plus the overlay (see the module)."""

    def __init__(self) -> None:
        self._indptr: IntArray = np.zeros(1, dtype=np.int64)
        self._docs: npt.NDArray[np.int32] = np.zeros(0, dtype=np.int32)
        self._tfs: npt.NDArray[np.generic] = np.zeros(0, dtype=np.uint16)
        self._delta: dict[int, dict[int, int]] = {}
        self._delta_frozen: dict[int, tuple[IntArray, FloatArray]] = {}
        self._delta_terms: dict[int, list[int]] = {}  # overlay document -> its term ids
        self._total_length = 0
        self._count = 0

    @property
    def overlay_documents(self) -> int:
        return len(self._delta_terms)

    def add(self, doc: int, term_ids: Sequence[int]) -> None:
        counts = Counter(term_ids)
        for term, tf in counts.items():
            self._delta.setdefault(term, {})[doc] = tf
            self._delta_frozen.pop(term, None)
        self._delta_terms[doc] = list(counts)
        self._total_length += len(term_ids)
        self._count += 1

    def remove(self, doc: int, length: int) -> None:
        """Forgets `doc` (its base postings are already masked out by the caller)."""
        for term in self._delta_terms.pop(doc, ()):
            postings = self._delta[term]
            del postings[doc]
            self._delta_frozen.pop(term, None)
            if not postings:
                del self._delta[term]
        self._total_length -= length
        self._count -= 1

    def _postings(
        self, term: int, valid: BoolArray | None
    ) -> tuple[npt.NDArray[Any], npt.NDArray[Any]] | None:
        """The live postings of `term`: document slots and term frequencies. `valid` masks
        the base (None when no base document has gone stale since the last compaction)."""
        parts: list[tuple[npt.NDArray[Any], npt.NDArray[Any]]] = []
        if term + 1 < len(self._indptr):
            lo, hi = int(self._indptr[term]), int(self._indptr[term + 1])
            if hi > lo:
                docs, tfs = self._docs[lo:hi], self._tfs[lo:hi]
                if valid is not None:
                    keep = valid[docs]
                    docs, tfs = docs[keep], tfs[keep]
                parts.append((docs, tfs))
        delta = self._delta.get(term)
        if delta:
            frozen = self._delta_frozen.get(term)
            if frozen is None:
                frozen = self._delta_frozen[term] = (
                    np.fromiter(delta.keys(), dtype=np.int64, count=len(delta)),
                    np.fromiter(delta.values(), dtype=np.float64, count=len(delta)),
                )
            parts.append(frozen)
        if not parts:
            return None
        if len(parts) == 1:
            return parts[0]
        return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])

    def document_frequency(self, term: int | None, valid: BoolArray | None) -> int:
        if term is None:
            return 0
        df = len(self._delta.get(term, ()))
        if term + 1 < len(self._indptr):
            lo, hi = int(self._indptr[term]), int(self._indptr[term + 1])
            df += hi - lo if valid is None else int(np.count_nonzero(valid[self._docs[lo:hi]]))
        return df

    def scores(
        self,
        terms: Iterable[int],
        valid: BoolArray | None,
        n_docs: int,
        capacity: int,
        lengths: FloatArray,
        coverage: FloatArray | None = None,
    ) -> FloatArray:
        """BM25 of every document slot for `terms` (distinct term ids, in the order the
        caller wants them summed). With `coverage`, also the share of the query's IDF mass
        (terms the field knows) that each document contains, written into it."""
        out = np.zeros(capacity)
        if not self._count:
            return out
        total_idf = 0.0
        avg = self._total_length / self._count or 1.0
        for term in terms:
            found = self._postings(term, valid)
            if found is None or not len(found[0]):
                continue
            docs, tfs = found
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

    def compact(self, valid: BoolArray, n_terms: int) -> None:
        """Folds the overlay into the base and drops postings of documents not `valid`."""
        counts = np.diff(self._indptr)
        term_of = np.repeat(np.arange(len(counts), dtype=np.int32), counts)
        keep = valid[self._docs] if len(self._docs) else np.zeros(0, dtype=bool)
        n_delta = sum(len(p) for p in self._delta.values())
        d_terms = np.empty(n_delta, dtype=np.int32)
        d_docs = np.empty(n_delta, dtype=np.int32)
        d_tfs = np.empty(n_delta, dtype=np.int64)
        at = 0
        for term, postings in self._delta.items():
            k = len(postings)
            d_terms[at : at + k] = term
            d_docs[at : at + k] = np.fromiter(postings.keys(), dtype=np.int32, count=k)
            d_tfs[at : at + k] = np.fromiter(postings.values(), dtype=np.int64, count=k)
            at += k
        terms = np.concatenate([term_of[keep], d_terms])
        docs = np.concatenate([self._docs[keep], d_docs])
        tfs = np.concatenate([self._tfs[keep].astype(np.int64), d_tfs])
        order = np.lexsort((docs, terms))
        indptr = np.zeros(n_terms + 1, dtype=np.int64)
        np.cumsum(np.bincount(terms, minlength=n_terms), out=indptr[1:])
        self._indptr = indptr
        self._docs = docs[order]
        wide = len(tfs) and int(tfs.max()) > np.iinfo(np.uint16).max
        self._tfs = tfs[order].astype(np.int32 if wide else np.uint16)
        self._delta = {}
        self._delta_frozen = {}
        self._delta_terms = {}

    def state(self) -> Arrays:
        """The base's arrays (call after `compact`: the overlay is not included)."""
        meta = np.array([self._total_length, self._count], dtype=np.int64)
        return {"indptr": self._indptr, "docs": self._docs, "tfs": self._tfs, "meta": meta}

    def restore(self, arrays: Mapping[str, npt.NDArray[np.generic]]) -> None:
        self._indptr = np.asarray(arrays["indptr"], dtype=np.int64)
        self._docs = np.asarray(arrays["docs"], dtype=np.int32)
        self._tfs = np.asarray(arrays["tfs"])
        self._total_length, self._count = (int(v) for v in arrays["meta"])
        self._delta, self._delta_frozen, self._delta_terms = {}, {}, {}

    def nbytes(self) -> int:
        return int(self._indptr.nbytes + self._docs.nbytes + self._tfs.nbytes)


class LexicalIndex:
    """Documents are integer slots; callers map their own ids to slots."""

    def __init__(self, fields: Sequence[str]) -> None:
        self.fields = tuple(fields)
        self.vocabulary = Vocabulary()
        self._index = {f: FieldIndex() for f in fields}
        self._lengths = {f: np.zeros(1024) for f in fields}
        self._present = np.zeros(1024, dtype=bool)  # slot holds a document
        self._in_base = np.zeros(1024, dtype=bool)  # ... whose postings are in the base
        self._stale = 0  # documents with postings in the base that are no longer in_base
        self._size = 0
        self.lock = threading.RLock()

    @property
    def size(self) -> int:
        return self._size

    def capacity(self) -> int:
        return len(self._present)

    def put(self, doc: int, fields: Mapping[str, Sequence[str]]) -> None:
        with self.lock:
            self.delete(doc)
            self._grow(doc + 1)
            intern = self.vocabulary.intern
            for name in self.fields:
                ids = [intern(t) for t in fields.get(name, ())]
                self._index[name].add(doc, ids)
                self._lengths[name][doc] = len(ids)
            self._present[doc] = True
            self._size += 1
            overlay = self._index[self.fields[0]].overlay_documents
            if overlay >= max(MIN_COMPACT_DOCS, self._size // COMPACT_FRACTION):
                self.compact()

    def delete(self, doc: int) -> None:
        with self.lock:
            if doc >= len(self._present) or not self._present[doc]:
                return
            for name in self.fields:
                self._index[name].remove(doc, int(self._lengths[name][doc]))
                self._lengths[name][doc] = 0
            if self._in_base[doc]:
                self._in_base[doc] = False
                self._stale += 1
            self._present[doc] = False
            self._size -= 1

    def compact(self) -> None:
        with self.lock:
            for index in self._index.values():
                index.compact(self._in_base, len(self.vocabulary))
            self._in_base[:] = self._present
            self._stale = 0

    def _ids(self, terms: Iterable[str]) -> list[int]:
        """Distinct known term ids, in the order of `set(terms)` (the summation order of
        the dict-based index this replaced, so scores stay bit-identical)."""
        get = self.vocabulary.get
        return [i for t in set(terms) if (i := get(t)) is not None]

    def field_scores(
        self, field: str, terms: Sequence[str], coverage: FloatArray | None = None
    ) -> FloatArray:
        """BM25 per slot; `coverage` (zeros, one per slot), when given, receives the share
        of the query's IDF mass each document contains (see FieldIndex.scores)."""
        with self.lock:
            return self._index[field].scores(
                self._ids(terms),
                self._valid(),
                max(self.size, 1),
                self.capacity(),
                self._lengths[field],
                coverage,
            )

    def field_length(self, field: str) -> FloatArray:
        return self._lengths[field]

    def document_frequency(self, field: str, term: str) -> int:
        with self.lock:
            return self._index[field].document_frequency(self.vocabulary.get(term), self._valid())

    def _valid(self) -> BoolArray | None:
        """The base's validity mask, None when every base posting is live."""
        return self._in_base if self._stale else None

    def state(self) -> Arrays:
        """Every array, after folding the overlay in; the vocabulary is the caller's to save
        (`vocabulary.terms`)."""
        with self.lock:
            self.compact()
            out: Arrays = {"present": self._present.copy()}
            for name in self.fields:
                out[f"{name}.lengths"] = self._lengths[name].copy()
                for key, value in self._index[name].state().items():
                    out[f"{name}.{key}"] = value
            return out

    def restore(self, arrays: Mapping[str, npt.NDArray[np.generic]], terms: Sequence[str]) -> None:
        with self.lock:
            self.vocabulary = Vocabulary(terms)
            self._present = np.asarray(arrays["present"], dtype=bool).copy()
            self._in_base = self._present.copy()
            self._stale = 0
            self._size = int(np.count_nonzero(self._present))
            for name in self.fields:
                self._lengths[name] = np.asarray(arrays[f"{name}.lengths"], dtype=np.float64).copy()
                self._index[name].restore(
                    {k: arrays[f"{name}.{k}"] for k in ("indptr", "docs", "tfs", "meta")}
                )

    def nbytes(self) -> int:
        """Bytes in the index's arrays (the vocabulary's strings not counted)."""
        total = self._present.nbytes + self._in_base.nbytes
        for name in self.fields:
            total += self._lengths[name].nbytes + self._index[name].nbytes()
        return int(total)

    def _grow(self, needed: int) -> None:
        size = self.capacity()
        if needed <= size:
            return
        while size < needed:
            size *= 2
        for name in self.fields:
            self._lengths[name] = _resized(self._lengths[name], size)
        self._present = _resized(self._present, size)
        self._in_base = _resized(self._in_base, size)


def _resized(array: Any, size: int) -> Any:
    grown = np.zeros(size, dtype=array.dtype)
    grown[: len(array)] = array
    return grown
