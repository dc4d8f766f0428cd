"""Fits the re-ranker on the dev split of ../shared/eval and writes it to
server/domain/recommend/ranker.json: one logistic regression for prompts with a specific
trigger phrase and one for prompts without, each with its own isotonic calibration. Everything
reported is out of fold (5 folds split by LoRA, as the held-out test set is), next to the
first-stage order the models re-rank; the trigger threshold and each model's weight on the
first-stage order are chosen here, on those out-of-fold figures.

    .venv/bin/python bench/train_ranker.py [--eval-dir ../shared/eval] [--write] [--ablate]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import zlib
from pathlib import Path
from typing import Any

import numpy as np
from sklearn.isotonic import IsotonicRegression
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import GroupKFold

from client.catalog import read_catalog_jsonl
from server.application.commands.import_catalog import (
    catalog_record_from_json,
    metadata_from_record,
)
from server.devtools.eval_metrics import expected_calibration_error, ranking_metrics
from server.domain.lora import lora_id_for_source
from server.domain.models import Architecture, LoraSource, LoraView
from server.domain.recommend.engine import LORA_TYPES, RecommendationEngine, lora_type
from server.domain.recommend.ranker import FEATURES, LinearModel, Ranker

ROOT = Path(__file__).resolve().parents[1]
RANKER = ROOT / "server" / "domain" / "recommend" / "ranker.json"
SETS = ("cold/prompt", "cold/prompt_no_trigger", "warm/prompt", "warm/prompt_no_trigger")
THRESHOLDS = (0.55, 0.65, 0.75)  # query_trigger_specificity cut-offs tried
RANK_PRIORS = (0.0, 0.25, 0.5, 1.0, 2.0, 4.0, 50.0)  # 50: the first-stage order
# Feature groups for the ablation (each removed in turn).
GROUPS = {
    "bm25 per field": [
        "bm25_all",
        "bm25_name",
        "bm25_file",
        "bm25_trigger",
        "bm25_tags",
        "bm25_description",
    ],
    "history": ["bm25_history", "relative_history", "query_history_max"],
    "triggers": [
        "trigger_idf",
        "trigger_fraction",
        "has_triggers",
        "query_trigger_phrases",
        "trigger_specificity",
        "query_trigger_specificity",
    ],
    "name/tag/query coverage": ["name_coverage", "tag_coverage", "query_coverage"],
    "relative field scores": ["relative_name", "relative_tags", "relative_description"],
    "first-stage rank": ["relative_score", "inverse_rank"],
    "popularity": ["log_downloads"],
    "document length": ["log_length"],
    "LoRA type": [f"type_{t}" for t in LORA_TYPES],
    "query context": ["query_terms", "query_best_score"],
}


def load_views(path: Path) -> list[LoraView]:
    views = []
    for row in read_catalog_jsonl(path):
        record = catalog_record_from_json(row)
        views.append(
            LoraView(
                id=str(lora_id_for_source(record.source_id)),
                metadata=metadata_from_record(record),
                source=LoraSource.CATALOG,
                source_id=record.source_id,
                available=False,
            )
        )
    return views


class Data:
    """Every query's candidates, stacked: rows are candidates, `q` maps rows to queries."""

    def __init__(self, parts: list[tuple[str, list[tuple[np.ndarray, np.ndarray, str, str]]]]):
        matrices: list[np.ndarray] = []
        labels: list[np.ndarray] = []
        query: list[np.ndarray] = []
        sets: list[str] = []
        groups: list[str] = []
        kinds: list[str] = []
        for name, queries in parts:
            for matrix, y, group, kind in queries:
                query.append(np.full(len(y), len(sets)))
                matrices.append(matrix)
                labels.append(y)
                sets.append(name)
                groups.append(group)
                kinds.append(kind)
        self.X = np.vstack(matrices)
        self.y = np.concatenate(labels)
        self.q = np.concatenate(query).astype(np.int64)
        self.set = np.array(sets)
        self.group = np.array(groups)
        self.kind = np.array(kinds)
        n = len(sets)
        self.start = np.searchsorted(self.q, np.arange(n))
        self.end = np.searchsorted(self.q, np.arange(n), side="right")
        spec = FEATURES.index("query_trigger_specificity")
        self.spec = np.array(
            [self.X[a, spec] if b > a else 0.0 for a, b in zip(self.start, self.end, strict=True)]
        )
        self.first = -np.concatenate([np.arange(b - a) for a, b in self.spans()]).astype(float)

    def spans(self) -> list[tuple[int, int]]:
        return list(zip(self.start.tolist(), self.end.tolist(), strict=True))

    def hits(self, score: np.ndarray) -> list[int | None]:
        out: list[int | None] = []
        for a, b in self.spans():
            ranked = self.y[a:b][np.argsort(-score[a:b], kind="stable")]
            positions = np.flatnonzero(ranked > 0)
            out.append(int(positions[0]) + 1 if len(positions) else None)
        return out


