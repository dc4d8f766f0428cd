"""Hostile files in the LoRA root, against a real server: RegisterLora refuses each with
INVALID_ARGUMENT on `path` and a message that says why, and changes nothing (catalog size and
event log as before); ImportLoras reports each as FAILED with an error, registers none of them,
and still imports the good files beside them. Pickle formats are refused by extension and
never unpickled (a pickle that would create a marker directory proves it); a FIFO never hangs
a reader (RegisterLora refuses it; the import scan skips anything that is not a file or a
symlink); symlinks, `..` and absolute paths cannot reach outside the roots.

Not covered: unreadable files (chmod 000) since the suite may run as root, which reads them
anyway; the reader turns any OSError into BAD_LORA_FILE ("cannot be read").
"""

from __future__ import annotations

import json
import os
import pickle
import struct
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file

from client import InvalidArgument, LoracleClient
from loracle.v1 import command_service_pb2
from server.devtools.local_server import RunningServer, start_server
from server.devtools.synthetic_loras import write_synthetic_lora
from server.domain.models import Architecture

FAILED = command_service_pb2.IMPORT_OUTCOME_FAILED
REGISTERED = command_service_pb2.IMPORT_OUTCOME_REGISTERED
UNCHANGED = command_service_pb2.IMPORT_OUTCOME_UNCHANGED


