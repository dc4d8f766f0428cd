"""Replays the dev warm history of ../shared/eval as a stream of recommend -> generate
sessions and prints R@5 on held-out warm queries as the stream goes, for the engine that
learns from answered recommendations beside the same stream recorded as plain generations.

    .venv/bin/python bench/replay_learning.py [--eval-dir ../shared/eval] [--queries 1500]

Each history row (a prompt, the LoRA it was generated with) becomes one session of one user:
the user asks for 5 recommendations with the prompt minus that LoRA's trigger words (someone
who does not know the LoRA yet, as `prompt_no_trigger` is built), then generates with the
full prompt and the LoRA. The session is linked by the service's own rule
(server.domain.recommend.feedback.link) and applied as the projector applies it:

- `plain`: the generation is recorded as history only (what the service did before);
- `learn`: the same, plus the answered recommendation's feedback (accepted / skipped);
- `accept_only`: the same, with the skips left out (what the skip signal adds);
- `skip_only`: the same, with the acceptances left out (what the acceptances add).

Sessions are shuffled with a fixed seed (the file is grouped by LoRA). R@5 is measured on a
seeded sample of dev_warm_queries.jsonl, both fields, at checkpoints of the stream, plus the
sessions' own hit rate (was the LoRA among the 5 recommended before it was used: what a user
of the stream saw) per segment. The last line printed is one JSON object."""

from __future__ import annotations

import argparse
import json
import random
import re
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from client.catalog import read_catalog_jsonl
from server.application.commands.import_catalog import (
    catalog_record_from_json,
    metadata_from_record,
)
from server.domain.lora import lora_id_for_source
from server.domain.models import Architecture, LoraSource, LoraView
from server.domain.recommend.engine import RecommendationEngine
from server.domain.recommend.feedback import MadeRecommendation, UsedLoras, link

ROOT = Path(__file__).resolve().parents[1]
FIELDS = ("prompt", "prompt_no_trigger")
CHECKPOINTS = (0.0, 0.1, 0.25, 0.5, 1.0)
VARIANTS = ("plain", "learn", "accept_only", "skip_only")
K = 5


def load_views(path: Path) -> tuple[list[LoraView], dict[str, tuple[str, ...]]]:
    views, triggers = [], {}
    for row in read_catalog_jsonl(path):
        record = catalog_record_from_json(row)
        lora_id = str(lora_id_for_source(record.source_id))
        views.append(
            LoraView(
                id=lora_id,
                metadata=metadata_from_record(record),
                source=LoraSource.CATALOG,
                source_id=record.source_id,
                available=True,
            )
        )
        triggers[lora_id] = record.trigger_words
    return views, triggers


