"""img2img and inpainting through the real server on the embedded model, as a user runs them:
the CLI from an earlier generation and from files, the typed client with inline bytes (the
stream ends OK), and a bad image refused with the field and a plain sentence."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from client import InvalidArgument, LoracleClient
from client.cli import main
from loracle.v1 import types_pb2
from server.devtools.local_server import RunningServer, wait_for_models


@pytest.fixture(scope="module")
def ready(server: RunningServer) -> RunningServer:
    with LoracleClient(server.address) as client:
        wait_for_models(client, timeout=120)
    return server


def png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return buffer.getvalue()


def test_cli_img2img_from_an_earlier_generation_and_inpainting_from_files(
    ready: RunningServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    first = tmp_path / "first.png"
    server = ["--server", ready.address]
    argv = ["generate", "a red fox", "--size", "96x64", "--steps", "2", "--seed", "4"]
    assert main([*server, *argv, "-o", str(first)]) == 0
    assert main([*server, "--json", "generations"]) == 0
    listed = capsys.readouterr().out
    prefix = next(line for line in listed.splitlines() if '"id"' in line).split('"')[3][:8]
    # "Vary my last result": by the id prefix the tables show, options after the command.
    second = tmp_path / "second.png"
    argv = ["generate", "a red fox at night", "--init-from", f"{prefix}:0", "--strength", "0.5"]
    assert main([*argv, "--steps", "4", "-o", str(second), *server]) == 0
    image = Image.open(second)
    assert image.size == (96, 64)
    assert "Denoising strength: 0.5" in image.info["parameters"]
    # Inpainting only a region, from files; the result has the init image's size.
    mask = Image.new("L", (96, 64))
    mask.paste(255, (30, 20, 60, 44))
    mask.save(tmp_path / "mask.png")
    third = tmp_path / "third.png"
    argv = ["generate", "a hat", "--init-image", str(first), "--mask", str(tmp_path / "mask.png")]
    argv += ["--only-masked", "--size", "64x64", "--mask-blur", "0", "--steps", "2"]
    assert main([*server, *argv, "-o", str(third)]) == 0
    painted = Image.open(third)
    assert painted.size == (96, 64)
    kept = np.asarray(mask) == 0
    assert np.array_equal(np.asarray(painted)[kept], np.asarray(Image.open(first))[kept])
    assert "Inpaint area: Only masked" in painted.info["parameters"]
    # A mask without an init image: the field, in one sentence.
    assert main([*server, "generate", "x", "--mask", str(tmp_path / "mask.png")]) == 1
    assert "spec.mask_image: applies only with spec.init_image" in capsys.readouterr().err


def test_inline_bytes_through_the_typed_client_and_a_bad_image(ready: RunningServer) -> None:
    rng = np.random.default_rng(3)
    init = Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8))
    spec = types_pb2.GenerationSpec(prompt="a castle", steps=2, seed=1, strength=0.6)
    spec.init_image.data = png(init)
    with LoracleClient(ready.address) as client:
        events = list(client.generate_image(spec))
        assert events[-1].WhichOneof("event") == "completed"  # the stream ended OK
        done = [e.image_complete for e in events if e.WhichOneof("event") == "image_complete"]
        assert len(done) == 1
        generation = client.get_generation(events[0].generation_id)
        assert generation.spec.init_image.sha256
        assert not generation.spec.init_image.data  # never echoed back
        assert generation.spec.strength == pytest.approx(0.6)
        bad = types_pb2.GenerationSpec(prompt="a castle", steps=2)
        bad.init_image.data = b"GIF89a" + b"\x00" * 64
        with pytest.raises(InvalidArgument) as err:
            list(client.generate_image(bad))
        assert [f for f, _ in err.value.field_violations] == ["spec.init_image"]
        assert "not a readable PNG, JPEG or WebP image" in err.value.message


def test_cli_hires_fix(
    ready: RunningServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "hires.png"
    argv = ["generate", "a castle", "--size", "64x64", "--steps", "2", "--hires", "2x"]
    argv += ["--hires-steps", "2", "--denoise", "0.5", "-o", str(out), "--server", ready.address]
    assert main(argv) == 0
    image = Image.open(out)
    assert image.size == (128, 128)
    assert "Hires upscale: 2, Hires steps: 2, Hires upscaler: Latent" in image.info["parameters"]
    # An upscaler that does not exist: the field and the names that do.
    argv = ["generate", "x", "--hires", "2", "--hires-upscaler", "4x-UltraSharp"]
    assert main([*argv, "--server", ready.address]) == 1
    err = capsys.readouterr().err
    assert "spec.hires.upscaler: must be one of Latent, Latent (antialiased)" in err
    assert main(["generate", "x", "--denoise", "0.5", "--server", ready.address]) == 1
    assert "--denoise need --hires" in capsys.readouterr().err
