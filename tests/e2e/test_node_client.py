"""The polyglot check: `interop/node/check.mjs`, a Node.js client (@grpc/grpc-js with the
protos, and a reflection client that works as grpcurl does), against a real server that wants
a bearer token. Node and the npm packages are part of the dev install (`make install`), so
their absence fails this test rather than skipping it."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from client import LoracleClient
from server.application.security import token_sha256
from server.devtools.local_server import RunningServer, start_server, wait_for_models
from server.devtools.synthetic_loras import write_demo_loras

REPO = Path(__file__).resolve().parents[2]
NODE_PROJECT = REPO / "interop" / "node"
CHECK = NODE_PROJECT / "check.mjs"
DOC = REPO / "docs" / "polyglot.md"
# The runnable examples of the doc: ```js blocks that open with their file name.
EXAMPLE = re.compile(r"```js\n(// interop/node/(\S+\.mjs).*?)```", re.DOTALL)
TOKEN = "node-check-token"
NODE_SECONDS = 90


def node() -> str:
    path = shutil.which("node")
    if path is None:
        pytest.fail("`node` is not on PATH: the polyglot check needs Node.js 20 or later")
    return path


def node_check_command() -> list[str]:
    executable = node()
    if not (NODE_PROJECT / "node_modules" / "@grpc" / "grpc-js").is_dir():
        pytest.fail(
            f"{NODE_PROJECT.relative_to(REPO)}/node_modules is missing: run `make install` "
            "(it runs `npm ci --prefix interop/node`)"
        )
    return [executable, str(CHECK)]


def run_check(address: str, *args: str) -> tuple[int, dict[str, Any], str]:
    """Runs check.mjs; returns its exit status, its JSON summary line and its stderr."""
    command = [*node_check_command(), address, *args]
    done = subprocess.run(
        command, capture_output=True, text=True, timeout=NODE_SECONDS, cwd=REPO, check=False
    )
    lines = done.stdout.strip().splitlines()
    assert lines, f"check.mjs printed nothing (exit {done.returncode}):\n{done.stderr}"
    summary: dict[str, Any] = json.loads(lines[-1])
    return done.returncode, summary, done.stderr


@pytest.fixture(scope="module")
def ready(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    """A server with the demo library imported, the embedded model loaded and one token."""
    data_dir = tmp_path_factory.mktemp("node")
    write_demo_loras(data_dir / "loras")
    settings = data_dir / "settings.toml"
    settings.write_text(
        f'[[tokens]]\nname = "node"\nsha256 = "{token_sha256(TOKEN)}"\nscopes = ["admin"]\n'
    )
    running = start_server(data_dir, "--config", str(settings))
    try:
        with LoracleClient(running.address, token=TOKEN) as client:
            done = list(client.import_loras())[-1]
            assert done.progress.registered == 6
            client.list_loras(consistency_token=done.consistency_token)  # projected
            wait_for_models(client, timeout=60)
        yield running
    finally:
        running.stop()


def test_node_client_with_protos_and_with_reflection(ready: RunningServer) -> None:
    status, summary, stderr = run_check(ready.address, "--token", TOKEN)
    assert status == 0, (summary, stderr, ready.log()[-4000:])
    assert summary["ok"] is True
    # With the protos: the whole catalog two at a time, and a verified generation.
    assert (summary["loras_paged"], summary["pages"], summary["total_size"]) == (6, 3, 6)
    assert summary["images"] == 1
    assert summary["image_bytes"] > 0
    assert summary["mime_type"] == "image/png"
    assert summary["sha256_ok"] is True
    assert summary["completed"] is True
    # Through reflection only: what grpcurl would see.
    assert set(summary["services"]) >= {
        "loracle.v1.CommandService",
        "loracle.v1.QueryService",
        "grpc.health.v1.Health",
        "grpc.reflection.v1alpha.ServerReflection",
    }
    assert {"ListLoras", "ListBaseModels", "WatchGeneration"} <= set(summary["reflection_methods"])
    assert summary["reflection_base_models"] == ["tiny-sd15"]
    assert summary["reflection_base_models_ready"] is True


def test_node_client_fails_without_the_token(ready: RunningServer) -> None:
    status, summary, _ = run_check(ready.address)
    assert status == 1
    assert summary["ok"] is False
    assert summary["error"].startswith("UNAUTHENTICATED"), summary


def test_the_node_examples_of_the_doc_run(ready: RunningServer) -> None:
    examples = EXAMPLE.findall(DOC.read_text())
    assert [name for _, name in examples] == ["catalog.mjs", "discover.mjs"]
    node_check_command()  # fails clearly when node or node_modules is missing
    env = {**os.environ, "LORACLE_ADDRESS": ready.address, "LORACLE_TOKEN": TOKEN}
    outputs = {}
    for code, name in examples:
        # As if saved in interop/node/: bare imports and ./reflection.mjs resolve from there.
        done = subprocess.run(
            [node(), "--input-type=module", "--eval", code],
            capture_output=True,
            text=True,
            timeout=NODE_SECONDS,
            cwd=NODE_PROJECT,
            env=env,
            check=False,
        )
        assert done.returncode == 0, (name, done.stderr)
        outputs[name] = done.stdout
    assert outputs["catalog.mjs"].count(" ARCHITECTURE_") == 6  # one line per LoRA
    assert "sha256 ok" in outputs["catalog.mjs"]
    assert "completed" in outputs["catalog.mjs"]
    assert "loracle.v1.QueryService" in outputs["discover.mjs"]
    assert "tiny-sd15" in outputs["discover.mjs"]
