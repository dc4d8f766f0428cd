"""Evaluates recommendations through the service's own code path: the real bootstrap, the
command bus, the recommendation handler and engine, on a temporary store.

    make eval-recommend CATALOG=../shared/eval/civitai_loras.jsonl \\
        QUERIES=../shared/eval/dev_queries.jsonl [HISTORY=../shared/eval/dev_history.jsonl]

The last line printed is one JSON object: recall@1/5/10 and MRR@10 per prompt field (and
recall@5 per LoRA type), the expected calibration error of the top-3 recommendations (pooled
and per field), and per-call latency; under "first_stage" the same ranking figures for the
engine's first-stage order (its BM25 retrieval with trigger and history boosts, no re-ranker),
measured on the same loaded service, so the re-ranker's gain over it is exact."""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np

from client.catalog import read_catalog_jsonl
from server.application.commands import (
    ImportLoRACatalogCommand,
    RecommendLoRAsCommand,
    RecordGenerationCommand,
)
from server.application.commands.import_catalog import catalog_record_from_json
from server.application.context import DispatchContext
from server.bootstrap import Container, bootstrap
from server.config import Settings
from server.devtools.eval_metrics import expected_calibration_error, first_hit, ranking_metrics
from server.domain.lora import lora_id_for_source
from server.domain.recommend.engine import LORA_TYPES, lora_type
from server.domain.recommend.ranker import Ranker

FIELDS = ("prompt", "prompt_no_trigger")
ECE_TOP = 3


def load_catalog(c: Container, path: Path, batch: int = 2000) -> int:
    records = [catalog_record_from_json(r) for r in read_catalog_jsonl(path)]
    for start in range(0, len(records), batch):
        command = ImportLoRACatalogCommand(records=tuple(records[start : start + batch]))
        result = c.commands.dispatch(
            command, DispatchContext(principal="eval", request_id=str(uuid.uuid4()))
        )
        errors = result.unwrap().errors
        if errors:
            print(
                f"catalog: {len(errors)} records refused, first: {errors[0].error}", file=sys.stderr
            )
    return len(records)


def load_history(c: Container, path: Path) -> int:
    count = 0
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        row = json.loads(line)
        ids = tuple(str(lora_id_for_source(s)) for s in row["loras"])
        c.commands.dispatch(
            RecordGenerationCommand(prompt=row["prompt"], lora_ids=ids),
            DispatchContext(principal="eval"),
        ).unwrap()
        count += 1
    return count


def lora_types(path: Path) -> dict[str, str]:
    """source_id -> the LoRA's type (its first tag among LORA_TYPES, else "other")."""
    out = {}
    for row in read_catalog_jsonl(path):
        kind = lora_type(row.get("tags", []))
        out[row["source_id"]] = LORA_TYPES[kind] if kind >= 0 else "other"
    return out


def evaluate(
    c: Container, rows: list[dict[str, Any]], types: dict[str, str] | None = None
) -> dict[str, Any]:
    source_of: dict[str, str] = {}
    hits: dict[str, list[int | None]] = {f: [] for f in FIELDS}
    by_type: dict[str, list[int | None]] = {}
    confidences: dict[str, list[float]] = {f: [] for f in FIELDS}
    correct: dict[str, list[bool]] = {f: [] for f in FIELDS}
    latencies: list[float] = []
    for row in rows:
        expected = set(row["expected"])
        for field in FIELDS:
            prompt = row.get(field)
            if not prompt:
                continue
            command = RecommendLoRAsCommand(
                prompt=prompt, base_model=row["base_model"], max_loras=10, include_unavailable=True
            )
            start = time.perf_counter()
            result = c.commands.dispatch(
                command, DispatchContext(principal="eval", request_id=str(uuid.uuid4()))
            )
            latencies.append((time.perf_counter() - start) * 1000)
            recs = result.unwrap()
            ranked = []
            for rec in recs:
                source_of[rec.lora.id] = rec.lora.source_id
                ranked.append(rec.lora.source_id)
            hit = first_hit(ranked, expected)
            hits[field].append(hit)
            if types is not None:
                kind = types.get(row["expected"][0], "other")
                by_type.setdefault(f"{field}/{kind}", []).append(hit)
            for rec in list(recs)[:ECE_TOP]:
                confidences[field].append(rec.confidence)
                correct[field].append(rec.lora.source_id in expected)
    lat = np.array(latencies) if latencies else np.zeros(1)
    return {
        **{f: ranking_metrics(hits[f]) for f in FIELDS},
        "recall@5_by_type": {
            k: [ranking_metrics(v)["recall@5"], len(v)] for k, v in sorted(by_type.items())
        },
        "ece": expected_calibration_error(
            [x for f in FIELDS for x in confidences[f]], [x for f in FIELDS for x in correct[f]]
        ),
        "ece_by_field": {f: expected_calibration_error(confidences[f], correct[f]) for f in FIELDS},
        "latency_ms": {
            "p50": round(float(np.percentile(lat, 50)), 2),
            "p99": round(float(np.percentile(lat, 99)), 2),
        },
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--catalog", required=True, type=Path)
    parser.add_argument("--queries", required=True, type=Path)
    parser.add_argument("--history", type=Path)
    parser.add_argument("--limit", type=int, default=0, help="evaluate only the first N rows")
    parser.add_argument("--storage", choices=("sqlite", "memory"), default="sqlite")
    args = parser.parse_args(argv)
    rows = [json.loads(line) for line in args.queries.read_text().splitlines() if line.strip()]
    if args.limit:
        rows = rows[: args.limit]
    with tempfile.TemporaryDirectory(prefix="loracle-eval-") as tmp:
        url = "memory://" if args.storage == "memory" else ""
        c = bootstrap(Settings(data_dir=Path(tmp), storage_url=url), build_embedded_model=False)
        try:
            start = time.perf_counter()
            n = load_catalog(c, args.catalog)
            past = load_history(c, args.history) if args.history else 0
            c.projector.wait_for(c.store.max_position(), 600)
            print(
                f"loaded {n} LoRAs and {past} past generations in "
                f"{time.perf_counter() - start:.1f}s; evaluating {len(rows)} rows",
                file=sys.stderr,
            )
            types = lora_types(args.catalog)
            report = evaluate(c, rows, types)
            # The same service with a ranker that scores every candidate alike: the order is
            # then the first stage's.
            engine = c.recommender.engine
            shipped, engine.ranker = engine.ranker, Ranker.neutral()
            try:
                first = evaluate(c, rows, types)
            finally:
                engine.ranker = shipped
            report["first_stage"] = {k: first[k] for k in (*FIELDS, "recall@5_by_type")}
        finally:
            c.close()
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