def without_triggers(prompt: str, trigger_words: tuple[str, ...]) -> str:
    """The prompt minus every trigger phrase of the LoRA (case aside), as a user who does not
    know the LoRA would have typed it."""
    out = prompt
    for word in trigger_words:
        for phrase in word.split(","):
            phrase = phrase.strip()
            if phrase:
                out = re.sub(rf"(?<!\w){re.escape(phrase)}(?!\w)", " ", out, flags=re.IGNORECASE)
    return re.sub(r"\s*,(\s*,)+", ",", re.sub(r"[ \t]+", " ", out)).strip(" ,")


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def recall_at_k(engine: RecommendationEngine, rows: list[dict[str, Any]]) -> dict[str, float]:
    out = {}
    for field in FIELDS:
        hits = total = 0
        for row in rows:
            prompt = row.get(field)
            if not prompt:
                continue
            expected = {str(lora_id_for_source(s)) for s in row["expected"]}
            recs = engine.recommend(prompt, Architecture.SD1, max_loras=K, include_unavailable=True)
            hits += any(r.lora.id in expected for r in recs)
            total += 1
        out[field] = round(hits / max(total, 1), 4)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--eval-dir", default=str(ROOT.parent / "shared" / "eval"))
    parser.add_argument("--queries", type=int, default=1500, help="warm queries sampled (0: all)")
    parser.add_argument("--sessions", type=int, default=0, help="first N sessions (0: all)")
    parser.add_argument("--seed", type=int, default=17)
    parser.add_argument(
        "--variants",
        default="plain,learn,accept_only",
        help=f"comma-separated, of {', '.join(VARIANTS)} (each engine runs alone: figures of "
        "one variant are the same in any run with the same seed and sizes)",
    )
    args = parser.parse_args()
    eval_dir = Path(args.eval_dir)
    if not (eval_dir / "dev_history.jsonl").exists():
        print(f"skipped: no eval data under {eval_dir}", file=sys.stderr)
        return 0
    views, triggers = load_views(eval_dir / "civitai_loras.jsonl")
    chosen = args.variants.split(",")
    if not chosen or set(chosen) - set(VARIANTS):
        parser.error(f"--variants: choose among {', '.join(VARIANTS)}")
    engines = {name: RecommendationEngine() for name in chosen}
    for engine in engines.values():
        for view in views:
            engine.upsert(view)
    rng = random.Random(args.seed)
    sessions = read_jsonl(eval_dir / "dev_history.jsonl")
    rng.shuffle(sessions)
    if args.sessions:
        sessions = sessions[: args.sessions]
    queries = read_jsonl(eval_dir / "dev_warm_queries.jsonl")
    if args.queries and args.queries < len(queries):
        queries = rng.sample(queries, args.queries)
    marks = sorted({round(p * len(sessions)) for p in CHECKPOINTS})
    curve: list[dict[str, Any]] = []
    online: list[dict[str, Any]] = []
    hits = {name: 0 for name in engines}
    counted = 0
    linked = accepted = 0
    start = time.perf_counter()
    t0 = datetime(2026, 12, 7, tzinfo=UTC)

    def checkpoint(done: int) -> None:
        point: dict[str, Any] = {"sessions": done, "share": round(done / len(sessions), 3)}
        first = None
        for name, engine in engines.items():
            # Before the first session every variant is the same engine: measured once.
            point[name] = first if done == 0 and first is not None else recall_at_k(engine, queries)
            first = point[name]
        curve.append(point)
        print(json.dumps(point), f"({time.perf_counter() - start:.0f}s)", file=sys.stderr)

    for done, row in enumerate(sessions):
        if done in marks:
            checkpoint(done)
            if done:
                online.append(
                    {
                        "until": done,
                        **{n: round(h / max(counted, 1), 4) for n, h in hits.items()},
                    }
                )
                hits = {name: 0 for name in engines}
                counted = 0
        lora_ids = tuple(str(lora_id_for_source(s)) for s in row["loras"])
        asked = without_triggers(row["prompt"], triggers.get(lora_ids[0], ()))
        at = t0 + timedelta(minutes=10 * done)
        for name, engine in engines.items():
            recs = (
                engine.recommend(asked, Architecture.SD1, max_loras=K, include_unavailable=True)
                if asked
                else []
            )
            if asked:
                hits[name] += any(r.lora.id in lora_ids for r in recs)
            engine.record_generation(row["prompt"], lora_ids)
            if name == "plain" or not asked:
                continue
            made = MadeRecommendation(f"r{done}", "user", asked, tuple(r.lora.id for r in recs), at)
            generation = UsedLoras("user", row["prompt"], lora_ids, at + timedelta(minutes=1))
            found = link(done, generation, [made])
            if found is None:
                continue
            if name == chosen[-1]:
                linked += 1
                accepted += bool(found.accepted)
            engine.record_feedback(
                found.prompt,
                () if name == "skip_only" else found.accepted,
                () if name == "accept_only" else found.skipped,
            )
        counted += bool(asked)
    online.append(
        {"until": len(sessions), **{n: round(h / max(counted, 1), 4) for n, h in hits.items()}}
    )
    checkpoint(len(sessions))
    report = {
        "sessions": len(sessions),
        "linked_in": chosen[-1],  # sessions linked / accepted in the last variant run
        "linked": linked,
        "accepted": accepted,
        "queries": len(queries),
        "recall@5": curve,
        "session_hit@5": online,
        "seconds": round(time.perf_counter() - start, 1),
    }
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
