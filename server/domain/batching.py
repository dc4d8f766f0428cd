"""Which jobs share one denoising loop. One policy for the in-process executor and the
cluster worker: the key is derived here, once, and travels with a job through the broker."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from server.domain.generation_job import GenerationJob

BatchKey = str
T = TypeVar("T")


def batch_key(job: GenerationJob) -> BatchKey:
    """Equal keys batch: everything the denoising loop shares, each under a name, so two
    keys say why their jobs cannot share a call (`why_apart`). The presence of a negative
    prompt is part of it because SDXL zeroes an absent one. img2img and inpainting jobs
    batch among their own kind at one strength: their images and masks are per row, and an
    inpainting job's "only masked" crop is scaled to the shared size. ControlNets, their
    weights and step ranges are shared; control images are per row. LoRAs are per row too
    (jobs asking for different ones run as one batch of per-row deltas: the executor's
    row_loras), so they are not in the key. A model family can add
    fields of its own (`BaseModelConfig.batch_fields`). Text, so a replica can put it in a
    broker message and a worker compare it without rebuilding the job."""
    fields: dict[str, object] = {
        "model": job.model.name,
        "size": [job.width, job.height],
        "steps": job.steps,
        "scheduler": job.scheduler,
        "guidance_scale": job.guidance_scale,
        "negative_prompt": bool(job.negative_prompt),
        # Input images and masks are per row; the mode and how much is noised are not.
        "mode": job.mode,
        "strength": job.strength,
        "hires": None if job.hires is None else job.hires.record(),
        "controls": [c.shared() for c in job.controls],
    }
    for name in job.model.batch_fields:
        fields[name] = getattr(job, name)
    return json.dumps(fields, sort_keys=True)


def why_apart(key: BatchKey, other: BatchKey) -> list[str]:
    """The names of the fields in which two batch keys differ (none: they batch)."""
    a, b = json.loads(key), json.loads(other)
    return sorted(name for name in a.keys() | b.keys() if a.get(name) != b.get(name))


@dataclass
class Batch(Generic[T]):
    """The oldest waiting job and the compatible ones that join it, up to `max_images`
    images. A job larger than the limit on its own still runs, alone."""

    max_images: int
    key: BatchKey | None = None
    images: int = 0
    members: list[T] = field(default_factory=list)

    def offer(self, member: T, key: BatchKey, images: int) -> bool:
        """Adds `member` when the batch is empty, or when its key matches and it fits."""
        if self.key is not None and (key != self.key or self.images + images > self.max_images):
            return False
        self.key = key
        self.images += images
        self.members.append(member)
        return True

    @property
    def full(self) -> bool:
        return self.images >= self.max_images
