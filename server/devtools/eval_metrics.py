"""Ranking and calibration metrics shared by the evaluation and the ranker fit."""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import numpy as np


def first_hit(ranked_ids: Sequence[str], expected: set[str]) -> int | None:
    """1-based rank of the first expected id, or None."""
    return next((i + 1 for i, x in enumerate(ranked_ids) if x in expected), None)


def ranking_metrics(first_hits: Sequence[int | None]) -> dict[str, float]:
    n = len(first_hits)
    if n == 0:
        return {"recall@1": 0.0, "recall@5": 0.0, "recall@10": 0.0, "mrr@10": 0.0, "n": 0}

    def recall(k: int) -> float:
        return sum(1 for h in first_hits if h is not None and h <= k) / n

    mrr = sum(1.0 / h for h in first_hits if h is not None and h <= 10) / n
    return {
        "recall@1": round(recall(1), 4),
        "recall@5": round(recall(5), 4),
        "recall@10": round(recall(10), 4),
        "mrr@10": round(mrr, 4),
        "n": n,
    }


def expected_calibration_error(
    confidences: Sequence[float], correct: Sequence[bool], bins: int = 10
) -> float:
    """Weighted mean |accuracy - confidence| over equal-width confidence bins."""
    conf = np.asarray(confidences, dtype=float)
    hit = np.asarray(correct, dtype=float)
    if len(conf) == 0:
        return 0.0
    edges = np.linspace(0.0, 1.0, bins + 1)
    total = 0.0
    for lo, hi in itertools.pairwise(edges):
        sel = (conf > lo) & (conf <= hi) if lo > 0 else (conf >= lo) & (conf <= hi)
        if sel.any():
            total += float(sel.sum()) * abs(float(conf[sel].mean()) - float(hit[sel].mean()))
    return round(total / len(conf), 4)
