"""GenerateImage through the real server on the embedded placeholder model: the stream,
reassembly against the SHA-256, PNG parameters, client cancellation and the CLI."""

from __future__ import annotations

import hashlib
import io
import json
import time
from pathlib import Path

import grpc
import pytest
from PIL import Image

from client import InvalidArgument, LoracleClient, Unimplemented
from client.cli import main
from loracle.v1 import command_service_pb2, command_service_pb2_grpc, types_pb2
from server.devtools.local_server import RunningServer


@pytest.fixture(scope="module")
def ready(server: RunningServer) -> RunningServer:
    with LoracleClient(server.address) as client:
        deadline = time.monotonic() + 120
        while not all(m.ready for m in client.list_base_models()):
            assert time.monotonic() < deadline, "the embedded model never became ready"
            time.sleep(0.5)
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
        with pytest.raises(Unimplemented):
            list(client.generate_image(types_pb2.GenerationSpec(prompt="x <lora:a:1>")))


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
