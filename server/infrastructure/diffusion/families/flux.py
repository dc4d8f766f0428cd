"""FLUX.1 (dev and schnell): a flow-matching transformer on 16-channel latents packed in 2x2
patches, a CLIP text encoder (pooled) and a T5 one (the sequence). Guidance-distilled: the
request's guidance is the guidance the transformer embeds, and there is no negative prompt."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from server.domain.generation_job import Mode
from server.domain.models import Architecture, BaseModelConfig, GenerationDefaults
from server.domain.schedulers import FLOW_SCHEDULERS
from server.infrastructure.diffusion.conditioning import ConditionedGroup, RowScope, all_rows
from server.infrastructure.diffusion.families.base import (
    BatchRows,
    CheckpointPart,
    ModelFamily,
    StepCallback,
    flow_matching_img2img_steps,
    transformer_call,
)
from server.infrastructure.diffusion.families.transformer_file import (
    StateDict,
    load_transformer_file,
)
from server.infrastructure.diffusion.transformer_conditioning import encode_flux

TRANSFORMER = CheckpointPart(
    "the FLUX transformer (double_blocks.*)",
    ("double_blocks.", "model.diffusion_model.double_blocks."),
)


class Flux(ModelFamily):
    architectures = (Architecture.FLUX,)
    pipeline_classes = frozenset({"FluxPipeline"})
    components = (
        "transformer",
        "vae",
        "text_encoder",
        "text_encoder_2",
        "tokenizer",
        "tokenizer_2",
        "scheduler",
    )
    # FLUX.1-dev's: 28 steps at a distilled guidance of 3.5.
    defaults = GenerationDefaults(1024, 1024, 28, 3.5)
    denoiser = "transformer"
    compiled_blocks = ("FluxTransformerBlock", "FluxSingleTransformerBlock")
    lora_components = ("transformer", "text_encoder")
    mode_pipelines = {
        Mode.IMAGE_TO_IMAGE: "FluxImg2ImgPipeline",
        Mode.INPAINT: "FluxInpaintPipeline",
    }
    # InstantX/Shakker-Labs-style FLUX ControlNets (diffusers folders), Union ones too.
    controlnet_pipelines = {
        Mode.TEXT_TO_IMAGE: "FluxControlNetPipeline",
        Mode.IMAGE_TO_IMAGE: "FluxControlNetImg2ImgPipeline",
        Mode.INPAINT: "FluxControlNetInpaintPipeline",
    }
    # diffusers' FLUX ControlNet img2img treats latents given as `image` as pixels.
    latent_hires_controlled = False
    controlnet_class = "FluxControlNetModel"
    multi_controlnet_class = "FluxMultiControlNetModel"
    schedulers = FLOW_SCHEDULERS
    # True CFG runs two transformer passes a step where plain FLUX runs one.
    batch_fields = ("true_cfg_scale",)
    size_multiple = 16  # 8x VAE, 2x2 patches
    takes_negative_prompt = False
    distilled_guidance = True
    # A single file is BFL's transformer (safetensors or GGUF); the rest is config_dir's.
    denoiser_file = True
    # Least-squares fit of latent -> RGB published with ComfyUI (16 channels).
    preview_factors = (
        (-0.0346, 0.0244, 0.0681),
        (0.0034, 0.0210, 0.0687),
        (0.0275, -0.0668, -0.0433),
        (-0.0174, 0.0160, 0.0617),
        (0.0859, 0.0721, 0.0329),
        (0.0004, 0.0383, 0.0115),
        (0.0405, 0.0861, 0.0915),
        (-0.0236, -0.0185, -0.0259),
        (-0.0245, 0.0250, 0.1180),
        (0.1008, 0.0755, -0.0421),
        (-0.0515, 0.0201, 0.0011),
        (0.0428, -0.0012, -0.0036),
        (0.0817, 0.0765, 0.0749),
        (-0.1264, -0.0522, -0.1103),
        (-0.0280, -0.0881, -0.0499),
        (-0.1262, -0.0982, -0.0778),
    )
    preview_bias = (-0.0329, -0.0718, -0.0851)

    def checkpoint_parts(self, architecture: Architecture) -> tuple[CheckpointPart, ...]:
        return (TRANSFORMER,)

    def img2img_steps(self, steps: int, strength: float) -> int:
        return flow_matching_img2img_steps(steps, strength)

    def pipeline_class(self) -> Any:
        from diffusers import FluxPipeline

        return FluxPipeline

    def load_single_file(self, config: BaseModelConfig, torch_dtype: Any) -> Any:
        from diffusers import FluxTransformer2DModel

        return load_transformer_file(
            config,
            torch_dtype,
            transformer_class=FluxTransformer2DModel,
            pipeline_class=self.pipeline_class(),
            convert=bfl_to_diffusers,
        )

    def preview_latents(self, pipe: Any, latents: Any, width: int, height: int) -> Any:
        """(rows, patches, 64) packed latents -> (rows, 16, h, w)."""
        if latents.dim() != 3:
            return latents
        return pipe._unpack_latents(latents, height, width, pipe.vae_scale_factor)

    def encode(
        self,
        pipe: Any,
        prompts: Sequence[str],
        negative_prompts: Sequence[str],
        scope: RowScope = all_rows,
    ) -> list[ConditionedGroup]:
        """A1111's syntax on CLIP (pooled) and T5 (sequence): transformer_conditioning.py."""
        return encode_flux(pipe, prompts, negative_prompts, scope)

    def denoise(self, pipe: Any, rows: BatchRows, on_step: StepCallback) -> Sequence[Any]:
        """The rows' embeddings (`encode`); guidance_scale is the embedded guidance. A
        negative prompt is passed only with true CFG (the application refuses one
        otherwise), whose diffusers switch is a negative prompt being given at all: when no
        row has one, the pipeline encodes empty ones itself."""
        prompts = dict(rows.conditioning)
        negative = {k: prompts.pop(k) for k in list(prompts) if k.startswith("negative_")}
        true_cfg = rows.job.true_cfg_scale
        if true_cfg <= 1:
            return transformer_call(pipe, rows, on_step, **prompts)
        negative = negative or {"negative_prompt": [""] * len(rows.prompts)}
        return transformer_call(pipe, rows, on_step, **prompts, **negative, true_cfg_scale=true_cfg)


