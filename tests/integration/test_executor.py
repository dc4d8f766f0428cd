"""The executor on its own, with the tiny SD1.5 pipeline: running out of device memory fails
that job with RESOURCE_EXHAUSTED and the next one runs; the device budget unloads the least
recently used model."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from server.application.context import DispatchContext
from server.application.generation.jobs import GenerationJobs
from server.domain import generation_events as gen
from server.domain.errors import ResourceExhaustedError
from server.domain.models import Architecture, BaseModelConfig
from server.infrastructure.diffusion.executor import DiffusionExecutor
from server.infrastructure.diffusion.placeholder import build_tiny_sd15
from server.infrastructure.diffusion.registry import load_pipeline
from tests.support import generation_job

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_sd15(tmp_path_factory.mktemp("models") / "sd")


class RunsOutOfMemoryOnce:
    """Stands in for a pipeline whose first call exhausts the GPU (torch raises the same
    OutOfMemoryError type on every device)."""

    def __init__(self, pipe: Any) -> None:
        object.__setattr__(self, "_pipe", pipe)
        object.__setattr__(self, "calls", 0)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._pipe, name)

    def __setattr__(self, name: str, value: Any) -> None:
        setattr(self._pipe, name, value)

    def __call__(self, **kwargs: Any) -> Any:
        object.__setattr__(self, "calls", self.calls + 1)
        if self.calls == 1:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return self._pipe(**kwargs)


@pytest.fixture
def executor_factory() -> Iterator[list[DiffusionExecutor]]:
    made: list[DiffusionExecutor] = []
    yield made
    for executor in made:
        executor.stop()


def test_out_of_memory_fails_that_job_and_the_executor_keeps_serving(
    folder: Path, executor_factory: list[DiffusionExecutor]
) -> None:
    model = BaseModelConfig("sd", Architecture.SD1, folder)
    executor = DiffusionExecutor(
        loader=lambda m, device, dtype: RunsOutOfMemoryOnce(load_pipeline(m, device=device))
    )
    executor_factory.append(executor)
    executor.start()
    first = list(executor.submit(generation_job(model)).events())
    failed = first[-1].payload
    assert isinstance(failed, gen.Failed)
    assert failed.reason == "OUT_OF_DEVICE_MEMORY"
    assert "out of device memory" in failed.error
    assert executor.stats.out_of_memory == 1
    second = list(executor.submit(generation_job(model)).events())
    assert isinstance(second[-1].payload, gen.Completed)


def test_the_stream_of_an_out_of_memory_job_ends_with_resource_exhausted(
    folder: Path, executor_factory: list[DiffusionExecutor]
) -> None:
    model = BaseModelConfig("sd", Architecture.SD1, folder)
    executor = DiffusionExecutor(
        loader=lambda m, device, dtype: RunsOutOfMemoryOnce(load_pipeline(m, device=device))
    )
    executor_factory.append(executor)
    executor.start()
    handle = executor.submit(generation_job(model))
    seen: list[gen.GenerationEvent] = []
    with pytest.raises(ResourceExhaustedError) as err:
        seen.extend(GenerationJobs.stream(handle, DispatchContext()))
    assert isinstance(seen[-1].payload, gen.Failed)  # clients get the event, then the status
    assert err.value.retry_after_seconds > 0


def test_the_device_budget_unloads_the_least_recently_used_model(
    folder: Path, executor_factory: list[DiffusionExecutor]
) -> None:
    a = BaseModelConfig("a", Architecture.SD1, folder, vram_budget_gb=0.6)
    b = BaseModelConfig("b", Architecture.SD1, folder, vram_budget_gb=0.6)
    executor = DiffusionExecutor(device_budget_gb=1.0)
    executor_factory.append(executor)
    executor.start()
    for model, resident in ((a, ["a"]), (b, ["b"]), (a, ["a"])):
        events = list(executor.submit(generation_job(model)).events())
        assert isinstance(events[-1].payload, gen.Completed)
        assert executor.loaded_models() == resident
    assert executor.stats.model_evictions == 2
    assert executor.stats.model_loads == 3
    roomy = DiffusionExecutor(device_budget_gb=2.0)
    executor_factory.append(roomy)
    roomy.start()
    for model in (a, b, a):
        list(roomy.submit(generation_job(model)).events())
    assert roomy.loaded_models() == ["b", "a"]  # least recently used first
    assert roomy.stats.model_loads == 2


def test_a_job_hears_how_long_it_will_take_from_what_this_server_measured(
    folder: Path, executor_factory: list[DiffusionExecutor]
) -> None:
    model = BaseModelConfig("sd", Architecture.SD1, folder)
    # Every job counts as slow here, and sizes above 48x48 are worth timing the model for.
    executor = DiffusionExecutor(slow_job_seconds=0.0, calibration_sides=(32, 48))
    executor_factory.append(executor)
    executor.start()
    first = list(executor.submit(generation_job(model)).events())
    queued = first[0].payload
    assert isinstance(queued, gen.Queued)
    assert (queued.estimated_seconds, queued.warning) == (0.0, "")  # nothing measured yet
    # Before its work starts, two steps at 32x32 and at 48x48 time the model: the job hears
    # the warning in a last queued event.
    kinds = [type(e.payload) for e in first]
    before_start = first[kinds.index(gen.Started) - 1].payload
    assert isinstance(before_start, gen.Queued)
    assert before_start.estimated_seconds > 0
    assert "this generation will take about" in before_start.warning
    assert isinstance(first[-1].payload, gen.Completed)
    small = list(executor.submit(generation_job(model, steps=4)).events())
    bigger = list(executor.submit(generation_job(model, width=128, height=128, steps=4)).events())
    estimate_small, estimate_big = small[0].payload, bigger[0].payload
    assert isinstance(estimate_small, gen.Queued)
    assert isinstance(estimate_big, gen.Queued)
    assert estimate_small.estimated_seconds > 0
    # Four times the pixels cost 4^1.5 = 8 times as much per step, by the scaling rule.
    assert estimate_big.estimated_seconds > 4 * estimate_small.estimated_seconds
    assert "this generation will take about" in estimate_big.warning
    warned = [e for e in bigger if isinstance(e.payload, gen.Queued) and e.payload.warning]
    assert len(warned) == 1  # queued with its estimate: warned once, not again at the start
