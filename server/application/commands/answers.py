"""The views a command answers with, as the plain data its idempotency record stores, and
back: a retry rebuilds exactly the first answer, whatever happened to the entity since."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from server.domain.generation import GenerationState, GenerationView, ImageRecord
from server.domain.lora import file_from_dict, file_to_dict, metadata_from_dict, metadata_to_dict
from server.domain.models import LoraSource, LoraView
from server.domain.recommendation import LoRARecommendation


def _time(value: datetime | None) -> str | None:
    return None if value is None else value.isoformat()


def _time_from(value: object) -> datetime | None:
    return None if value is None else datetime.fromisoformat(str(value))


def lora_to_dict(view: LoraView) -> dict[str, Any]:
    return {
        "id": view.id,
        "metadata": metadata_to_dict(view.metadata),
        "source": view.source.value,
        "source_id": view.source_id,
        "file": None if view.file is None else file_to_dict(view.file),
        "available": view.available,
        "create_time": _time(view.create_time),
        "update_time": _time(view.update_time),
        "version": view.version,
    }


def lora_from_dict(d: dict[str, Any]) -> LoraView:
    file = d.get("file")
    return LoraView(
        id=str(d["id"]),
        metadata=metadata_from_dict(d["metadata"]),
        source=LoraSource(str(d["source"])),
        source_id=str(d.get("source_id", "")),
        file=None if file is None else file_from_dict(file),
        available=bool(d.get("available", False)),
        create_time=_time_from(d.get("create_time")),
        update_time=_time_from(d.get("update_time")),
        version=int(d.get("version", 0)),
    )


def recommendation_to_dict(rec: LoRARecommendation) -> dict[str, Any]:
    return {
        "lora": lora_to_dict(rec.lora),
        "confidence": rec.confidence,
        "weight": rec.weight,
        "trigger_words": list(rec.trigger_words),
        "reasons": list(rec.reasons),
    }


def recommendation_from_dict(d: dict[str, Any]) -> LoRARecommendation:
    return LoRARecommendation(
        lora_from_dict(d["lora"]),
        float(d["confidence"]),
        float(d["weight"]),
        tuple(str(w) for w in d.get("trigger_words", ())),
        tuple(str(r) for r in d.get("reasons", ())),
    )


def generation_to_dict(view: GenerationView) -> dict[str, Any]:
    return {
        "id": view.id,
        "state": view.state.value,
        "spec": view.spec,
        "images": [i.to_dict() for i in view.images],
        "error": view.error,
        "timings": dict(view.timings),
        "create_time": _time(view.create_time),
        "end_time": _time(view.end_time),
        "version": view.version,
        "owner": view.owner,
    }


def generation_from_dict(d: dict[str, Any]) -> GenerationView:
    return GenerationView(
        id=str(d["id"]),
        state=GenerationState(str(d["state"])),
        spec=dict(d.get("spec", {})),
        images=tuple(ImageRecord.from_dict(i) for i in d.get("images", ())),
        error=str(d.get("error", "")),
        timings={str(k): float(v) for k, v in dict(d.get("timings", {})).items()},
        create_time=_time_from(d.get("create_time")),
        end_time=_time_from(d.get("end_time")),
        version=int(d.get("version", 0)),
        owner=str(d.get("owner", "")),
    )
