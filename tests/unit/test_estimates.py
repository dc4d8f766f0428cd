"""Job-time estimates from measured step costs, and how they travel through the broker."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from server.domain.generation_events import Queued
from server.domain.generation_job import GenerationJob
from server.domain.models import Architecture, BaseModelConfig
from server.infrastructure.broker.codec import to_payload, to_record
from server.infrastructure.diffusion.estimates import StepCosts, describe_seconds

MODEL = BaseModelConfig("m", Architecture.SD1, Path("/m"))


def job(**fields: Any) -> GenerationJob:
    base: dict[str, Any] = dict(
        generation_id="g", model=MODEL, prompt="p", original_prompt="p",
        width=64, height=64, steps=10, guidance_scale=7.0, seed=1,
    )  # fmt: skip
    return GenerationJob(**(base | fields))


def test_no_measurement_no_estimate() -> None:
    assert StepCosts().estimate(job()) is None


def test_a_measured_size_scales_with_steps_and_images() -> None:
    costs = StepCosts()
    costs.record("m", 64 * 64, images=2, steps=4, seconds=8.0)  # 1 s a step an image
    found = costs.estimate(job(steps=10, num_images=3))
    assert found is not None
    assert found.seconds == pytest.approx(30.0)
    assert found.seconds_per_step == pytest.approx(3.0)


def test_with_one_size_known_another_scales_by_pixels_to_the_1_5() -> None:
    costs = StepCosts()
    costs.record("m", 64 * 64, images=1, steps=1, seconds=1.0)
    found = costs.estimate(job(width=128, height=128, steps=1))
    assert found is not None
    assert found.seconds == pytest.approx(8.0)
    assert costs.estimate(job(model=BaseModelConfig("other", Architecture.SD1, Path("/o")))) is None


def test_two_known_sizes_fit_how_the_cost_grows() -> None:
    costs = StepCosts()
    costs.record("m", 64 * 64, images=1, steps=1, seconds=1.0)
    costs.record("m", 128 * 128, images=1, steps=1, seconds=16.0)  # pixels^2: attention-bound
    found = costs.estimate(job(width=256, height=256, steps=1))  # from 128x128, k = 2
    assert found is not None
    assert found.seconds == pytest.approx(256.0)


def test_the_fitted_growth_stays_between_linear_and_quadratic() -> None:
    costs = StepCosts()
    costs.record("m", 64 * 64, images=1, steps=1, seconds=1.0)
    costs.record("m", 128 * 128, images=1, steps=1, seconds=1.0)  # noise: no growth at all
    found = costs.estimate(job(width=256, height=256, steps=1))
    assert found is not None
    assert found.seconds == pytest.approx(4.0)  # k clamped to 1


def test_repeated_measurements_are_smoothed() -> None:
    costs = StepCosts()
    costs.record("m", 4096, images=1, steps=1, seconds=1.0)
    costs.record("m", 4096, images=1, steps=1, seconds=3.0)
    found = costs.estimate(job(steps=1))
    assert found is not None
    assert found.seconds == pytest.approx(2.0)


@pytest.mark.parametrize(
    ("seconds", "text"),
    [(12.4, "about 12 s"), (336, "about 5 min 36 s"), (7500, "about 2 h 5 min")],
)
def test_durations_read_as_a_person_says_them(seconds: float, text: str) -> None:
    assert describe_seconds(seconds) == text


def test_the_estimate_travels_through_the_broker() -> None:
    queued = Queued(2, 95.5, "this generation will take about 1 min 36 s once it starts")
    assert to_payload(to_record("g", 1, queued)) == queued
    assert to_payload(to_record("g", 1, Queued(0))) == Queued(0)