def collect(
    engine: RecommendationEngine,
    rows: list[dict[str, Any]],
    field: str,
    by_id: dict[str, str],
    kinds: dict[str, str],
) -> list[tuple[np.ndarray, np.ndarray, str, str]]:
    out = []
    for row in rows:
        prompt = row.get(field)
        if not prompt:
            continue
        ids, matrix = engine.candidate_features(prompt, Architecture.SD1, True)
        expected = set(row["expected"])
        labels = np.array([by_id[i] in expected for i in ids], dtype=float)
        out.append((matrix, labels, row["expected"][0], kinds[row["expected"][0]]))
    return out


def recall5(hits: list[int | None], select: np.ndarray) -> float:
    chosen = [h for h, s in zip(hits, select, strict=True) if s]
    return ranking_metrics(chosen)["recall@5"] if chosen else 0.0


def fit_oof(d: Data, rows: np.ndarray, columns: list[int]) -> np.ndarray:
    """Out-of-fold log-odds for `rows` (folds by LoRA), zero elsewhere."""
    Z, _, _ = standardise(d.X[:, columns], rows)
    out = np.zeros(len(d.y))
    index = np.flatnonzero(rows)
    for train, test in GroupKFold(n_splits=5).split(index, groups=d.group[d.q[index]]):
        model = LogisticRegression(C=1.0, max_iter=3000)
        model.fit(Z[index[train]], d.y[index[train]])
        out[index[test]] = model.decision_function(Z[index[test]])
    return out


