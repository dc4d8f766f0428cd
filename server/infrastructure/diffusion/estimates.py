"""How long a job will take, from what this server measured: seconds per denoising step per
image, per model and image size. A job at a size not measured yet is scaled from the nearest
measured size by pixels^k: convolutions grow with the pixels, self-attention with their
square, so k lies between 1 and 2 and is fitted from the two measured sizes nearest the job
(1.5 while only one is known). A model that has run nothing yet has no estimate."""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass

from server.domain.generation_job import GenerationJob

# Between convolution cost (pixels^1) and attention cost (pixels^2), until two sizes fit it.
SIZE_EXPONENT = 1.5
# New measurements weigh this much against what was known: sizes are re-measured often.
SMOOTHING = 0.5


@dataclass(frozen=True, slots=True)
class Estimate:
    seconds: float
    seconds_per_step: float  # for the whole job (all its images)


class StepCosts:
    """Written by the executor thread after each batch, read by submitting threads."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._per_step_image: dict[str, dict[int, float]] = {}

    def record(self, model: str, pixels: int, images: int, steps: int, seconds: float) -> None:
        if images <= 0 or steps <= 0 or seconds <= 0:
            return
        cost = seconds / (steps * images)
        with self._lock:
            sizes = self._per_step_image.setdefault(model, {})
            known = sizes.get(pixels)
            sizes[pixels] = cost if known is None else SMOOTHING * cost + (1 - SMOOTHING) * known

    def estimate(self, job: GenerationJob) -> Estimate | None:
        pixels = job.width * job.height
        with self._lock:
            sizes = dict(self._per_step_image.get(job.model.name, {}))
        if not sizes:
            return None
        by_distance = sorted(sizes, key=lambda p: abs(math.log(p / pixels)))
        nearest = by_distance[0]
        exponent = SIZE_EXPONENT
        if len(by_distance) > 1:
            other = by_distance[1]
            fitted = math.log(sizes[other] / sizes[nearest]) / math.log(other / nearest)
            exponent = min(2.0, max(1.0, fitted))
        per_image = sizes[nearest] * (pixels / nearest) ** exponent
        per_step = per_image * job.num_images
        return Estimate(per_step * job.steps, per_step)


def describe_seconds(seconds: float) -> str:
    """`about 5 min 36 s`, `about 2 h 5 min`: for a warning a person reads."""
    total = round(seconds)
    if total < 60:
        return f"about {total} s"
    minutes, secs = divmod(total, 60)
    if minutes < 60:
        return f"about {minutes} min {secs} s"
    hours, minutes = divmod(minutes, 60)
    return f"about {hours} h {minutes} min"
