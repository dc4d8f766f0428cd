"""Fits the re-ranker on the dev split of ../shared/eval and writes its coefficients to
server/domain/recommend/ranker.json. Reports out-of-fold metrics (folds split by LoRA, as the
held-out test set is) so the figures are not measured on the data the model was fitted on.

    .venv/bin/python bench/train_ranker.py [--eval-dir ../shared/eval] [--write]
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
from server.domain.recommend.engine import RecommendationEngine
from server.domain.recommend.ranker import FEATURES, Ranker

ROOT = Path(__file__).resolve().parents[1]
RANKER = ROOT / "server" / "domain" / "recommend" / "ranker.json"


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


def collect(
    engine: RecommendationEngine, rows: list[dict[str, Any]], field: str, by_id: dict[str, str]
) -> list[tuple[np.ndarray, np.ndarray, str]]:
    out = []
    for row in rows:
        prompt = row.get(field)
        if not prompt:
            continue
        ids, matrix = engine.candidate_features(prompt, Architecture.SD1, True)
        expected = set(row["expected"])
        labels = np.array([by_id[i] in expected for i in ids], dtype=float)
        out.append((matrix, labels, row["expected"][0]))
    return out


def metrics(
    groups: list[tuple[np.ndarray, np.ndarray, str]], scores: list[np.ndarray]
) -> dict[str, float]:
    hits = []
    for (_, labels, _), s in zip(groups, scores, strict=True):
        ranked = labels[np.argsort(-s, kind="stable")]
        positions = np.flatnonzero(ranked > 0)
        hits.append(int(positions[0]) + 1 if len(positions) else None)
    return ranking_metrics(hits)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--eval-dir", default=str(ROOT.parent / "shared" / "eval"))
    parser.add_argument("--write", action="store_true", help="write ranker.json")
    parser.add_argument("--top", type=int, default=3, help="recommendations scored for ECE")
    args = parser.parse_args()
    eval_dir = Path(args.eval_dir)
    views = load_views(eval_dir / "civitai_loras.jsonl")
    by_id = {v.id: v.source_id for v in views}
    cold = RecommendationEngine(Ranker.neutral())
    warm = RecommendationEngine(Ranker.neutral())
    for view in views:
        cold.upsert(view)
        warm.upsert(view)
    for line in (eval_dir / "dev_history.jsonl").read_text().splitlines():
        row = json.loads(line)
        warm.record_generation(row["prompt"], [str(lora_id_for_source(s)) for s in row["loras"]])

    def read(name: str) -> list[dict[str, Any]]:
        return [json.loads(line) for line in (eval_dir / name).read_text().splitlines()]

    cold_rows, warm_rows = read("dev_queries.jsonl"), read("dev_warm_queries.jsonl")
    sets = [
        ("cold/prompt", cold, cold_rows, "prompt"),
        ("cold/prompt_no_trigger", cold, cold_rows, "prompt_no_trigger"),
        ("warm/prompt", warm, warm_rows, "prompt"),
        ("warm/prompt_no_trigger", warm, warm_rows, "prompt_no_trigger"),
    ]
    report: dict[str, Any] = {}
    spans: dict[str, tuple[int, int]] = {}
    fitted: list[tuple[np.ndarray, np.ndarray, str]] = []
    for name, engine, rows, field in sets:
        t = time.perf_counter()
        groups = collect(engine, rows, field, by_id)
        print(f"{name}: {len(groups)} queries in {time.perf_counter() - t:.1f}s", file=sys.stderr)
        report[f"{name}/first_stage"] = metrics(
            groups, [-np.arange(len(g[1]), dtype=float) for g in groups]
        )
        report[f"{name}/candidates@100"] = round(
            sum(bool(g[1].any()) for g in groups) / len(groups), 4
        )
        spans[name] = (len(fitted), len(fitted) + len(groups))
        fitted.extend(groups)
    X = np.vstack([g[0] for g in fitted])
    y = np.concatenate([g[1] for g in fitted])
    group_of_row = np.concatenate([[g[2]] * len(g[1]) for g in fitted])
    mean, scale = X.mean(axis=0), X.std(axis=0)
    scale = np.where(scale > 0, scale, 1.0)
    Z = (X - mean) / scale
    oof = np.zeros(len(y))
    for train, test in GroupKFold(n_splits=5).split(Z, y, group_of_row):
        model = LogisticRegression(C=1.0, max_iter=3000)
        model.fit(Z[train], y[train])
        oof[test] = model.predict_proba(Z[test])[:, 1]
    scores = []
    offset = 0
    for g in fitted:
        scores.append(oof[offset : offset + len(g[1])])
        offset += len(g[1])
    # Calibrate what users see: the top recommendations of each query. The map is fitted on
    # one half of the LoRAs and scored on the other (and back), then refitted on all.
    top_raw: list[float] = []
    top_hit: list[bool] = []
    top_group: list[str] = []
    top_set: list[str] = []
    for name, (lo, hi) in spans.items():
        for g, s in zip(fitted[lo:hi], scores[lo:hi], strict=True):
            order = np.argsort(-s, kind="stable")[: args.top]
            top_raw.extend(s[order].tolist())
            top_hit.extend(bool(c) for c in g[1][order])
            top_group.extend([g[2]] * len(order))
            top_set.extend([name] * len(order))
    raw = np.array(top_raw)
    hit = np.array(top_hit, dtype=float)
    half = np.array([zlib.crc32(gid.encode()) % 2 for gid in top_group])
    calibrated = np.zeros(len(raw))
    for side in (0, 1):
        iso = IsotonicRegression(out_of_bounds="clip", y_min=0.0, y_max=1.0)
        iso.fit(raw[half != side], hit[half != side])
        calibrated[half == side] = iso.predict(raw[half == side])
    sets_arr = np.array(top_set)
    for name, (lo, hi) in spans.items():
        report[f"{name}/reranked_oof"] = metrics(fitted[lo:hi], scores[lo:hi])
        sel = sets_arr == name
        report[f"{name}/ece_top{args.top}_raw"] = expected_calibration_error(
            raw[sel].tolist(), hit[sel].astype(bool).tolist()
        )
        report[f"{name}/ece_top{args.top}_calibrated"] = expected_calibration_error(
            calibrated[sel].tolist(), hit[sel].astype(bool).tolist()
        )
    for condition in ("cold", "warm"):
        sel = np.char.startswith(sets_arr.astype(str), condition)
        report[f"{condition}/ece_top{args.top}_calibrated"] = expected_calibration_error(
            calibrated[sel].tolist(), hit[sel].astype(bool).tolist()
        )
    iso = IsotonicRegression(out_of_bounds="clip", y_min=0.0, y_max=1.0).fit(raw, hit)
    model = LogisticRegression(C=1.0, max_iter=3000).fit(Z, y)
    ranker = Ranker(
        model.coef_[0],
        float(model.intercept_[0]),
        mean,
        scale,
        np.asarray(iso.X_thresholds_, dtype=float),
        np.asarray(iso.y_thresholds_, dtype=float),
    )
    report["coefficients"] = dict(zip(FEATURES, model.coef_[0].round(3).tolist(), strict=True))
    print(json.dumps(report, indent=1))
    if args.write:
        RANKER.write_text(
            ranker.to_json(
                fitted_on="shared/eval dev split: dev_queries (cold) and dev_warm_queries with "
                "dev_history (warm), prompt and prompt_no_trigger; 5-fold by LoRA"
            )
            + "\n"
        )
        print(f"wrote {RANKER}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
