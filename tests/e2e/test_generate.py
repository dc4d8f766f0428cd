"""GenerateImage through the real server on the embedded placeholder model: the stream,
reassembly against the SHA-256, PNG parameters, client cancellation and the CLI."""

from __future__ import annotations

import hashlib
import io
import json
import signal
import time
from pathlib import Path

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from PIL import Image

from client import (
    DeadlineExceeded,
    FailedPrecondition,
    InvalidArgument,
    LoracleClient,
    NotFound,
)
from client.cli import main
from loracle.v1 import (
    command_service_pb2,
    command_service_pb2_grpc,
    query_service_pb2,
    query_service_pb2_grpc,
    types_pb2,
)
from server.devtools.local_server import RunningServer, start_server, wait_for_models
from server.devtools.tiny_loras import write_lora_for_pipeline
from server.domain.models import Architecture, BaseModelConfig
from server.infrastructure.diffusion.registry import EMBEDDED_NAME, load_pipeline


@pytest.fixture(scope="module")
def ready(server: RunningServer) -> RunningServer:
    with LoracleClient(server.address) as client:
        wait_for_models(client, timeout=120)
    return server


def test_generate_stream_and_reassembly(ready: RunningServer) -> None:
    spec = types_pb2.GenerationSpec(
        prompt="a lighthouse at dusk",
        negative_prompt="blurry",
        seed=5,
        steps=3,
        num_images=2,
        chunk_size_bytes=2048,
    )
    with LoracleClient(ready.address) as client:
        events = list(client.generate_image(spec))
    kinds = [e.WhichOneof("event") for e in events]
    assert kinds[0] == "queued"
    assert "started" in kinds
    assert kinds.count("progress") == 3
    assert kinds[-1] == "completed"
    assert len({e.generation_id for e in events}) == 1
    chunks: dict[int, bytearray] = {}
    for e in events:
        if e.HasField("image_chunk"):
            assert e.image_chunk.offset == len(
                chunks.setdefault(e.image_chunk.image_index, bytearray())
            )
            chunks[e.image_chunk.image_index].extend(e.image_chunk.data)
    infos = [e.image_complete for e in events if e.HasField("image_complete")]
    assert [i.seed for i in infos] == [5, 6]
    for info in infos:
        data = bytes(chunks[info.index])
        assert hashlib.sha256(data).hexdigest() == info.sha256
        assert info.mime_type == "image/png"
        png = Image.open(io.BytesIO(data))
        assert png.size == (64, 64)
        assert png.info["parameters"].splitlines()[:2] == [
            "a lighthouse at dusk",
            "Negative prompt: blurry",
        ]
        assert "Model: tiny-sd15" in png.info["parameters"]


def test_bad_generation_requests(ready: RunningServer) -> None:
    with LoracleClient(ready.address) as client:
        with pytest.raises(InvalidArgument) as bad:
            list(client.generate_image(types_pb2.GenerationSpec(prompt="x", width=100)))
        assert bad.value.field_violations[0][0] == "spec.width"
        with pytest.raises(NotFound) as missing:
            list(client.generate_image(types_pb2.GenerationSpec(prompt="x <lora:nope:1>")))
        assert "nope" in missing.value.message
        with pytest.raises(InvalidArgument) as bad:
            list(client.generate_image(types_pb2.GenerationSpec(prompt="x", scheduler="warp")))
        assert bad.value.field_violations[0][0] == "spec.scheduler"
        # The placeholder's images are noise, and large ones cost minutes per step.
        with pytest.raises(InvalidArgument) as large:
            list(client.generate_image(types_pb2.GenerationSpec(prompt="x", width=512)))
        assert "at most 256x256" in large.value.message
        # request_id is logged and stored: no control characters, no megabytes.
        for request_id in ("forged\nINFO line", "x" * 129):
            with pytest.raises(InvalidArgument) as bad_id:
                client.submit_generation(
                    types_pb2.GenerationSpec(prompt="x"), request_id=request_id
                )
            assert bad_id.value.field_violations[0][0] == "request_id"