def standardise(X: np.ndarray, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    mean, scale = X[rows].mean(axis=0), X[rows].std(axis=0)
    scale = np.where(scale > 0, scale, 1.0)
    return (X - mean) / scale, mean, scale


def condition_scores(
    d: Data, threshold: float, columns: list[int]
) -> tuple[np.ndarray, np.ndarray]:
    """Out-of-fold log-odds of both condition models, and each query's condition."""
    trigger = d.spec >= threshold
    z = np.zeros(len(d.y))
    for side in (True, False):
        rows = trigger[d.q] == side
        if rows.any():
            z[rows] = fit_oof(d, rows, columns)[rows]
    return z, trigger


def choose_rank_prior(d: Data, z: np.ndarray, queries: np.ndarray) -> tuple[float, np.ndarray]:
    """The smallest weight on the first-stage order at which the model ranks the condition's
    queries at least as well as the first stage on every set (field x cold/warm), and among
    those the best on average; the first-stage order itself when none does."""
    log_rank = np.log(1.0 / (1.0 - d.first))
    base = d.hits(d.first)
    best: tuple[float, float] | None = None
    for prior in RANK_PRIORS:
        hits = d.hits(z + prior * log_rank)
        gains = [
            recall5(hits, queries & (d.set == s)) - recall5(base, queries & (d.set == s))
            for s in SETS
            if (queries & (d.set == s)).any()
        ]
        if min(gains) >= 0 and (best is None or float(np.mean(gains)) > best[1] + 1e-9):
            best = (prior, float(np.mean(gains)))
    prior = RANK_PRIORS[-1] if best is None else best[0]
    return prior, z + prior * log_rank


def per_set(d: Data, hits: list[int | None], select: np.ndarray | None = None) -> dict[str, Any]:
    out = {}
    for s in SETS:
        chosen = d.set == s if select is None else (d.set == s) & select
        out[s] = ranking_metrics([h for h, c in zip(hits, chosen, strict=True) if c])
    return out


def calibrate(
    d: Data, score: np.ndarray, queries: np.ndarray, top: int
) -> tuple[IsotonicRegression, dict[str, tuple[list[float], list[bool]]]]:
    """Isotonic map from the probability to the hit rate of the top recommendations of the
    condition's queries: fitted on one half of the LoRAs and scored on the other (and back)
    for the report, then refitted on all."""
    raw: list[float] = []
    hit: list[bool] = []
    group: list[str] = []
    sets: list[str] = []
    prob = 1.0 / (1.0 + np.exp(-np.clip(score, -30, 30)))
    for i in np.flatnonzero(queries):
        a, b = int(d.start[i]), int(d.end[i])
        order = np.argsort(-score[a:b], kind="stable")[:top]
        raw.extend(prob[a:b][order].tolist())
        hit.extend(bool(c) for c in d.y[a:b][order])
        group.extend([str(d.group[i])] * len(order))
        sets.extend([str(d.set[i])] * len(order))
    r, h = np.array(raw), np.array(hit, dtype=float)
    half = np.array([zlib.crc32(g.encode()) % 2 for g in group])
    calibrated = np.zeros(len(r))
    for side in (0, 1):
        iso = IsotonicRegression(out_of_bounds="clip", y_min=0.0, y_max=1.0)
        iso.fit(r[half != side], h[half != side])
        calibrated[half == side] = iso.predict(r[half == side])
    by_set: dict[str, tuple[list[float], list[bool]]] = {}
    for s, c, x in zip(sets, calibrated.tolist(), h.astype(bool).tolist(), strict=True):
        by_set.setdefault(s, ([], []))
        by_set[s][0].append(c)
        by_set[s][1].append(x)
    return IsotonicRegression(out_of_bounds="clip", y_min=0.0, y_max=1.0).fit(r, h), by_set


def final_model(d: Data, rows: np.ndarray, prior: float, iso: IsotonicRegression) -> LinearModel:
    Z, mean, scale = standardise(d.X, rows)
    model = LogisticRegression(C=1.0, max_iter=3000).fit(Z[rows], d.y[rows])
    return LinearModel(
        model.coef_[0],
        float(model.intercept_[0]),
        mean,
        scale,
        np.asarray(iso.X_thresholds_, dtype=float),
        np.asarray(iso.y_thresholds_, dtype=float),
        prior,
    )


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--eval-dir", default=str(ROOT.parent / "shared" / "eval"))
    parser.add_argument("--write", action="store_true", help="write ranker.json")
    parser.add_argument("--top", type=int, default=3, help="recommendations scored for ECE")
    parser.add_argument("--limit", type=int, default=0, help="only the first N rows per file")
    parser.add_argument("--ablate", action="store_true", help="remove each feature group")
    args = parser.parse_args()
    eval_dir = Path(args.eval_dir)
    views = load_views(eval_dir / "civitai_loras.jsonl")
    by_id = {v.id: v.source_id for v in views}
    kinds = {
        v.source_id: (LORA_TYPES[k] if (k := lora_type(v.metadata.tags)) >= 0 else "other")
        for v in views
    }
    cold = RecommendationEngine(Ranker.neutral())
    warm = RecommendationEngine(Ranker.neutral())
    for view in views:
        cold.upsert(view)
        warm.upsert(view)
    for line in (eval_dir / "dev_history.jsonl").read_text().splitlines():
        row = json.loads(line)
        warm.record_generation(row["prompt"], [str(lora_id_for_source(s)) for s in row["loras"]])

    def read(name: str) -> list[dict[str, Any]]:
        rows = [json.loads(line) for line in (eval_dir / name).read_text().splitlines()]
        return rows[: args.limit] if args.limit else rows

    cold_rows, warm_rows = read("dev_queries.jsonl"), read("dev_warm_queries.jsonl")
    engines = {"cold": (cold, cold_rows), "warm": (warm, warm_rows)}
    parts = []
    for name in SETS:
        condition, field = name.split("/")
        engine, rows = engines[condition]
        t = time.perf_counter()
        parts.append((name, collect(engine, rows, field, by_id, kinds)))
        print(
            f"{name}: {len(parts[-1][1])} queries in {time.perf_counter() - t:.1f}s",
            file=sys.stderr,
        )
    d = Data(parts)
    report: dict[str, Any] = {}
    base = d.hits(d.first)
    report["first_stage"] = per_set(d, base)
    report["candidates@100"] = {
        s: round(
            float(
                np.mean(
                    [d.y[a:b].any() for (a, b), x in zip(d.spans(), d.set == s, strict=True) if x]
                )
            ),
            4,
        )
        for s in SETS
    }
    everything = list(range(len(FEATURES)))
    # 1. The trigger threshold: the best mean out-of-fold R@5 over the four sets.
    tried = {}
    for threshold in THRESHOLDS:
        z, trigger = condition_scores(d, threshold, everything)
        hits = d.hits(z)
        tried[threshold] = (float(np.mean([recall5(hits, d.set == s) for s in SETS])), z, trigger)
        print(f"threshold {threshold}: mean R@5 {tried[threshold][0]:.4f}", file=sys.stderr)
    threshold = max(tried, key=lambda t: tried[t][0])
    _, z, trigger = tried[threshold]
    report["threshold"] = {
        "chosen": threshold,
        **{str(t): round(v[0], 4) for t, v in tried.items()},
    }
    # 2. Each model's weight on the first-stage order, then its calibration.
    score = np.zeros(len(d.y))
    models: dict[bool, LinearModel] = {}
    ece: dict[str, tuple[list[float], list[bool]]] = {}
    for side, label in ((True, "trigger"), (False, "plain")):
        queries = trigger == side
        prior, scored = choose_rank_prior(d, z, queries)
        rows = queries[d.q]
        score[rows] = scored[rows]
        iso, by_set = calibrate(d, score, queries, args.top)
        for s, (c, x) in by_set.items():
            ece.setdefault(s, ([], []))
            ece[s][0].extend(c)
            ece[s][1].extend(x)
        hits = d.hits(score)
        report[f"{label}_model"] = {
            "queries": int(queries.sum()),
            "rank_prior": prior,
            "reranked_oof": {s: v["recall@5"] for s, v in per_set(d, hits, queries).items()},
            "first_stage": {s: v["recall@5"] for s, v in per_set(d, base, queries).items()},
        }
        models[side] = final_model(d, rows, prior, iso)
    hits = d.hits(score)
    report["reranked_oof"] = per_set(d, hits)
    report["ece_top3_calibrated_oof"] = {
        s: expected_calibration_error(*ece[s]) for s in SETS if s in ece
    }
    for field in ("prompt", "prompt_no_trigger"):
        pooled = (
            [x for s in SETS if s.endswith("/" + field) for x in ece[s][0]],
            [x for s in SETS if s.endswith("/" + field) for x in ece[s][1]],
        )
        report["ece_top3_calibrated_oof"][field] = expected_calibration_error(*pooled)
    # 3. Per LoRA type, no-trigger queries: re-ranked vs first stage (R@5, queries).
    report["plain_by_type"] = {
        f"{s}/{k}": [recall5(hits, sel), recall5(base, sel), int(sel.sum())]
        for s in SETS
        for k in (*LORA_TYPES, "other")
        if (sel := (d.set == s) & (d.kind == k) & ~trigger).any()
    }
    report["by_type"] = {
        f"{s}/{k}": [recall5(hits, sel), recall5(base, sel), int(sel.sum())]
        for s in SETS
        for k in (*LORA_TYPES, "other")
        if (sel := (d.set == s) & (d.kind == k)).any()
    }
    ranker = Ranker(models[True], models[False], threshold)
    if args.write:
        RANKER.write_text(
            ranker.to_json(
                fitted_on="shared/eval dev split: dev_queries (cold) and dev_warm_queries with "
                "dev_history (warm), prompt and prompt_no_trigger; 5-fold by LoRA"
            )
            + "\n"
        )
        print(f"wrote {RANKER}", file=sys.stderr)
    if args.ablate:
        report["ablation_r@5"] = {}
        for group, names in GROUPS.items():
            kept = [i for i, f in enumerate(FEATURES) if f not in names]
            za, _ = condition_scores(d, threshold, kept)
            report["ablation_r@5"][group] = {s: recall5(d.hits(za), d.set == s) for s in SETS}
            print(f"ablation {group}: {report['ablation_r@5'][group]}", file=sys.stderr)
    print(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
