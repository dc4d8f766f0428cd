"""The loader thread that reads LoRA files ahead of the worker (lora_prefetch.py)."""

from __future__ import annotations

import hashlib
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

from server.infrastructure.diffusion.lora_prefetch import LoraPrefetcher


def lora_file(path: Path, value: float, size: int = 64) -> tuple[str, Path]:
    save_file({"unet.x.lora_A.weight": torch.full((size, 4), value)}, str(path))
    return hashlib.sha256(path.read_bytes()).hexdigest(), path


def wait_for(prefetcher: LoraPrefetcher, reads: int) -> None:
    deadline = time.monotonic() + 10
    while prefetcher.reads < reads and time.monotonic() < deadline:
        time.sleep(0.01)


def test_a_wanted_file_is_read_checked_and_taken_once(tmp_path: Path) -> None:
    prefetcher = LoraPrefetcher(1 << 20)
    prefetcher.start()
    try:
        sha, path = lora_file(tmp_path / "a.safetensors", 0.5)
        prefetcher.want(sha, path)
        wait_for(prefetcher, 1)
        assert prefetcher.verified(sha)
        taken = prefetcher.take(sha)
        assert taken is not None
        assert torch.equal(taken.tensors["unet.x.lora_A.weight"], torch.full((64, 4), 0.5))
        assert prefetcher.take(sha) is None  # taken once
    finally:
        prefetcher.stop()


def test_a_file_changed_since_import_is_neither_verified_nor_kept(tmp_path: Path) -> None:
    prefetcher = LoraPrefetcher(1 << 20)
    prefetcher.start()
    try:
        sha, path = lora_file(tmp_path / "a.safetensors", 0.5)
        lora_file(path, 0.25)  # replaced after the catalog hashed it
        other_sha, other = lora_file(tmp_path / "b.safetensors", 1.0)
        prefetcher.want(sha, path)
        prefetcher.want(other_sha, other)
        wait_for(prefetcher, 1)
        time.sleep(0.05)
        assert not prefetcher.verified(sha)
        assert prefetcher.take(sha) is None
        assert prefetcher.verified(other_sha)
    finally:
        prefetcher.stop()


def test_resident_files_are_not_read_and_the_budget_drops_the_oldest(tmp_path: Path) -> None:
    one = lora_file(tmp_path / "one.safetensors", 1.0, size=1024)
    budget = one[1].stat().st_size * 2 + 10
    prefetcher = LoraPrefetcher(budget)
    prefetcher.start()
    try:
        prefetcher.want(*one, resident=True)
        files = [lora_file(tmp_path / f"{i}.safetensors", float(i), size=1024) for i in range(3)]
        for sha, path in files:
            prefetcher.want(sha, path)
        wait_for(prefetcher, 3)
        assert prefetcher.reads == 3  # not the resident one
        assert prefetcher.take(files[0][0]) is None  # the oldest made room
        assert prefetcher.take(files[1][0]) is not None
        assert prefetcher.take(files[2][0]) is not None
    finally:
        prefetcher.stop()


def test_without_a_budget_nothing_is_read(tmp_path: Path) -> None:
    prefetcher = LoraPrefetcher(0)
    prefetcher.start()
    sha, path = lora_file(tmp_path / "a.safetensors", 0.5)
    prefetcher.want(sha, path)
    assert prefetcher.take(sha) is None
    prefetcher.stop()
