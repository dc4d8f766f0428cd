"""The `loracle` CLI against the live server, as a user would run it."""

from __future__ import annotations

import importlib.metadata
import json
import subprocess
import sys
from pathlib import Path

import pytest

from client.cli import main
from server.devtools.local_server import RunningServer


def cli(server: RunningServer, *args: str) -> list[str]:
    return ["--server", server.address, *args]


def test_import_list_show_events(server: RunningServer, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(cli(server, "loras", "import", "styles")) == 0
    out = capsys.readouterr().out
    assert "registered" in out
    assert main(cli(server, "--json", "loras", "list", "--base-model", "SD 1.5")) == 0
    listed = json.loads(capsys.readouterr().out)
    names = sorted(lora["name"] for lora in listed)
    assert names == ["Pixel Art", "Watercolor Style", "ink_sketch_peft"]
    watercolor = next(lora for lora in listed if lora["name"] == "Watercolor Style")
    assert main(cli(server, "loras", "show", watercolor["id"][:8])) == 0
    shown = capsys.readouterr().out
    assert watercolor["file"]["autov2"] in shown
    assert "Watercolor Style" in shown
    assert main(cli(server, "--json", "events", "--aggregate", watercolor["id"])) == 0
    events = json.loads(capsys.readouterr().out)
    assert events[0]["type"] == "LoraRegistered"
    # Global options after the command, and the id prefix the tables show.
    argv = ["events", "--aggregate", watercolor["id"][:8], "--tail", "1", "--json"]
    assert main([*argv, "--server", server.address]) == 0
    assert json.loads(capsys.readouterr().out) == events[-1:]


def test_catalog_import_from_jsonl(
    server: RunningServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "catalog.jsonl"
    rows = [
        {
            "source_id": f"cli:{i}",
            "name": f"Cli {i}",
            "base_model": "SDXL 1.0",
            "tags": ["cli-test"],
            "trigger_words": [],
            "file_name": f"cli_{i}",
            "description": "",
            "downloads": 3,
        }
        for i in range(40)
    ]
    rows.append({"source_id": "", "name": "broken"})
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    assert main(cli(server, "loras", "import-catalog", str(path), "--batch-size", "15")) == 0
    out = capsys.readouterr().out
    assert "created 40" in out
    assert "errors 1" in out
    assert main(cli(server, "--json", "loras", "list", "--tag", "cli-test", "--limit", "0")) == 0
    assert len(json.loads(capsys.readouterr().out)) == 40


def test_errors_are_readable_and_exit_non_zero(
    server: RunningServer, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(cli(server, "loras", "show", "00000000-0000-0000-0000-000000000000")) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: NOT_FOUND")
    assert "Traceback" not in err
    assert main(["--server", "127.0.0.1:1", "--timeout", "2", "loras", "list"]) == 1
    assert "could not be reached" in capsys.readouterr().err


def test_console_script_is_installed(server: RunningServer) -> None:
    exe = Path(sys.executable).with_name("loracle")
    result = subprocess.run(
        [str(exe), "--server", server.address, "loras", "list"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert "Watercolor" in result.stdout or "Pixel Art" in result.stdout


@pytest.mark.parametrize("name", ["loracle", "loracle-server"])
def test_both_console_scripts_print_their_version(name: str) -> None:
    exe = Path(sys.executable).with_name(name)
    result = subprocess.run([str(exe), "--version"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"{name} {importlib.metadata.version('loracle')}"