class Unpickled:
    """Unpickling this creates `marker`: proof that a server ran pickle.load on the file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Callable[[str], None], tuple[str]]:
        return os.mkdir, (str(self.marker),)


@dataclass(frozen=True)
class World:
    server: RunningServer
    outside: Path  # a folder outside every LoRA root
    marker: Path  # must never exist


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    data = tmp_path_factory.mktemp("hostile")
    outside = tmp_path_factory.mktemp("outside")
    running = start_server(data, "--no-embedded-model")
    try:
        yield World(running, outside, outside / "UNPICKLED")
    finally:
        running.stop()
    assert not (outside / "UNPICKLED").exists(), "the server unpickled a file"


# --- the hostile files --------------------------------------------------------------------------


def good_lora(path: Path, seed: int = 0) -> Path:
    return write_synthetic_lora(path, architecture=Architecture.SD1, name=path.stem, seed=seed)


def raw_safetensors(
    path: Path, header: bytes, data: bytes = b"", length: int | None = None
) -> Path:
    declared = len(header) if length is None else length
    path.write_bytes(struct.pack("<Q", declared) + header + data)
    return path


def truncated(path: Path) -> Path:
    data = good_lora(path).read_bytes()
    path.write_bytes(data[:100])
    return path


def data_cut_short(path: Path) -> Path:
    data = good_lora(path).read_bytes()
    path.write_bytes(data[:-10])
    return path


def full_model(path: Path) -> Path:
    tensors = {"model.diffusion_model.input_blocks.0.0.weight": np.zeros((8, 4, 3, 3), np.float16)}
    save_file(tensors, str(path))
    return path


def random_names(path: Path) -> Path:
    rng = np.random.default_rng(3)
    save_file(
        {f"t{i}.{rng.integers(1 << 30)}": np.ones((2, 2), np.float32) for i in range(5)}, str(path)
    )
    return path


def pickled(marker: Path) -> Callable[[Path], Path]:
    def write(path: Path) -> Path:
        path.write_bytes(pickle.dumps(Unpickled(marker)))
        return path

    return write


def fifo(path: Path) -> Path:
    os.mkfifo(path)
    return path


def directory(path: Path) -> Path:
    path.mkdir()
    good_lora(path / "inside.safetensors")
    return path


def link_to(target: Path) -> Callable[[Path], Path]:
    def write(path: Path) -> Path:
        path.symlink_to(target)
        return path

    return write


@dataclass(frozen=True)
class Case:
    """A hostile file: `make` writes it at the path it is given (a name in the LoRA root)."""

    name: str
    file_name: str
    make: Callable[[Path], Path]
    why: str  # expected in the error message
    in_import: bool = True  # the import scan lists it (and must report it FAILED)


def text_file(data: bytes) -> Callable[[Path], Path]:
    def write(path: Path) -> Path:
        path.write_bytes(data)
        return path

    return write


def header(value: object, data: bytes = b"") -> Callable[[Path], Path]:
    return lambda path: raw_safetensors(path, json.dumps(value).encode(), data)


def raw(body: bytes) -> Callable[[Path], Path]:
    return lambda path: raw_safetensors(path, body)


def declared(length: int, body: bytes) -> Callable[[Path], Path]:
    return lambda path: raw_safetensors(path, body, length=length)


def loop(path: Path) -> Path:
    path.symlink_to(path)
    return path


OUTSIDE = "outside the configured LoRA roots"
PICKLE = "pickle-based format"
NOT_SAFETENSORS = "not a safetensors file"


def cases(world: World) -> list[Case]:
    outside_lora = good_lora(world.outside / "outside.safetensors", seed=9)
    malformed = {"x.lora_down.weight": {"shape": [1], "data_offsets": [0, 2]}}
    beyond = {"x.lora_down.weight": {"dtype": "F16", "shape": [2**40], "data_offsets": [0, 2**41]}}
    return [
        Case("zero-length", "empty.safetensors", text_file(b""), "empty file"),
        Case("seven bytes", "tiny.safetensors", text_file(b"1234567"), "only 7 bytes"),
        Case("truncated header", "truncated.safetensors", truncated, "truncated: header says"),
        Case("truncated data", "short.safetensors", data_cut_short, "data_offsets outside"),
        Case("header length 2**60", "huge.safetensors", declared(2**60, b"{}"), "header too large"),
        Case("length 2**64-1", "huger.safetensors", declared(2**64 - 1, b"{}"), "header too large"),
        Case("header length 0", "zero.safetensors", declared(0, b"{}"), NOT_SAFETENSORS),
        Case("header not JSON", "notjson.safetensors", raw(b"{nope}"), "not valid JSON"),
        Case("header not UTF-8", "latin.safetensors", raw(b'{"\xff":1}'), "not UTF-8"),
        Case("header a JSON list", "list.safetensors", header([1, 2]), NOT_SAFETENSORS),
        Case("tensor entry malformed", "malformed.safetensors", header(malformed), "has no dtype"),
        Case("offsets beyond the file", "offsets.safetensors", header(beyond), "data_offsets"),
        Case(
            "full model, not a LoRA",
            "model.safetensors",
            full_model,
            "no LoRA or embedding tensors",
        ),
        Case(
            "random tensor names",
            "random.safetensors",
            random_names,
            "no LoRA or embedding tensors",
        ),
        Case("pickle .ckpt", "evil.ckpt", pickled(world.marker), PICKLE),
        Case("pickle .pt", "evil.pt", pickled(world.marker), PICKLE),
        Case("pickle .pth", "evil.pth", pickled(world.marker), PICKLE),
        Case("pickle .bin", "evil.bin", pickled(world.marker), PICKLE),
        Case("pickle upper-case .CKPT", "evil2.CKPT", pickled(world.marker), PICKLE),
        Case(
            "pickle named .safetensors", "pkl.safetensors", pickled(world.marker), NOT_SAFETENSORS
        ),
        Case("symlink to /etc/passwd", "passwd.safetensors", link_to(Path("/etc/passwd")), OUTSIDE),
        Case("symlink to a LoRA outside", "escape.safetensors", link_to(outside_lora), OUTSIDE),
        Case("dangling symlink", "dangling.safetensors", link_to(world.outside / "gone"), OUTSIDE),
        Case("symlink loop", "loop.safetensors", loop, "does not exist"),
        Case("FIFO", "pipe.safetensors", fifo, "not a regular file", in_import=False),
        Case("directory", "dir.safetensors", directory, "not a regular file", in_import=False),
        Case("text file", "notes.txt", text_file(b"hi"), "extension '.txt'", in_import=False),
    ]


# Paths that name nothing hostile on disk but try to leave the roots.
BAD_PATHS = [
    ("parent", "../outside.safetensors", "must not contain '..' components"),
    ("parent inside", "mixed/../../outside.safetensors", "must not contain '..' components"),
    ("backslash parent", "mixed\\..\\..\\x.safetensors", "must not contain '..' components"),
    ("absolute /etc/passwd", "/etc/passwd", "outside the configured LoRA roots"),
    ("empty", "", "must not be empty"),
    ("NUL", "a\0.safetensors", "must not contain NUL characters"),
    ("missing", "missing.safetensors", "does not exist"),
    ("name too long", "n" * 300 + ".safetensors", "cannot be accessed"),
    ("directory without suffix", ".", "not a safetensors file (extension 'none')"),
]


# --- observing side effects ---------------------------------------------------------------------


@dataclass(frozen=True)
class Snapshot:
    loras: int
    events: tuple[int, ...]


def snapshot(client: LoracleClient, token: str = "") -> Snapshot:
    """The catalog size and the event log, once the read model has seen the write `token`."""
    events = tuple(e.position for e in client.iter_events(page_size=1000, consistency_token=token))
    return Snapshot(client.list_loras(consistency_token=token).total_size, events)


# --- RegisterLora -------------------------------------------------------------------------------


def test_register_refuses_every_hostile_file_without_side_effects(world: World) -> None:
    root = world.server.lora_root / "single"
    root.mkdir()
    with LoracleClient(world.server.address, timeout=10) as client:
        before = snapshot(client)
        for case in cases(world):
            case.make(root / case.file_name)
            for path in (f"single/{case.file_name}", str(root / case.file_name)):
                with pytest.raises(InvalidArgument) as refused:
                    client.register_lora(path, request_id=f"hostile-{case.name}-{path[:1]}")
                error = refused.value
                assert error.field_violations, case.name
                assert error.field_violations[0][0] == "path", case.name
                assert case.why in error.message, f"{case.name}: {error.message}"
                assert "Traceback" not in error.message
            assert snapshot(client) == before, f"{case.name} left a trace"
        outside = str(world.outside / "outside.safetensors")
        for name, path, why in [*BAD_PATHS, ("absolute outside", outside, "outside the")]:
            with pytest.raises(InvalidArgument) as refused:
                client.register_lora(path)
            assert why in refused.value.message, f"{name}: {refused.value.message}"
            assert refused.value.field_violations[0][0] == "path", name
        time.sleep(0.2)  # anything written asynchronously would show by now
        assert snapshot(client) == before
    assert not world.marker.exists()


def test_a_retry_of_a_refused_request_is_refused_again(world: World) -> None:
    """A refusal records nothing under its request_id, so the retry is judged afresh."""
    path = world.server.lora_root / "later.safetensors"
    path.write_bytes(b"")
    with LoracleClient(world.server.address, timeout=10) as client:
        with pytest.raises(InvalidArgument):
            client.register_lora("later.safetensors", request_id="retry-me")
        good_lora(path, seed=4)
        created = client.register_lora("later.safetensors", request_id="retry-me")
        snapshot(client, created.consistency_token)  # the next test starts from all of it
    assert created.created
    assert created.lora.file.path == "later.safetensors"


# --- ImportLoras --------------------------------------------------------------------------------


def test_import_fails_each_hostile_file_and_imports_the_good_ones(world: World) -> None:
    folder = world.server.lora_root / "mixed"
    folder.mkdir()
    hostile = cases(world)
    for case in hostile:
        case.make(folder / case.file_name)
    good = [good_lora(folder / f"good{i}.safetensors", seed=100 + i) for i in range(3)]

    with LoracleClient(world.server.address, timeout=30, stream_timeout=60) as client:
        before = snapshot(client)
        responses = list(client.import_loras("mixed"))
        results = {r.file.path: r.file for r in responses if r.HasField("file")}
        final = responses[-1]
        assert final.done

        listed = [c for c in hostile if c.in_import]
        for case in listed:
            result = results.pop(f"mixed/{case.file_name}")
            assert result.outcome == FAILED, case.name
            assert case.why in result.error, f"{case.name}: {result.error}"
            assert not result.lora_id, case.name
        registered = {path: r.lora_id for path, r in results.items() if r.outcome == REGISTERED}
        # The directory named .safetensors is scanned like any folder: its LoRA is good.
        expected_good = {f"mixed/{p.name}" for p in good} | {
            "mixed/dir.safetensors/inside.safetensors"
        }
        assert set(registered) == expected_good
        assert set(results) == expected_good, "a hostile file was neither FAILED nor skipped"
        assert final.progress.failed == len(listed)
        assert final.progress.registered == len(expected_good)

        after = snapshot(client, final.consistency_token)
        assert after.loras == before.loras + len(expected_good)
        new_events = [
            e
            for e in client.iter_events(page_size=1000, consistency_token=final.consistency_token)
            if e.position not in before.events
        ]
        assert {e.aggregate_id for e in new_events} <= set(registered.values()) | {""}
        assert {e.aggregate_id for e in new_events} >= set(registered.values())
        for event in new_events:
            for case in hostile:
                assert case.file_name not in event.data_json or case.file_name.startswith(
                    "dir.safetensors"
                ), f"an event mentions {case.file_name}"

        # A second import changes nothing: the bad files fail again, the good are unchanged.
        again = list(client.import_loras("mixed"))
        outcomes = {r.file.path: r.file.outcome for r in again if r.HasField("file")}
        assert all(outcomes[f"mixed/{c.file_name}"] == FAILED for c in listed)
        assert all(outcomes[path] == UNCHANGED for path in expected_good)
        assert snapshot(client, again[-1].consistency_token).loras == after.loras
    assert not world.marker.exists()
