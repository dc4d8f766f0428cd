"""Upscaler model files as they come: ESRGAN in the original and BasicSR layouts load into the
same network, Real-ESRGAN's x2 folds its input, the compact network adds the nearest-upscaled
input, the architecture and scale come from the header alone, tiles do not change the image,
and files that are not an upscaler (or a pickle) are refused with the reason."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from server.devtools.tiny_upscalers import write_tiny_compact, write_tiny_esrgan
from server.infrastructure.diffusion.hires import with_model
from server.infrastructure.diffusion.upscaler_models import (
    UpscalerFileError,
    inspect_upscaler,
    load_upscaler,
    upscale,
    upscale_tiles,
)


def picture(width: int = 70, height: int = 50, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (height, width, 3), dtype=np.uint8))


Pixels = np.ndarray[tuple[int, ...], np.dtype[np.int16]]


def run(path: Path, image: Image.Image, tile: int = 192) -> Pixels:
    net, shape = load_upscaler(path, "cpu", torch.float32)
    return np.asarray(upscale(net, shape.scale, image, tile=tile), dtype=np.int16)


def test_both_esrgan_layouts_are_the_same_network(tmp_path: Path) -> None:
    original = write_tiny_esrgan(tmp_path / "o.safetensors", layout="original")
    basicsr = write_tiny_esrgan(tmp_path / "b.safetensors", layout="basicsr")
    keys = set(load_file(str(original)))
    # As in 4x-UltraSharp: conv 0, the trunk, upsampling convs 3 and 6, HR 8, last 10.
    assert {"model.0.weight", "model.1.sub.2.weight", "model.3.weight", "model.6.weight"} <= keys
    assert {"model.8.weight", "model.10.weight", "model.1.sub.0.RDB1.conv1.0.weight"} <= keys
    assert {"conv_up1.weight", "conv_up2.weight", "conv_hr.weight"} <= set(load_file(str(basicsr)))
    for path in (original, basicsr):
        shape = inspect_upscaler(path)
        assert (shape.architecture, shape.scale) == ("ESRGAN", 4)
    a, b = run(original, picture()), run(basicsr, picture())
    assert a.shape == (200, 280, 3)
    assert np.array_equal(a, b)


def test_real_esrgan_x2_folds_its_input_and_compact_adds_the_nearest_image(
    tmp_path: Path,
) -> None:
    x2 = write_tiny_esrgan(tmp_path / "x2.safetensors", layout="basicsr", scale=2)
    assert load_file(str(x2))["conv_first.weight"].shape[1] == 12  # 3 channels x 2 x 2
    assert inspect_upscaler(x2).scale == 2
    assert run(x2, picture()).shape == (100, 140, 3)
    compact = write_tiny_compact(tmp_path / "c.safetensors", scale=4)
    shape = inspect_upscaler(compact)
    assert (shape.architecture, shape.scale) == ("Compact", 4)
    image = picture()
    out = run(compact, image)
    nearest = np.asarray(image.resize((280, 200), Image.Resampling.NEAREST), dtype=np.int16)
    assert out.shape == nearest.shape
    # A random network of small weights stays near its nearest-neighbour base, not on it.
    assert 0 < np.abs(out - nearest).mean() < 64
    assert not np.array_equal(run(compact, picture(seed=1)), out)  # it reads its input


def test_tiles_do_not_change_the_image(tmp_path: Path) -> None:
    compact = write_tiny_compact(tmp_path / "c.safetensors")
    whole = run(compact, picture(200, 150), tile=1000)
    tiled = run(compact, picture(200, 150), tile=64)  # 4 x 3 tiles, 8 pixels of overlap
    # Its receptive field is within the overlap, so tiles change nothing but float rounding:
    # a convolution over another shape may round one value the other way (seen: 1 value of
    # 1.44 million off by 1 with torch 2.13's CPU kernels); a seam would differ by far more.
    difference = np.abs(whole.astype(np.int16) - tiled.astype(np.int16))
    assert int(difference.max()) <= 1
    assert np.count_nonzero(difference) <= difference.size // 10_000
    calls: list[tuple[int, int]] = []
    net, shape = load_upscaler(compact, "cpu", torch.float32)
    upscale(net, shape.scale, picture(200, 150), tile=64, on_tile=lambda d, t: calls.append((d, t)))
    assert calls == [(i, 12) for i in range(1, 13)]


def test_a_model_runs_until_the_target_is_covered_then_lanczos(tmp_path: Path) -> None:
    sizes: list[tuple[int, int]] = []

    def doubler(image: Image.Image) -> Image.Image:
        sizes.append(image.size)
        return image.resize((image.width * 2, image.height * 2))

    out = with_model(doubler, picture(50, 40), 300, 240)  # x6: two passes (x4), then Lanczos
    assert sizes == [(50, 40), (100, 80), (200, 160)]
    assert out.size == (300, 240)
    assert upscale_tiles(250, 150, 4, 1500, 900) == 2 + 24  # as UpscaleImage counts progress


@pytest.mark.parametrize(
    ("tensors", "message"),
    [
        ({"foo.weight": torch.zeros(3, 3)}, "not an upscaler architecture this server loads"),
        ({"model.0.weight": torch.zeros(8, 3, 3, 3)}, "not an upscaler architecture"),
    ],
)
def test_files_that_are_not_upscalers_say_why(
    tmp_path: Path, tensors: dict[str, torch.Tensor], message: str
) -> None:
    path = tmp_path / "x.safetensors"
    save_file(tensors, str(path))
    with pytest.raises(UpscalerFileError, match=message):
        inspect_upscaler(path)


def test_a_pickle_or_a_mangled_file_is_refused(tmp_path: Path) -> None:
    pickle = tmp_path / "4x-UltraSharp.pth"
    pickle.write_bytes(b"\x80\x04")
    with pytest.raises(UpscalerFileError, match=r"a \.pth is a pickle"):
        inspect_upscaler(pickle)
    truncated = tmp_path / "t.safetensors"
    truncated.write_bytes(b"\x10")
    with pytest.raises(UpscalerFileError, match="truncated"):
        inspect_upscaler(truncated)
    # Right names, wrong shapes: the header says ESRGAN, the weights do not fit it.
    good = load_file(str(write_tiny_esrgan(tmp_path / "g.safetensors", layout="basicsr")))
    good["body.0.rdb1.conv2.weight"] = torch.zeros(4, 5, 3, 3)
    bad = tmp_path / "bad.safetensors"
    save_file(good, str(bad))
    with pytest.raises(UpscalerFileError, match="its tensors do not fit the network"):
        load_upscaler(bad, "cpu", torch.float32)