def test_client_cancellation_frees_the_executor(ready: RunningServer) -> None:
    with grpc.insecure_channel(ready.address) as channel:
        stub = command_service_pb2_grpc.CommandServiceStub(channel)
        call = stub.GenerateImage(
            command_service_pb2.GenerateImageRequest(
                spec=types_pb2.GenerationSpec(
                    prompt="a very long job", steps=150, seed=1, width=128, height=128
                )
            )
        )
        for response in call:
            if response.event.HasField("progress") and response.event.progress.step >= 2:
                call.cancel()
                break
    # The cancelled 150-step 128x128 job (over a minute here) stops within a step: soon a new job
    # finds nothing running ahead of it (queue position 0).
    with LoracleClient(ready.address) as client:
        for _ in range(30):
            events = list(client.generate_image(types_pb2.GenerationSpec(prompt="p", steps=1)))
            assert events[-1].HasField("completed")
            if events[0].queued.position == 0:
                break
            time.sleep(0.1)
        else:
            pytest.fail("the cancelled job kept the executor busy")


def test_cli_generate_writes_verified_images(
    ready: RunningServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "fox.png"
    args = [
        "--server",
        ready.address,
        "--json",
        "generate",
        "a fox",
        "--seed",
        "3",
        "--steps",
        "2",
        "--images",
        "2",
        "-o",
        str(out),
    ]
    assert main(args) == 0
    result = json.loads(capsys.readouterr().out)
    paths = [Path(i["path"]) for i in result["images"]]
    assert paths == [tmp_path / "fox-0.png", tmp_path / "fox-1.png"]
    for path, info in zip(paths, result["images"], strict=True):
        assert hashlib.sha256(path.read_bytes()).hexdigest() == info["sha256"]


def embedded_lora(server: RunningServer, name: str, seed: int) -> Path:
    """A LoRA fitted to the embedded tiny model, written into the server's LoRA root."""
    folder = server.data_dir / "models" / EMBEDDED_NAME
    pipe = load_pipeline(BaseModelConfig(EMBEDDED_NAME, Architecture.SD1, folder))
    path = server.lora_root / f"{name}.safetensors"
    write_lora_for_pipeline(
        pipe, path, seed=seed, metadata={"ss_base_model_version": "sd_v1", "ss_output_name": name}
    )
    return path


def pixels(events: list[types_pb2.GenerationEvent]) -> bytes:
    data = b"".join(e.image_chunk.data for e in events if e.HasField("image_chunk"))
    return Image.open(io.BytesIO(data)).tobytes()


def test_loras_through_the_server(ready: RunningServer) -> None:
    embedded_lora(ready, "tiny_ink", seed=4)
    spec = types_pb2.GenerationSpec(prompt="a boat", seed=9, steps=2)
    with LoracleClient(ready.address) as client:
        client.register_lora("tiny_ink.safetensors")
        done = list(client.import_loras())[-1]  # the demo library the fixture wrote
        client.list_loras(consistency_token=done.consistency_token)  # LoRAs resolve from it
        plain = list(client.generate_image(spec))
        styled = list(
            client.generate_image(
                types_pb2.GenerationSpec(prompt="a boat <lora:tiny_ink:0.9>", seed=9, steps=2)
            )
        )
        assert styled[-1].HasField("completed")
        assert pixels(styled) != pixels(plain)
        assert pixels(list(client.generate_image(spec))) == pixels(plain)
        # An SDXL LoRA on the SD1.5 model: refused before queuing, with the reason.
        with pytest.raises(FailedPrecondition) as wrong:
            list(
                client.generate_image(
                    types_pb2.GenerationSpec(prompt="a boat <lora:cyberpunk_city_xl>", steps=2)
                )
            )
        assert wrong.value.reason == "LORA_ARCHITECTURE_MISMATCH"
        # A real-size SD1.5 LoRA does not fit the tiny model: that job fails, clearly.
        events: list[types_pb2.GenerationEvent] = []
        with pytest.raises(FailedPrecondition) as unfit:
            events.extend(
                client.generate_image(
                    types_pb2.GenerationSpec(prompt="a boat <lora:pixel_art_sd15>", steps=2)
                )
            )
        assert unfit.value.reason == "LORA_LOAD_FAILED"
        assert events[-1].HasField("failed")
        assert "Pixel Art" in events[-1].failed.error
        assert "does not fit" in events[-1].failed.error or "shape" in events[-1].failed.error
        # ... and the model is untouched afterwards.
        assert pixels(list(client.generate_image(spec))) == pixels(plain)


def test_a_failed_generation_ends_its_stream_with_the_failures_status(
    ready: RunningServer,
) -> None:
    """GenerateImage sends `failed`, then ends FAILED_PRECONDITION with ErrorInfo
    LORA_LOAD_FAILED naming the file; WatchGeneration of the same job ends OK."""
    embedded_lora(ready, "tiny_ink", seed=4)
    with LoracleClient(ready.address) as client:
        done = list(client.import_loras())[-1]
        client.list_loras(consistency_token=done.consistency_token)
        unfit = client.list_loras(base_model="SD1", consistency_token=done.consistency_token)
        sha = next(lora.file.sha256 for lora in unfit.loras if lora.name == "Pixel Art")
    with grpc.insecure_channel(ready.address) as channel:
        stub = command_service_pb2_grpc.CommandServiceStub(channel)
        call = stub.GenerateImage(
            command_service_pb2.GenerateImageRequest(
                spec=types_pb2.GenerationSpec(prompt="a boat <lora:pixel_art_sd15>", steps=2)
            )
        )
        events: list[types_pb2.GenerationEvent] = []
        with pytest.raises(grpc.RpcError):
            events.extend(r.event for r in call)
        assert events[-1].HasField("failed")
        assert call.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert call.details() == events[-1].failed.error
        status = rpc_status.from_call(call)
        assert status is not None
        info = error_details_pb2.ErrorInfo()
        assert status.details[0].Unpack(info)
        assert info.reason == "LORA_LOAD_FAILED"
        assert info.metadata["lora_sha256"] == sha
        watch = query_service_pb2_grpc.QueryServiceStub(channel).WatchGeneration(
            query_service_pb2.WatchGenerationRequest(generation_id=events[-1].generation_id)
        )
        watched = [r.event for r in watch]
        assert watched[-1].HasField("failed")
        assert watch.code() == grpc.StatusCode.OK


def test_submit_watch_from_another_connection_and_resume(ready: RunningServer) -> None:
    spec = types_pb2.GenerationSpec(prompt="a kite", seed=2, steps=3, preview_every_n_steps=1)
    with LoracleClient(ready.address) as client:
        submitted = client.submit_generation(spec)
    with LoracleClient(ready.address) as other:
        everything = list(other.watch_generation(submitted.generation_id))
        rest = list(other.watch_generation(submitted.generation_id, after_sequence=2))
        assert rest == everything[2:]
        kinds = [e.WhichOneof("event") for e in everything]
        assert kinds[-1] == "completed"
        assert "preview" in kinds
        generation = other.get_generation(
            submitted.generation_id, consistency_token=submitted.consistency_token
        )
        assert generation.id == submitted.generation_id
        listed = other.list_generations(page_size=1000)
        assert submitted.generation_id in {g.id for g in listed.generations}


def test_cli_detach_watch_and_cancel(
    ready: RunningServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    server = ["--server", ready.address, "--json"]
    assert main([*server, "generate", "a cat", "--steps", "2", "--detach"]) == 0
    generation_id = json.loads(capsys.readouterr().out)["generation_id"]
    out = tmp_path / "cat.png"
    # The 8 characters the tables show are enough (issue 12: `loracle cancel 820fcc0a`).
    assert main([*server, "watch", generation_id[:8], "-o", str(out)]) == 0
    assert json.loads(capsys.readouterr().out)["generation_id"] == generation_id
    assert out.read_bytes().startswith(b"\x89PNG")
    assert (
        main([*server, "generate", "slow", "--steps", "150", "--size", "128x128", "--detach"]) == 0
    )
    slow = json.loads(capsys.readouterr().out)["generation_id"]
    assert main([*server, "cancel", slow[:8]]) == 0
    assert json.loads(capsys.readouterr().out)["state"] == "GENERATION_STATE_CANCELLED"


def test_cli_errors_name_the_options_and_a_loading_model_is_waited_for(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    server = start_server(tmp_path)  # builds its embedded model in the background
    try:
        argv = ["generate", "a cat", "--steps", "2", "--detach", "--server", server.address]
        with LoracleClient(server.address) as client:
            loading = not client.list_base_models()[0].ready
        if loading:  # else the build beat us to it: nothing to wait for
            assert main([*argv, "--no-wait"]) == 1
            assert "error: FAILED_PRECONDITION: model" in capsys.readouterr().err
        assert main(argv) == 0
        assert "submitted " in capsys.readouterr().out
        assert main([*argv, "--size", "7x7"]) == 1
        assert capsys.readouterr().err.splitlines() == [
            "error: --size 7x7: width must be a multiple of 8 from 64 to 2048, or 0",
            "error: --size 7x7: height must be a multiple of 8 from 64 to 2048, or 0",
        ]
    finally:
        server.stop()


def test_a_passed_deadline_cancels_the_job(ready: RunningServer) -> None:
    spec = types_pb2.GenerationSpec(prompt="too slow", steps=150, width=128, height=128)
    with (
        LoracleClient(ready.address, stream_timeout=2.0) as client,
        pytest.raises(DeadlineExceeded),
    ):
        list(client.generate_image(spec))
    with LoracleClient(ready.address) as client:
        deadline = time.monotonic() + 30
        while True:
            latest = client.list_generations(page_size=5).generations
            mine = [g for g in latest if g.spec.prompt == "too slow"]
            if mine and mine[0].state == types_pb2.GENERATION_STATE_CANCELLED:
                break
            assert time.monotonic() < deadline, f"still {mine[0].state if mine else 'missing'}"
            time.sleep(0.2)


def test_jobs_running_when_the_server_is_killed_are_marked_failed(tmp_path: Path) -> None:
    first = start_server(tmp_path)
    try:
        with LoracleClient(first.address) as client:
            wait_for_models(client, timeout=120)
            submitted = client.submit_generation(
                types_pb2.GenerationSpec(prompt="doomed", steps=150, width=128, height=128)
            )
            for event in client.watch_generation(submitted.generation_id):
                if event.HasField("progress"):
                    break
    finally:
        first.stop(signal.SIGKILL)
    second = start_server(tmp_path)
    try:
        with LoracleClient(second.address) as client:
            generation = client.get_generation(submitted.generation_id)
            assert generation.state == types_pb2.GENERATION_STATE_FAILED
            assert "restarted" in generation.error
    finally:
        second.stop()


def test_quick_generate_completes_when_its_pick_cannot_load(ready: RunningServer) -> None:
    """The demo library's real-size SD1.5 LoRAs do not fit the tiny embedded model, yet
    they are the right architecture: QuickGenerate must still complete."""
    with LoracleClient(ready.address) as client:
        done = list(client.import_loras())[-1]
        client.list_loras(consistency_token=done.consistency_token)
        events = list(client.quick_generate("pixel art of a castle, 8-bit sprite", seed=1))
    assert events[-1].HasField("completed")
    assert not any(e.HasField("failed") for e in events)


# The libraries' own output, which a server log must not carry (see runtime.quiet_libraries).
_LIBRARY_NOISE = ("FutureWarning", "UserWarning", "it/s]", "[transformers]", "deprecate(")


def test_the_server_log_is_the_servers_own(ready: RunningServer) -> None:
    """Runs last in this module: by now the server has built and loaded the placeholder,
    applied LoRAs and generated. Every line is one of its log records."""
    log = ready.log()
    assert "loracle" in log
    noisy = [line for line in log.splitlines() if any(n in line for n in _LIBRARY_NOISE)]
    assert noisy == []
    stray = [line for line in log.splitlines() if line and not line[:4].isdigit()]
    assert stray == [], log[-3000:]
