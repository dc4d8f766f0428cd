"""Textual-inversion embeddings through the real server and the `loracle` CLI: imported by
a directory scan beside a LoRA, listed by kind, and recorded in a generated PNG."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from client import LoracleClient
from client.cli import main
from server.devtools.local_server import RunningServer, wait_for_models
from server.devtools.synthetic_loras import write_synthetic_lora
from server.devtools.tiny_embeddings import write_embedding_for_pipeline
from server.domain.models import Architecture, BaseModelConfig
from server.infrastructure.diffusion.registry import EMBEDDED_NAME, load_pipeline
from server.infrastructure.lora_files import sha256_file


@pytest.fixture(scope="module")
def ready(server: RunningServer) -> RunningServer:
    with LoracleClient(server.address) as client:
        wait_for_models(client, timeout=120)
    return server


def test_import_list_by_kind_and_generate_with_an_embedding(
    ready: RunningServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = ready.lora_root / "ti"
    write_synthetic_lora(
        folder / "crayon.safetensors", architecture=Architecture.SD1, name="crayon"
    )
    pipe = load_pipeline(
        BaseModelConfig(EMBEDDED_NAME, Architecture.SD1, ready.data_dir / "models" / EMBEDDED_NAME)
    )
    embedding = write_embedding_for_pipeline(
        pipe, folder / "EasyNegative.safetensors", vectors=2, architecture="SD1", seed=4
    )
    server = ["--server", ready.address]
    assert main([*server, "loras", "import", "ti"]) == 0
    capsys.readouterr()

    assert main([*server, "--json", "loras", "list", "--kind", "embedding"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert [(x["file_name"], x["kind"]) for x in listed] == [
        ("EasyNegative", "LORA_KIND_EMBEDDING")
    ]
    assert main([*server, "--json", "loras", "list", "--kind", "lora"]) == 0
    loras = json.loads(capsys.readouterr().out)
    assert "crayon" in [x["file_name"] for x in loras]
    assert "EasyNegative" not in [x["file_name"] for x in loras]
    assert main([*server, "loras", "list", "--kind", "embedding"]) == 0
    assert "embedding" in capsys.readouterr().out  # the table's kind column

    out = tmp_path / "fox.png"
    argv = ["generate", "a fox", "--negative", "EasyNegative", "--steps", "2", "--seed", "5"]
    assert main([*server, *argv, "-o", str(out)]) == 0
    parameters = Image.open(out).info["parameters"]
    assert f'TI hashes: "EasyNegative: {sha256_file(embedding)[:12]}"' in parameters
    manifest = json.loads(Image.open(out).info["loracle"])
    assert [x["name"] for x in manifest["embeddings"]] == ["EasyNegative"]