# The width (3 x 3072 + 4 x 3072) diffusers 0.42 splits every single block's fused linear1 at.
_FLUX1_LINEAR1_ROWS = 3 * 3072 + 4 * 3072
_COMFY_PREFIX = "model.diffusion_model."


def bfl_to_diffusers(checkpoint: StateDict) -> StateDict:
    """diffusers' conversion of BFL's layout, except for the split of each single block's
    fused linear1 (q, k, v, MLP), which diffusers does at FLUX.1's width (3072) whatever the
    file: it is done here at the file's own width (`img_in`'s outputs). diffusers is handed a
    weightless placeholder of the width it expects in its place, and its results for those
    keys are replaced. For FLUX.1 files the outcome is diffusers' own; narrower transformers
    (the tiny ones tests build) load too. Quantized GGUF rows split the same way."""
    import torch
    from diffusers.loaders.single_file_utils import (
        convert_flux_transformer_checkpoint_to_diffusers,
    )

    state = {key.removeprefix(_COMFY_PREFIX): value for key, value in checkpoint.items()}
    width = int(state["img_in.weight"].shape[0])
    split: StateDict = {}
    for key in [k for k in state if k.startswith("single_blocks.") and ".linear1." in k]:
        fused = state[key]
        _, block, _, kind = key.split(".")
        rows = [width, width, width, int(fused.shape[0]) - 3 * width]
        names = ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp")
        for name, part in zip(names, torch.split(fused, rows, dim=0), strict=True):
            split[f"single_transformer_blocks.{block}.{name}.{kind}"] = part
        state[key] = torch.empty(_FLUX1_LINEAR1_ROWS, device="meta")
    converted: StateDict = convert_flux_transformer_checkpoint_to_diffusers(state)
    return converted | split
