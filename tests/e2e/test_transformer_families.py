"""FLUX and SD3.5 through the real server and the CLI, as a user runs them: `loracle models`
lists both, `loracle generate` makes a FLUX image whose PNG records Forge's `Distilled CFG
Scale` and an SD3.5 one with a negative prompt, and what FLUX does not take (a negative
prompt, an SD sampler) is refused in one sentence."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from PIL import Image

from client import LoracleClient
from client.cli import main
from server.devtools.local_server import RunningServer, start_server, wait_for_models
from server.infrastructure.diffusion.placeholder import (
    build_tiny_flux,
    build_tiny_qwen_image,
    build_tiny_sd3,
    build_tiny_z_image,
)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    root = tmp_path_factory.mktemp("flux-e2e")
    build_tiny_flux(root / "flux-tiny")
    build_tiny_sd3(root / "sd3-tiny")
    build_tiny_qwen_image(root / "qwen-tiny")
    build_tiny_z_image(root / "zimage-tiny")
    config = root / "loracle.toml"
    config.write_text(
        '[[models]]\nname = "flux"\narchitecture = "Flux.1 D"\npath = "flux-tiny"\n'
        '[[models]]\nname = "sd35"\narchitecture = "SD 3.5 Large"\npath = "sd3-tiny"\n'
        '[[models]]\nname = "qwen"\narchitecture = "Qwen"\npath = "qwen-tiny"\n'
        # A Z-Image base model's settings, instead of Turbo's (its family's defaults).
        '[[models]]\nname = "zimage"\narchitecture = "ZImageBase"\npath = "zimage-tiny"\n'
        "steps = 3\nguidance_scale = 4\n"
    )
    running = start_server(root / "data", "--config", str(config))
    with LoracleClient(running.address) as client:
        wait_for_models(client, timeout=120)
    yield running
    running.stop()


def test_cli_generates_with_flux_and_refuses_what_it_does_not_take(
    server: RunningServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    address = ["--server", server.address]
    assert main(["models", *address]) == 0
    rows = [line.split() for line in capsys.readouterr().out.splitlines()]
    assert ["flux", "FLUX", "yes"] in [r[:3] for r in rows]
    assert ["sd35", "SD3", "yes"] in [r[:3] for r in rows]
    sd35 = tmp_path / "sd35.png"
    argv = ["generate", "a red fox", "--model", "sd35", "--size", "64x64", "--steps", "2"]
    assert main([*argv, "--negative", "blurry", "-o", str(sd35), *address]) == 0
    assert "Negative prompt: blurry" in Image.open(sd35).info["parameters"]
    out = tmp_path / "fox.png"
    argv = ["generate", "a red fox", "--model", "flux", "--size", "64x64", "--steps", "2"]
    argv += ["--seed", "3"]
    assert main([*argv, "-o", str(out), *address]) == 0
    image = Image.open(out)
    assert image.size == (64, 64)
    assert "CFG scale: 1, Distilled CFG Scale: 3.5" in image.info["parameters"]
    assert main([*argv, "--negative", "blurry", *address]) == 1
    err = capsys.readouterr().err
    assert "model 'flux' (FLUX) is guidance-distilled and takes no negative prompt" in err
    # With true CFG beside the distilled guidance, FLUX takes a negative prompt.
    cfg = tmp_path / "cfg.png"
    assert main([*argv, "--negative", "blurry", "--true-cfg", "3", "-o", str(cfg), *address]) == 0
    assert "CFG scale: 3, Distilled CFG Scale: 3.5" in Image.open(cfg).info["parameters"]
    assert main([*argv, "--scheduler", "euler_a", *address]) == 1
    assert "samples with flow_euler, or empty (its own)" in capsys.readouterr().err


def test_list_base_models_says_what_each_family_takes(server: RunningServer) -> None:
    with LoracleClient(server.address) as client:
        models = {m.name: m for m in client.list_base_models()}
    flux, sd35 = models["flux"], models["sd35"]
    assert (flux.default_width, flux.default_steps, flux.default_guidance_scale) == (1024, 28, 3.5)
    assert list(flux.schedulers) == ["flow_euler"]
    assert not flux.takes_negative_prompt
    assert sd35.takes_negative_prompt
    # The tiny folders' weights, as files on disk: what loading them takes.
    assert 500_000 < flux.weights_bytes < 5_000_000
    assert 500_000 < sd35.weights_bytes < 5_000_000


def test_cli_generates_with_qwen_image_and_z_image(
    server: RunningServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    address = ["--server", server.address]
    assert main(["models", *address]) == 0
    rows = [line.split()[:3] for line in capsys.readouterr().out.splitlines()]
    assert ["qwen", "QWEN_IMAGE", "yes"] in rows
    assert ["zimage", "Z_IMAGE", "yes"] in rows
    for name in ("qwen", "zimage"):
        out = tmp_path / f"{name}.png"
        argv = ["generate", "a red fox", "--model", name, "--size", "64x64", "--seed", "3"]
        assert main([*argv, "--negative", "blurry", "-o", str(out), *address]) == 0
        parameters = Image.open(out).info["parameters"]
        assert "Negative prompt: blurry" in parameters
        # Qwen-Image's family default, and the Z-Image entry's own steps and guidance.
        expected = "Steps: 50" if name == "qwen" else "Steps: 3"
        assert expected in parameters, parameters
        assert "CFG scale: 4" in parameters, parameters
        assert main([*argv, "--size", "72x72", *address]) == 1
        assert f"model '{name}'" in capsys.readouterr().err
