"""Shared test helpers: real components wired for tests, and small fakes for unit tests."""

from __future__ import annotations

import io
import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import psycopg
from PIL import Image

from server.application.commands import GenerateImageCommand, GenerationRequest
from server.application.context import DispatchContext
from server.bootstrap import Container, bootstrap
from server.config import Settings
from server.domain import generation_events as gen
from server.domain.generation_job import GenerationJob
from server.domain.models import BaseModelConfig

POSTGRES_URL = os.environ.get("LORACLE_TEST_POSTGRES_URL", "")


def sqlite_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'loracle.db'}"


@contextmanager
def postgres_schema() -> Iterator[str]:
    """A throwaway schema in the test PostgreSQL; yields a storage URL that uses it."""
    if not POSTGRES_URL:
        raise RuntimeError("LORACLE_TEST_POSTGRES_URL is not set (make test sets it)")
    schema = f"t_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(
        POSTGRES_URL.replace("postgresql+psycopg", "postgresql"), autocommit=True
    ) as conn:
        conn.execute(f"CREATE SCHEMA {schema}")
    try:
        yield f"{POSTGRES_URL}?schema={schema}"
    finally:
        with psycopg.connect(POSTGRES_URL, autocommit=True) as conn:
            conn.execute(f"DROP SCHEMA {schema} CASCADE")


def make_container(tmp_path: Path, storage_url: str = "", **kwargs: object) -> Container:
    roots = (tmp_path / "loras",)
    roots[0].mkdir(parents=True, exist_ok=True)
    settings = Settings(
        data_dir=tmp_path, storage_url=storage_url or sqlite_url(tmp_path), lora_roots=roots
    )
    # Unit and integration tests do not need the embedded model; building it in every
    # container would only burn CPU (tests/integration/test_models.py builds it on purpose).
    kwargs.setdefault("build_embedded_model", False)
    return bootstrap(settings, **kwargs)  # type: ignore[arg-type]


def generation_job(model: BaseModelConfig, **fields: Any) -> GenerationJob:
    """A small, quick text-to-image job on `model` (64x64, 2 steps); `fields` override."""
    base: dict[str, Any] = {
        "generation_id": str(uuid.uuid4()),
        "model": model,
        "prompt": "a fox",
        "original_prompt": "a fox",
        "width": 64,
        "height": 64,
        "steps": 2,
        "guidance_scale": 7.0,
        "seed": 1,
    }
    return GenerationJob(**{**base, **fields})


def streamed_events(
    c: Container, request: GenerationRequest, context: DispatchContext
) -> list[gen.GenerationEvent]:
    """A GenerateImage stream's events, checked to have succeeded."""
    events = list(c.commands.stream(GenerateImageCommand(request=request), context))
    failed = [e.payload for e in events if isinstance(e.payload, gen.Failed)]
    assert not failed, failed
    return events


def image_of(events: list[gen.GenerationEvent]) -> Image.Image:
    """The image a generation streamed, from its chunks."""
    data = b"".join(e.payload.data for e in events if isinstance(e.payload, gen.ImageChunk))
    return Image.open(io.BytesIO(data))


def pixels(events: list[gen.GenerationEvent]) -> np.ndarray[Any, np.dtype[np.int16]]:
    """The streamed image's pixels, signed so that differences do not wrap."""
    return np.asarray(image_of(events), dtype=np.int16)


def png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return buffer.getvalue()
