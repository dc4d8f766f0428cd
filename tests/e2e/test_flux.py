"""FLUX through the real server and the CLI, as a user runs it: `loracle models` lists the
FLUX model with its defaults, `loracle generate` makes an image whose PNG records Forge's
`Distilled CFG Scale`, and a negative prompt or an SD sampler is refused in one sentence."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from PIL import Image

from client import LoracleClient
from client.cli import main
from server.devtools.local_server import RunningServer, start_server, wait_for_models
from server.infrastructure.diffusion.placeholder import build_tiny_flux


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    root = tmp_path_factory.mktemp("flux-e2e")
    build_tiny_flux(root / "flux-tiny")
    config = root / "loracle.toml"
    config.write_text('[[models]]\nname = "flux"\narchitecture = "Flux.1 D"\npath = "flux-tiny"\n')
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
    row = next(line.split() for line in capsys.readouterr().out.splitlines() if "flux" in line)
    assert row[:3] == ["flux", "FLUX", "yes"]
    out = tmp_path / "fox.png"
    argv = ["generate", "a red fox", "--size", "64x64", "--steps", "2", "--seed", "3"]
    assert main([*argv, "-o", str(out), *address]) == 0
    image = Image.open(out)
    assert image.size == (64, 64)
    assert "CFG scale: 1, Distilled CFG Scale: 3.5" in image.info["parameters"]
    assert main([*argv, "--negative", "blurry", *address]) == 1
    err = capsys.readouterr().err
    assert "model 'flux' (FLUX) is guidance-distilled and takes no negative prompt" in err
    assert main([*argv, "--scheduler", "euler_a", *address]) == 1
    assert "samples with flow_euler, or empty (its own)" in capsys.readouterr().err
