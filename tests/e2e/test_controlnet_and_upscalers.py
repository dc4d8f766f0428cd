"""ControlNet and upscaler models through the real server and the CLI, as a user runs them:
`loracle models` lists the configured ControlNets and upscalers, `loracle generate --control
NAME:IMAGE:SCALE` (options after the subcommand) writes an image whose PNG parameters name the
ControlNet, a ControlNet of another architecture is refused in one sentence with
FAILED_PRECONDITION's ErrorInfo, and `loracle upscale` makes a file or an earlier result larger
with the same progress bar, ending OK."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
from PIL import Image

from client import FailedPrecondition, LoracleClient
from client.cli import main
from loracle.v1 import types_pb2
from server.devtools.local_server import RunningServer, start_server, wait_for_models
from server.devtools.tiny_upscalers import write_tiny_compact
from server.infrastructure.diffusion.placeholder import (
    build_tiny_controlnet,
    build_tiny_sd15,
    build_tiny_sdxl,
)
from tests.hostile_images import noise


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    root = tmp_path_factory.mktemp("controlnet-e2e")
    sd = build_tiny_sd15(root / "sd")
    xl = build_tiny_sdxl(root / "sdxl")
    config = root / "loracle.toml"
    config.write_text(
        '[[models]]\nname = "sd"\narchitecture = "SD 1.5"\npath = "sd"\n'
        '[[models]]\nname = "xl"\narchitecture = "SDXL"\npath = "sdxl"\n'
        '[[controlnets]]\nname = "canny"\narchitecture = "SD1"\npath = "canny"\n'
        '[[controlnets]]\nname = "canny-xl"\narchitecture = "SDXL"\npath = "canny-xl"\n'
        '[[upscalers]]\nname = "4x-Compact"\npath = "compact.safetensors"\n'
    )
    write_tiny_compact(root / "compact.safetensors")
    build_tiny_controlnet(root / "canny", sd)
    build_tiny_controlnet(root / "canny-xl", xl)
    running = start_server(root / "data", "--config", str(config))
    with LoracleClient(running.address) as client:
        wait_for_models(client, timeout=120)
    yield running
    running.stop()


def test_cli_lists_controlnets_and_generates_with_one(
    server: RunningServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    address = ["--server", server.address]
    assert main(["models", *address]) == 0
    listed = capsys.readouterr().out
    assert "ControlNets (--control NAME:IMAGE[:SCALE]):" in listed
    rows = [line.split() for line in listed.splitlines()]
    assert next(r[:3] for r in rows if r and r[0] == "canny") == ["canny", "SD1", "yes"]
    assert "Built-in hires upscalers (--hires-upscaler): Latent, " in listed
    edges = tmp_path / "edges.png"
    noise(80, 64, 4).save(edges)
    plain, steered = tmp_path / "plain.png", tmp_path / "steered.png"
    argv = ["generate", "a house", "--model", "sd", "--size", "64x64", "--steps", "2"]
    assert main([*argv, "--seed", "5", "-o", str(plain), *address]) == 0
    control = ["--control", f"canny:{edges}:0.8"]
    assert main([*argv, "--seed", "5", *control, "-o", str(steered), *address]) == 0
    image = Image.open(steered)
    assert 'ControlNet 0: "Module: none, Model: canny [' in image.info["parameters"]
    assert "Weight: 0.8" in image.info["parameters"]
    difference = np.abs(
        np.asarray(image, dtype=np.int16) - np.asarray(Image.open(plain), dtype=np.int16)
    )
    assert difference.mean() > 1.0


def test_a_controlnet_of_another_architecture_is_refused_with_error_info(
    server: RunningServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    edges = tmp_path / "edges.png"
    noise(64, 64, 4).save(edges)
    argv = ["generate", "a house", "--model", "xl", "--control", f"canny:{edges}"]
    assert main([*argv, "--server", server.address]) == 1
    err = capsys.readouterr().err
    assert "ControlNet 'canny' is for SD1 models; model 'xl' is SDXL" in err
    assert "Traceback" not in err
    spec = types_pb2.GenerationSpec(prompt="a house", model="xl", steps=2)
    control = spec.controls.add(controlnet="canny")
    control.image.data = edges.read_bytes()
    with LoracleClient(server.address) as client, pytest.raises(FailedPrecondition) as raised:
        list(client.generate_image(spec))
    assert raised.value.code == grpc.StatusCode.FAILED_PRECONDITION
    assert raised.value.reason == "CONTROLNET_ARCHITECTURE_MISMATCH"


def test_cli_upscales_a_file_and_an_earlier_result(
    server: RunningServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    address = ["--server", server.address]
    assert main(["models", *address]) == 0
    listed = capsys.readouterr().out
    assert "Upscaler models (--hires-upscaler NAME, loracle upscale --model NAME):" in listed
    row = next(line.split() for line in listed.splitlines() if line.startswith("4x-Compact"))
    assert row[:4] == ["4x-Compact", "Compact", "4x", "yes"]
    source = tmp_path / "small.png"
    noise(100, 60, 2).save(source)
    big = tmp_path / "big.png"
    assert main(["upscale", str(source), "--model", "4x-compact", "-o", str(big), *address]) == 0
    assert Image.open(big).size == (400, 240)
    assert Image.open(big).info["postprocessing"] == (
        "Postprocess upscale by: 4, Postprocess upscaler: 4x-Compact"
    )
    first = tmp_path / "first.png"
    argv = ["generate", "a house", "--model", "sd", "--size", "64x64", "--steps", "2"]
    assert main([*argv, "-o", str(first), *address]) == 0
    assert main(["--json", "generations", *address]) == 0
    prefix = next(line for line in capsys.readouterr().out.splitlines() if '"id"' in line)
    gid = prefix.split('"')[3][:8]
    jpeg = tmp_path / "again.jpg"
    argv = ["upscale", "--from", f"{gid}:0", "--model", "Lanczos", "--scale", "3"]
    assert main([*argv, "-o", str(jpeg), *address]) == 0
    assert Image.open(jpeg).format == "JPEG"
    assert Image.open(jpeg).size == (192, 192)
    assert main(["upscale", str(source), "--model", "Latent", *address]) == 1
    err = capsys.readouterr().err
    assert "upscaler: 'Latent' resizes latents, which only a hires fix has" in err
    assert "Traceback" not in err
