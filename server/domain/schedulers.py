"""Scheduler (sampler) names a request may use. Requests speak A1111's vocabulary; the
executor builds the diffusers class from the model's own scheduler config, so a model's
training-time settings (beta schedule, prediction type) carry over to every sampler."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True, slots=True)
class SchedulerChoice:
    name: str
    diffusers_class: str
    a1111_label: str
    options: dict[str, object] = field(default_factory=dict)


SCHEDULERS: dict[str, SchedulerChoice] = {
    c.name: c
    for c in (
        SchedulerChoice("euler", "EulerDiscreteScheduler", "Euler"),
        SchedulerChoice("euler_a", "EulerAncestralDiscreteScheduler", "Euler a"),
        SchedulerChoice("dpmpp_2m", "DPMSolverMultistepScheduler", "DPM++ 2M"),
        SchedulerChoice(
            "dpmpp_2m_karras",
            "DPMSolverMultistepScheduler",
            "DPM++ 2M Karras",
            {"use_karras_sigmas": True},
        ),
        SchedulerChoice("ddim", "DDIMScheduler", "DDIM"),
        # PLMS proper, as in Stable Diffusion's own scheduler configs: without it PNDM adds
        # Runge-Kutta warm-up steps and fails outright below 4 steps.
        SchedulerChoice("pndm", "PNDMScheduler", "PLMS", {"skip_prk_steps": True}),
        SchedulerChoice("lms", "LMSDiscreteScheduler", "LMS"),
        SchedulerChoice("heun", "HeunDiscreteScheduler", "Heun"),
        SchedulerChoice("unipc", "UniPCMultistepScheduler", "UniPC"),
        # Flow matching (FLUX): Forge labels it Euler, with the "Simple" schedule.
        SchedulerChoice("flow_euler", "FlowMatchEulerDiscreteScheduler", "Euler"),
    )
}
# What each kind of model can sample with: noise-prediction models (SD1, SD2, SDXL) take the
# classic samplers, flow-matching ones (FLUX) only flow-matching samplers.
FLOW_SCHEDULERS: tuple[str, ...] = ("flow_euler",)
NOISE_SCHEDULERS: tuple[str, ...] = tuple(n for n in SCHEDULERS if n not in FLOW_SCHEDULERS)

_LABELS = {c.diffusers_class: c.a1111_label for c in reversed(SCHEDULERS.values())}


def a1111_label(scheduler: str, default_class: str) -> str:
    """The `Sampler:` value A1111 writes for a request's scheduler ("" = the model's own)."""
    if scheduler in SCHEDULERS:
        return SCHEDULERS[scheduler].a1111_label
    return _LABELS.get(default_class, default_class or "Euler")
