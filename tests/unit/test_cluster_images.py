"""Input images in cluster mode: they travel inside the job message and come out as they
went in; a job larger than the broker carries is INVALID_ARGUMENT before anything is
recorded or queued."""

from __future__ import annotations

import hashlib
import uuid
from dataclasses import replace
from pathlib import Path

import pytest

from server.domain.errors import ValidationError
from server.domain.generation_job import GenerationJob, HiresFix, InputImage, Mode, ResolvedLora
from server.infrastructure.broker.codec import Who, decode_job, encode_job
from server.infrastructure.broker.replica import BrokerExecutor
from tests.unit.fake_broker import FakeBroker
from tests.unit.fake_executor import ready_model


def image(data: bytes, **fields: object) -> InputImage:
    return InputImage(
        data=data,
        sha256=hashlib.sha256(data).hexdigest(),
        width=64,
        height=48,
        **fields,  # type: ignore[arg-type]
    )


def inpainting_job(size: int = 100) -> GenerationJob:
    return GenerationJob(
        generation_id=str(uuid.uuid4()),
        model=ready_model("tiny").config,
        prompt="p",
        original_prompt="p",
        width=64,
        height=48,
        steps=2,
        guidance_scale=1.0,
        seed=1,
        owner="alice",
        init_image=image(bytes(range(256)) * (size // 256 + 1), generation_id="g", image_index=2),
        strength=0.6,
        mask_image=image(b"\x00\xff" * 50),
        mask_blur=3,
        inpaint_only_masked=True,
        inpaint_padding=16,
    )


def test_input_images_and_their_settings_travel_in_the_job_message() -> None:
    job = inpainting_job()
    again = decode_job(encode_job(job, Who("alice"))).job(job.model, (), job.chunk_size)
    assert again == job
    assert again.mode == Mode.INPAINT
    plain = replace(job, init_image=None, mask_image=None, strength=0.0)
    assert decode_job(encode_job(plain, Who("alice"))).job(plain.model, (), plain.chunk_size) == (
        replace(plain, mask_blur=0, inpaint_only_masked=False, inpaint_padding=0)
    )


def test_a_job_larger_than_a_broker_message_is_refused_before_anything_is_queued() -> None:
    broker = FakeBroker()
    broker.max_payload = 64 * 1024
    accepted: list[int] = []
    with pytest.raises(ValidationError) as err:
        BrokerExecutor(broker).submit(inpainting_job(100 * 1024), accepted.append)
    assert err.value.violations[0].field == "spec.init_image"
    assert "65,536 bytes (NATS max_payload)" in err.value.violations[0].description
    assert accepted == []  # nothing recorded
    assert broker.enqueued == []
    BrokerExecutor(broker).submit(inpainting_job(1024), accepted.append)
    assert len(broker.enqueued) == 1


def test_a_hires_fix_travels_in_the_job_message() -> None:
    job = replace(
        inpainting_job(),
        init_image=None,
        mask_image=None,
        strength=0.0,
        mask_blur=0,
        inpaint_only_masked=False,
        inpaint_padding=0,
        hires=HiresFix(scale=2.0, steps=5, denoising_strength=0.45, upscaler="Lanczos"),
    )
    assert decode_job(encode_job(job, Who("alice"))).job(job.model, (), job.chunk_size) == job
    # With a transformer family's multiple and FLUX's true CFG, which a worker must honour.
    assert job.hires is not None
    job = replace(job, hires=replace(job.hires, multiple=16), true_cfg_scale=4.0)
    assert decode_job(encode_job(job, Who("alice"))).job(job.model, (), job.chunk_size) == job


def test_controls_travel_by_controlnet_name_with_their_images() -> None:
    from pathlib import Path

    from server.domain.generation_job import ControlInput
    from server.domain.models import Architecture, ControlNetConfig

    here = ControlNetConfig("canny", Architecture.SD1, Path("/replica/canny"))
    there = ControlNetConfig("canny", Architecture.SD1, Path("/worker/cn/canny"))
    control = ControlInput(
        controlnet=here,
        image=image(b"edges"),
        scale=0.7,
        guidance_start=0.1,
        guidance_end=0.9,
    )
    job = replace(inpainting_job(), controls=(control, replace(control, scale=1.2)))
    message = decode_job(encode_job(job, Who("alice")))
    assert message.controlnet_names == ["canny", "canny"]
    again = message.job(job.model, (), job.chunk_size, controlnets={"canny": there})
    # The worker's own ControlNet config (its paths), everything else as sent.
    assert again == replace(job, controls=tuple(replace(c, controlnet=there) for c in job.controls))


def test_embeddings_travel_in_the_job_message_by_relative_path() -> None:
    embedding = ResolvedLora(
        lora_id="e1",
        name="Easy Negative",
        file_name="EasyNegative",
        sha256="ab" * 32,
        path=Path("/roots/a/ti/EasyNegative.safetensors"),
        weight=1.0,
        file_path="ti/EasyNegative.safetensors",
    )
    job = replace(inpainting_job(), embeddings=(embedding,))
    message = decode_job(encode_job(job, Who("alice")))
    assert [(e.file_path, e.sha256, e.file_name) for e in message.embeddings] == [
        ("ti/EasyNegative.safetensors", "ab" * 32, "EasyNegative")
    ]
    located = tuple(replace(e, path=Path("/worker") / e.file_path) for e in message.embeddings)
    again = message.job(job.model, (), job.chunk_size, located)
    assert again == replace(job, embeddings=located)
    assert again.spec()["embeddings"] == [
        {"lora": "e1", "name": "EasyNegative", "sha256": "ab" * 32}
    ]


def test_an_upscale_travels_without_a_base_model_and_finds_the_workers_upscaler() -> None:
    from pathlib import Path

    from server.domain.generation_job import NO_MODEL, UpscaleJob
    from server.domain.models import UpscalerModelConfig

    here = UpscalerModelConfig("4x-UltraSharp", Path("/replica/u.safetensors"))
    there = UpscalerModelConfig("4x-UltraSharp", Path("/worker/u.safetensors"))
    job = GenerationJob(
        generation_id=str(uuid.uuid4()),
        model=NO_MODEL,
        prompt="",
        original_prompt="",
        width=256,
        height=192,
        steps=0,
        guidance_scale=0.0,
        seed=0,
        init_image=image(b"png bytes"),
        upscale=UpscaleJob(upscaler="4x-UltraSharp", scale=4.0, model=here),
    )
    message = decode_job(encode_job(job, Who("alice")))
    assert message.is_upscale
    assert message.upscaler_model == "4x-UltraSharp"
    again = message.job(NO_MODEL, (), job.chunk_size, upscalers={"4x-UltraSharp": there})
    assert again.mode == Mode.UPSCALE
    assert again == replace(job, upscale=replace(job.upscale, model=there))  # type: ignore[type-var]
    lanczos = replace(job, upscale=UpscaleJob(upscaler="Lanczos", scale=2.0))
    assert decode_job(encode_job(lanczos, Who("alice"))).upscaler_model == ""
