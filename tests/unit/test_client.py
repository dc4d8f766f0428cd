"""Client library and CLI against a real grpc.aio server running a small fake servicer.

The fake only implements what these tests exercise; every other method falls through to the
generated base class, which answers UNIMPLEMENTED like a server that lacks the feature.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.metadata
import inspect
import json
import socket
import subprocess
import sys
import threading
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn, TypeVar

import grpc
import grpc.aio
import pytest
from google.protobuf import duration_pb2
from google.protobuf.message import Message
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

from client import (
    AsyncLoracleClient,
    Internal,
    InvalidArgument,
    LoracleClient,
    LoracleError,
    NotFound,
    Unavailable,
    Unimplemented,
)
from client import cli as cli_module
from client.catalog import read_catalog_jsonl
from client.cli import main
from loracle.v1 import (
    command_service_pb2,
    command_service_pb2_grpc,
    query_service_pb2,
    query_service_pb2_grpc,
    types_pb2,
)

ROOT = Path(__file__).resolve().parents[2]
_Context = grpc.aio.ServicerContext[Any, Any]
_M = TypeVar("_M", bound=Message)

LORAS = [
    types_pb2.Lora(
        id=f"{n}" * 8 + "-1111-4111-8111-111111111111",
        name=f"lora-{n}",
        base_model=types_pb2.BaseModelRef(architecture=types_pb2.ARCHITECTURE_SDXL, lineage="Pony"),
        trigger_words=[f"trigger{n}"],
        tags=["style"],
        available=n % 2 == 1,
    )
    for n in range(1, 6)
]
# Two generations share their first 8 characters, as ids shown in a table may.
GENERATIONS = [
    types_pb2.Generation(
        id=gid,
        state=types_pb2.GENERATION_STATE_RUNNING,
        spec=types_pb2.GenerationSpec(prompt="a lighthouse", model="tiny"),
        owner="alice",
    )
    for gid in (
        "820fcc0a-1111-4111-8111-111111111111",
        "abcdef01-1111-4111-8111-111111111111",
        "abcdef01-2222-4111-8111-111111111111",
    )
]
EVENTS = [
    types_pb2.AuditEvent(position=n, aggregate_id=LORAS[n % 2].id, type=kind, principal="ci")
    for n, kind in enumerate(
        ["LoraRegistered", "LoraRegistered", "LoraUpdated", "LoraCatalogRecordImported"], 1
    )
]


async def _abort(
    context: _Context, code: grpc.StatusCode, message: str, *details: Message
) -> NoReturn:
    status = status_pb2.Status(code=code.value[0], message=message)
    for detail in details:
        status.details.add().Pack(detail)
    await context.abort_with_status(rpc_status.to_status(status))
    raise AssertionError("abort_with_status returned")


def _error_info(reason: str, **metadata: str) -> Message:
    info: Message = error_details_pb2.ErrorInfo(
        reason=reason, domain="loracle.v1", metadata=metadata
    )
    return info


class FakeCommands(command_service_pb2_grpc.CommandServiceServicer):
    def __init__(self, requests: list[Message]) -> None:
        self.requests = requests

    async def RegisterLora(
        self, request: command_service_pb2.RegisterLoraRequest, context: _Context
    ) -> command_service_pb2.RegisterLoraResponse:
        self.requests.append(request)
        if not request.path:
            bad_request = error_details_pb2.BadRequest()
            violation = bad_request.field_violations.add()
            violation.field = "path"
            violation.description = "must not be empty"
            await _abort(
                context,
                grpc.StatusCode.INVALID_ARGUMENT,
                "path: must not be empty",
                bad_request,
                _error_info("INVALID_ARGUMENT"),
            )
        if request.path == "crash":
            await _abort(
                context,
                grpc.StatusCode.INTERNAL,
                "internal error",
                _error_info("INTERNAL", correlation_id="corr-123"),
            )
        if request.path == "busy":
            retry = error_details_pb2.RetryInfo(
                retry_delay=duration_pb2.Duration(seconds=1, nanos=500_000_000)
            )
            await _abort(
                context,
                grpc.StatusCode.UNAVAILABLE,
                "store is down",
                _error_info("STORE_UNAVAILABLE"),
                retry,
            )
        lora = types_pb2.Lora(id=str(uuid.uuid4()), name=Path(request.path).stem)
        return command_service_pb2.RegisterLoraResponse(
            lora=lora, created=True, consistency_token="t-register"
        )

    async def ImportLoras(
        self, request: command_service_pb2.ImportLorasRequest, context: _Context
    ) -> AsyncIterator[command_service_pb2.ImportLorasResponse]:
        self.requests.append(request)
        progress = command_service_pb2.ImportProgress(files_total=2, files_done=1, registered=1)
        yield command_service_pb2.ImportLorasResponse(
            file=command_service_pb2.ImportFileResult(
                path="a.safetensors", outcome=command_service_pb2.IMPORT_OUTCOME_REGISTERED
            ),
            progress=progress,
        )
        progress.files_done, progress.failed = 2, 1
        yield command_service_pb2.ImportLorasResponse(
            file=command_service_pb2.ImportFileResult(
                path="b.safetensors",
                outcome=command_service_pb2.IMPORT_OUTCOME_FAILED,
                error="not a LoRA",
            ),
            progress=progress,
        )
        progress.marked_unavailable = 3
        yield command_service_pb2.ImportLorasResponse(
            progress=progress, done=True, consistency_token="t-import"
        )

    async def ImportLoraCatalog(
        self, request: command_service_pb2.ImportLoraCatalogRequest, context: _Context
    ) -> command_service_pb2.ImportLoraCatalogResponse:
        """Empty name: refused; description "same": unchanged; "changed": updated."""
        self.requests.append(request)
        response = command_service_pb2.ImportLoraCatalogResponse(
            consistency_token=f"t-{request.request_id}"
        )
        for index, record in enumerate(request.records):
            if not record.name:
                response.errors.add(index=index, source_id=record.source_id, error="name: empty")
            elif record.description == "same":
                response.unchanged += 1
            elif record.description == "changed":
                response.updated += 1
            else:
                response.created += 1
        return response

    async def UpdateLora(
        self, request: command_service_pb2.UpdateLoraRequest, context: _Context
    ) -> command_service_pb2.UpdateLoraResponse:
        self.requests.append(request)
        return command_service_pb2.UpdateLoraResponse(lora=request.lora, consistency_token="t-up")

    async def CancelGeneration(
        self, request: command_service_pb2.CancelGenerationRequest, context: _Context
    ) -> command_service_pb2.CancelGenerationResponse:
        self.requests.append(request)
        generation = types_pb2.Generation(
            id=request.generation_id, state=types_pb2.GENERATION_STATE_CANCELLED
        )
        return command_service_pb2.CancelGenerationResponse(generation=generation)

    async def SubmitGeneration(
        self, request: command_service_pb2.SubmitGenerationRequest, context: _Context
    ) -> command_service_pb2.SubmitGenerationResponse:
        """Model "loading": not ready (with a retry delay) for the first two calls; "broken":
        never ready, and no retry delay; width 7: the server's BadRequest."""
        self.requests.append(request)
        tries = sum(isinstance(r, type(request)) for r in self.requests)
        if request.spec.model == "broken" or (request.spec.model == "loading" and tries < 3):
            retry = error_details_pb2.RetryInfo(retry_delay=duration_pb2.Duration(nanos=10**7))
            await _abort(
                context,
                grpc.StatusCode.FAILED_PRECONDITION,
                f"model {request.spec.model!r} is not ready: building",
                _error_info("MODEL_NOT_READY", model=request.spec.model),
                *([retry] if request.spec.model == "loading" else []),
            )
        if request.spec.width == 7:
            bad_request = error_details_pb2.BadRequest()
            bad_request.field_violations.add(
                field="spec.width", description="a multiple of 8 from 64 to 2048, or 0"
            )
            await _abort(
                context,
                grpc.StatusCode.INVALID_ARGUMENT,
                "spec.width: a multiple of 8 from 64 to 2048, or 0",
                bad_request,
                _error_info("INVALID_ARGUMENT"),
            )
        return command_service_pb2.SubmitGenerationResponse(generation_id=GENERATIONS[0].id)

    async def RecommendLoras(
        self, request: command_service_pb2.RecommendLorasRequest, context: _Context
    ) -> command_service_pb2.RecommendLorasResponse:
        self.requests.append(request)
        recs = [
            types_pb2.Recommendation(lora=LORAS[0], confidence=0.71, weight=0.8),
            types_pb2.Recommendation(lora=LORAS[2], confidence=0.001, weight=0.8),
        ]
        return command_service_pb2.RecommendLorasResponse(
            recommendation_id="rec-1", recommendations=recs
        )


class FakeQueries(query_service_pb2_grpc.QueryServiceServicer):
    def __init__(self, requests: list[Message]) -> None:
        self.requests = requests

    async def GetLora(
        self, request: query_service_pb2.GetLoraRequest, context: _Context
    ) -> query_service_pb2.GetLoraResponse:
        self.requests.append(request)
        for lora in LORAS:
            if lora.id == request.id:
                return query_service_pb2.GetLoraResponse(lora=lora)
        await _abort(
            context,
            grpc.StatusCode.NOT_FOUND,
            f"lora {request.id!r} not found",
            _error_info("LORA_NOT_FOUND", id=request.id),
        )

    async def ListLoras(
        self, request: query_service_pb2.ListLorasRequest, context: _Context
    ) -> query_service_pb2.ListLorasResponse:
        self.requests.append(request)
        loras = [lora for lora in LORAS if lora.available or not request.available_only]
        start = int(request.page_token or "0")
        end = start + (request.page_size or 50)
        return query_service_pb2.ListLorasResponse(
            loras=loras[start:end],
            next_page_token=str(end) if end < len(loras) else "",
            total_size=len(loras),
        )

    async def ListGenerations(
        self, request: query_service_pb2.ListGenerationsRequest, context: _Context
    ) -> query_service_pb2.ListGenerationsResponse:
        self.requests.append(request)
        start = int(request.page_token or "0")
        end = start + (request.page_size or 50)
        return query_service_pb2.ListGenerationsResponse(
            generations=GENERATIONS[start:end],
            next_page_token=str(end) if end < len(GENERATIONS) else "",
        )

    async def ListEvents(
        self, request: query_service_pb2.ListEventsRequest, context: _Context
    ) -> query_service_pb2.ListEventsResponse:
        self.requests.append(request)
        events = [
            e
            for e in EVENTS
            if request.aggregate_id in ("", e.aggregate_id) and request.type in ("", e.type)
        ]
        start = int(request.page_token or "0")
        end = start + (request.page_size or 100)
        return query_service_pb2.ListEventsResponse(
            events=events[start:end], next_page_token=str(end) if end < len(events) else ""
        )


@dataclass
class FakeServer:
    address: str
    requests: list[Message]

    def sent(self, kind: type[_M]) -> list[_M]:
        return [r for r in self.requests if isinstance(r, kind)]


@pytest.fixture
def fake() -> Iterator[FakeServer]:
    """Serves on its own loop in a thread so sync and async clients can both use it."""
    requests: list[Message] = []
    loop = asyncio.new_event_loop()
    ready: list[tuple[grpc.aio.Server, int]] = []
    started = threading.Event()

    async def start() -> None:
        # grpc.aio binds a server to the loop it is created on, so create it on the thread's.
        server = grpc.aio.server()
        command_service_pb2_grpc.add_CommandServiceServicer_to_server(
            FakeCommands(requests),  # type: ignore[abstract]
            server,
        )
        query_service_pb2_grpc.add_QueryServiceServicer_to_server(
            FakeQueries(requests),  # type: ignore[abstract]
            server,
        )
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        ready.append((server, port))

    def run() -> None:
        asyncio.set_event_loop(loop)
        try:
            loop.run_until_complete(start())
        finally:
            started.set()
        loop.run_forever()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    assert started.wait(10)
    assert ready, "fake server did not start"
    server, port = ready[0]
    yield FakeServer(f"127.0.0.1:{port}", requests)
    asyncio.run_coroutine_threadsafe(server.stop(None), loop).result(10)
    loop.call_soon_threadsafe(loop.stop)
    thread.join(10)
    loop.close()


@pytest.fixture
def client(fake: FakeServer) -> Iterator[LoracleClient]:
    with LoracleClient(fake.address, timeout=10) as c:
        yield c


def _closed_port_address() -> str:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"127.0.0.1:{port}"


# --- errors -------------------------------------------------------------------------------


def test_bad_request_maps_to_invalid_argument_with_violations(client: LoracleClient) -> None:
    with pytest.raises(InvalidArgument) as caught:
        client.register_lora("")
    err = caught.value
    assert err.code == grpc.StatusCode.INVALID_ARGUMENT
    assert err.message == "path: must not be empty"
    assert err.field_violations == [("path", "must not be empty")]
    assert err.reason == "INVALID_ARGUMENT"
    assert err.metadata == {}
    assert err.retry_after is None
    assert err.__cause__ is None
    assert err.__suppress_context__


def test_not_found_carries_error_info(client: LoracleClient) -> None:
    with pytest.raises(NotFound) as caught:
        client.get_lora("nope")
    assert caught.value.reason == "LORA_NOT_FOUND"
    assert caught.value.metadata == {"id": "nope"}
    assert str(caught.value) == "NOT_FOUND: lora 'nope' not found"


def test_internal_exposes_correlation_id(client: LoracleClient) -> None:
    with pytest.raises(Internal) as caught:
        client.register_lora("crash")
    assert caught.value.correlation_id == "corr-123"
    assert caught.value.metadata == {"correlation_id": "corr-123"}


def test_retry_info_becomes_retry_after(client: LoracleClient) -> None:
    with pytest.raises(Unavailable) as caught:
        client.register_lora("busy")
    assert caught.value.retry_after == pytest.approx(1.5)
    assert caught.value.reason == "STORE_UNAVAILABLE"


def test_unimplemented_method_raises_unimplemented(client: LoracleClient) -> None:
    with pytest.raises(Unimplemented):
        client.get_generation("g1")
    with pytest.raises(Unimplemented):
        list(client.watch_generation("g1"))


def test_unreachable_server_raises_unavailable_without_details() -> None:
    with LoracleClient(_closed_port_address(), timeout=5) as c, pytest.raises(Unavailable) as e:
        c.list_loras()
    assert e.value.reason == ""
    assert isinstance(e.value, LoracleError)


# --- commands -----------------------------------------------------------------------------


def test_request_id_is_generated_per_call_unless_given(
    client: LoracleClient, fake: FakeServer
) -> None:
    client.register_lora("a.safetensors")
    client.register_lora("a.safetensors")
    client.register_lora("a.safetensors", request_id="mine")
    first, second, third = (
        r.request_id for r in fake.sent(command_service_pb2.RegisterLoraRequest)
    )
    assert uuid.UUID(first).version == 4
    assert uuid.UUID(second).version == 4
    assert first != second
    assert third == "mine"


def test_catalog_import_batches_sums_and_shifts_error_indices(
    client: LoracleClient, fake: FakeServer
) -> None:
    records: list[Any] = [
        {"source_id": "s0", "name": "a", "unknown_key": 1, "tags": None, "downloads": None},
        command_service_pb2.CatalogRecord(source_id="s1", name="b", description="same"),
        {"source_id": "s2", "name": "c", "description": "changed", "downloads": 7.0},
        {"source_id": "s3", "name": ""},  # refused by the server: 2nd record of batch 1
        {"source_id": "s4", "name": "e", "downloads": "many"},  # refused locally
        {"source_id": "s5", "name": "f", "tags": ["x", "y"], "trigger_words": ["tw"]},
    ]
    seen: list[int] = []
    result = client.import_lora_catalog(
        records, batch_size=2, request_id="rid", on_batch=lambda n, _: seen.append(n)
    )

    sent = fake.sent(command_service_pb2.ImportLoraCatalogRequest)
    assert [r.request_id for r in sent] == ["rid:0", "rid:1", "rid:2"]
    assert [[rec.source_id for rec in r.records] for r in sent] == [
        ["s0", "s1"],
        ["s2", "s3"],
        ["s5"],
    ]
    assert (result.created, result.updated, result.unchanged) == (2, 1, 1)
    assert [(e.index, e.source_id) for e in result.errors] == [(3, "s3"), (4, "s4")]
    assert "downloads" in result.errors[1].error
    assert result.consistency_token == "t-rid:2"
    assert seen == [2, 4, 6]
    first = sent[0].records[0]
    assert (first.name, list(first.tags), first.downloads) == ("a", [], 0)
    assert sent[1].records[0].downloads == 7
    assert list(sent[2].records[0].tags) == ["x", "y"]


def test_catalog_import_generates_one_request_id_for_all_batches(
    client: LoracleClient, fake: FakeServer
) -> None:
    client.import_lora_catalog([{"name": str(n)} for n in range(5)], batch_size=2)
    ids = [r.request_id for r in fake.sent(command_service_pb2.ImportLoraCatalogRequest)]
    prefix = ids[0].rsplit(":", 1)[0]
    uuid.UUID(prefix)
    assert ids == [f"{prefix}:{n}" for n in range(3)]


def test_update_builds_mask_from_given_fields(client: LoracleClient, fake: FakeServer) -> None:
    response = client.update_lora("id-1", name="new", tags=[], preferred_weight=0.8)
    (request,) = fake.sent(command_service_pb2.UpdateLoraRequest)
    assert list(request.update_mask.paths) == ["name", "tags", "preferred_weight"]
    assert request.lora.id == "id-1"
    assert request.lora.HasField("preferred_weight")
    assert response.lora.name == "new"
    with pytest.raises(ValueError, match="at least one field"):
        client.update_lora("id-1")
    with pytest.raises(TypeError):
        client.update_lora("id-1", tags="style")


def test_import_loras_streams_until_done(client: LoracleClient) -> None:
    messages = list(client.import_loras("sub"))
    assert [m.done for m in messages] == [False, False, True]
    assert messages[-1].progress.failed == 1


# --- queries ------------------------------------------------------------------------------


def test_iter_loras_follows_page_tokens(client: LoracleClient, fake: FakeServer) -> None:
    names = [lora.name for lora in client.iter_loras(tag="style", page_size=2)]
    assert names == [f"lora-{n}" for n in range(1, 6)]
    requests = fake.sent(query_service_pb2.ListLorasRequest)
    assert [r.page_token for r in requests] == ["", "2", "4"]
    assert {r.tag for r in requests} == {"style"}


def test_get_lora_unwraps_response(client: LoracleClient) -> None:
    assert client.get_lora(LORAS[0].id) == LORAS[0]


# --- async client -------------------------------------------------------------------------


async def test_async_client_maps_errors_and_pages(fake: FakeServer) -> None:
    async with AsyncLoracleClient(fake.address, timeout=10) as c:
        with pytest.raises(NotFound) as caught:
            await c.get_lora("nope")
        assert caught.value.metadata == {"id": "nope"}
        with pytest.raises(InvalidArgument) as bad:
            await c.register_lora("")
        assert bad.value.field_violations == [("path", "must not be empty")]
        names = [lora.name async for lora in c.iter_loras(page_size=3)]
        assert names == [f"lora-{n}" for n in range(1, 6)]
        with pytest.raises(Unimplemented):
            await c.get_generation("g1")


async def test_async_catalog_import_and_stream(fake: FakeServer) -> None:
    async with AsyncLoracleClient(fake.address, timeout=10) as c:
        result = await c.import_lora_catalog(
            [{"name": "a"}, {"name": ""}, {"name": "c", "description": "same"}],
            batch_size=2,
            request_id="r",
        )
        assert (result.created, result.unchanged) == (1, 1)
        assert [e.index for e in result.errors] == [1]
        assert result.consistency_token == "t-r:1"
        done = [m.done async for m in c.import_loras()]
        assert done == [False, False, True]


# --- one implementation -------------------------------------------------------------------


def test_sync_client_is_generated_from_the_async_one() -> None:
    """A hand edit of client/sync_client.py, or an async edit not regenerated, fails here."""
    done = subprocess.run(
        [sys.executable, "scripts/unasync.py", "--check"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0, done.stderr


def _public_api(cls: type) -> dict[str, list[tuple[str, object, object]]]:
    renames = {"__aenter__": "__enter__", "__aexit__": "__exit__"}
    return {
        renames.get(name, name): [
            (p.name, p.kind, p.default) for p in inspect.signature(fn).parameters.values()
        ]
        for name, fn in vars(cls).items()
        if callable(fn) and (not name.startswith("_") or name.endswith("__"))
    }


def test_both_clients_offer_the_same_methods_and_parameters() -> None:
    assert _public_api(LoracleClient) == _public_api(AsyncLoracleClient)


# --- catalog file -------------------------------------------------------------------------


def test_read_catalog_jsonl_skips_blank_lines_and_reports_bad_ones(tmp_path: Path) -> None:
    good = tmp_path / "good.jsonl"
    good.write_text('{"name": "a"}\n\n{"name": "b"}\n', encoding="utf-8")
    assert [r["name"] for r in read_catalog_jsonl(good)] == ["a", "b"]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"name": "a"}\n{oops\n', encoding="utf-8")
    with pytest.raises(ValueError, match=r"bad\.jsonl:2"):
        list(read_catalog_jsonl(bad))


# --- CLI ----------------------------------------------------------------------------------


def test_cli_json_list(fake: FakeServer, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--server", fake.address, "--json", "loras", "list", "--limit", "3"]) == 0
    out = capsys.readouterr().out
    loras = json.loads(out)
    assert [lora["id"] for lora in loras] == [lora.id for lora in LORAS[:3]]
    assert loras[1]["available"] is False
    assert loras[0]["base_model"] == {"architecture": "ARCHITECTURE_SDXL", "lineage": "Pony"}


def test_cli_table_list(fake: FakeServer, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--server", fake.address, "loras", "list"]) == 0
    out = capsys.readouterr().out
    assert LORAS[4].id[:8] in out
    assert LORAS[4].id not in out
    assert "Pony / SDXL" in out


def test_cli_not_found_exits_1(fake: FakeServer, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--server", fake.address, "loras", "show", "nope"]) == 1
    captured = capsys.readouterr()
    assert captured.err.startswith("error: NOT_FOUND: 'nope' is not a LoRA id")
    assert "Traceback" not in captured.err
    assert captured.out == ""


def test_cli_prints_field_violations(fake: FakeServer, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--server", fake.address, "loras", "register", ""]) == 1
    assert capsys.readouterr().err.splitlines() == ["error: PATH: must not be empty"]


def test_cli_unreachable_server(capsys: pytest.CaptureFixture[str]) -> None:
    address = _closed_port_address()
    assert main(["--server", address, "--timeout", "5", "models"]) == 1
    err = capsys.readouterr().err
    assert f"error: UNAVAILABLE: the server at {address} could not be reached" in err


def test_cli_show_accepts_id_prefix(fake: FakeServer, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--server", fake.address, "--json", "loras", "show", "22222222"]) == 0
    assert json.loads(capsys.readouterr().out)["id"] == LORAS[1].id


def test_cli_update_sends_repeated_options(
    fake: FakeServer, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["--server", fake.address, "--json", "loras", "update", LORAS[0].id]
    argv += ["--trigger-word", "a", "--trigger-word", "b", "--description", "d"]
    assert main(argv) == 0
    (request,) = fake.sent(command_service_pb2.UpdateLoraRequest)
    assert list(request.update_mask.paths) == ["trigger_words", "description"]
    assert list(request.lora.trigger_words) == ["a", "b"]
    assert json.loads(capsys.readouterr().out)["lora"]["description"] == "d"


def test_cli_usage_errors_exit_2(fake: FakeServer, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--server", fake.address, "loras", "update", LORAS[0].id]) == 2
    assert main(["loras", "list", "--limit", "-1"]) == 2
    assert main(["nonsense"]) == 2
    assert fake.sent(command_service_pb2.UpdateLoraRequest) == []
    assert "usage:" in capsys.readouterr().err


def test_cli_import_catalog(
    fake: FakeServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "catalog.jsonl"
    lines = [
        {"source_id": "a", "name": "A"},
        {"source_id": "b", "name": ""},
        {"source_id": "c", "name": "C", "description": "changed"},
    ]
    path.write_text("".join(json.dumps(line) + "\n" for line in lines), encoding="utf-8")
    argv = ["--server", fake.address, "loras", "import-catalog", str(path), "--batch-size", "2"]
    assert main(argv) == 0
    assert capsys.readouterr().out.splitlines() == [
        "created 1, updated 1, unchanged 0, errors 1",
        "  record 1 (b): name: empty",
    ]
    assert len(fake.sent(command_service_pb2.ImportLoraCatalogRequest)) == 2


def test_cli_import_catalog_reports_bad_file(
    fake: FakeServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["--server", fake.address, "loras", "import-catalog", str(tmp_path / "x")]) == 1
    assert capsys.readouterr().err.startswith("error: cannot read")


def test_cli_import_directory(fake: FakeServer, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--server", fake.address, "loras", "import", "sub"]) == 0
    assert capsys.readouterr().out.splitlines() == [
        "failed: b.safetensors: not a LoRA",
        "registered 1, updated 0, unchanged 0, failed 1, marked unavailable 3",
    ]
    (request,) = fake.sent(command_service_pb2.ImportLorasRequest)
    assert request.directory == "sub"


# --- CLI: first contact (issue 12) ----------------------------------------------------------


def _walk(parser: argparse.ArgumentParser, path: str) -> Iterator[tuple[str, argparse.Action]]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for choice in action._choices_actions:
                yield f"{path} {choice.dest}", choice
            for name, sub in action.choices.items():
                yield from _walk(sub, f"{path} {name}")
        elif not isinstance(action, argparse._HelpAction):
            yield f"{path} {'/'.join(action.option_strings) or action.dest}", action


def test_cli_every_command_and_option_has_help() -> None:
    missing = [
        where
        for where, action in _walk(cli_module._build_parser(), "loracle")
        if not action.help or action.help == argparse.SUPPRESS
    ]
    assert missing == []


def test_cli_global_options_work_after_the_subcommand(
    fake: FakeServer, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["loras", "list", "--json", "--server", fake.address, "--limit", "2"]) == 0
    assert [lora["id"] for lora in json.loads(capsys.readouterr().out)] == [
        lora.id for lora in LORAS[:2]
    ]
    argv = ["generate", "x", "--detach", "--server", fake.address, "--json"]
    assert main(argv) == 0
    assert json.loads(capsys.readouterr().out)["generation_id"] == GENERATIONS[0].id


def test_cli_state_offers_no_empty_choice(
    fake: FakeServer, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["--server", fake.address, "generations", "--state", ""]) == 2
    assert "'', " not in capsys.readouterr().err
    assert main(["--server", fake.address, "--json", "generations"]) == 0
    (request,) = fake.sent(query_service_pb2.ListGenerationsRequest)
    assert request.state == types_pb2.GENERATION_STATE_UNSPECIFIED


def test_cli_version(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"loracle {importlib.metadata.version('loracle')}"


def test_cli_cancel_accepts_the_prefix_the_table_shows(
    fake: FakeServer, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["--server", fake.address, "generations"]) == 0
    table = capsys.readouterr().out
    assert "820fcc0a " in table
    assert GENERATIONS[0].id not in table
    assert "…" not in table
    assert main(["--server", fake.address, "cancel", "820fcc0a"]) == 0
    (request,) = fake.sent(command_service_pb2.CancelGenerationRequest)
    assert request.generation_id == GENERATIONS[0].id
    assert capsys.readouterr().out.strip() == f"{GENERATIONS[0].id}: cancelled"


def test_cli_ambiguous_or_unknown_prefixes_are_refused(
    fake: FakeServer, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["--server", fake.address, "cancel", "abcdef01"]) == 1
    err = capsys.readouterr().err
    assert "'abcdef01' matches 2 generations (abcdef01-111…, abcdef01-222…)" in err
    listed = len(fake.sent(query_service_pb2.ListGenerationsRequest))
    assert main(["--server", fake.address, "watch", "99999999"]) == 1
    assert "NOT_FOUND: no generation has an id starting with '99999999'" in capsys.readouterr().err
    assert fake.sent(command_service_pb2.CancelGenerationRequest) == []
    # Looked up again for a while: a generation submitted a moment ago by another process
    # reaches the listed read model a little later.
    assert len(fake.sent(query_service_pb2.ListGenerationsRequest)) - listed > 2


def test_cli_generations_all_and_owner(
    fake: FakeServer, capsys: pytest.CaptureFixture[str]
) -> None:
    """`--all` asks for every principal's and adds an owner column; `--owner` one's."""
    assert main(["--server", fake.address, "generations"]) == 0
    assert "owner" not in capsys.readouterr().out.splitlines()[0]
    assert main(["--server", fake.address, "generations", "--all"]) == 0
    header, *rows = capsys.readouterr().out.splitlines()
    assert header.split()[:2] == ["id", "owner"]
    assert all(" alice " in row for row in rows)
    assert main(["--server", fake.address, "generations", "--owner", "bob"]) == 0
    requests = fake.sent(query_service_pb2.ListGenerationsRequest)
    assert [(r.all_owners, r.owner) for r in requests[-3:]] == [
        (False, ""),
        (True, ""),
        (False, "bob"),
    ]


def test_cli_wide_tables_show_whole_ids(
    fake: FakeServer, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["--server", fake.address, "generations", "--wide"]) == 0
    assert GENERATIONS[0].id in capsys.readouterr().out


def test_cli_tables_fit_the_terminal(
    fake: FakeServer, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    assert main(["--server", fake.address, "loras", "list"]) == 0
    assert max(len(line) for line in capsys.readouterr().out.splitlines()) > 50
    monkeypatch.setenv("COLUMNS", "50")
    assert main(["--server", fake.address, "loras", "list"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 1 + len(LORAS)
    assert max(len(line) for line in lines) <= 50
    ids = [line.split()[0] for line in lines[1:]]
    assert ids == [lora.id[:8] for lora in LORAS]  # ids are never cut


def test_cli_events_tail_newest_first_with_an_aggregate_prefix(
    fake: FakeServer, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("COLUMNS", "50")
    argv = ["--server", fake.address, "events", "--tail", "2", "--aggregate", LORAS[0].id[:8]]
    assert main(argv) == 0
    rows = [line.split() for line in capsys.readouterr().out.splitlines()[1:]]
    assert [row[0] for row in rows] == ["4", "2"]  # LORAS[0]'s events, newest first
    assert rows[0][1] == "LoraCatalogRecordImported"  # never cut, however narrow
    assert fake.sent(query_service_pb2.ListEventsRequest)[-1].aggregate_id == LORAS[0].id


def test_cli_events_say_why_nothing_matched(
    fake: FakeServer, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["--server", fake.address, "events", "--type", "LoraRegisterd"]) == 0
    err = capsys.readouterr().err
    assert "no event in the log has the type 'LoraRegisterd'" in err
    assert "did you mean 'LoraRegistered'?" in err
    aggregate = LORAS[0].id[:8]
    assert (
        main(
            ["--server", fake.address, "events", "--aggregate", aggregate, "--type", "LoraUpdated"]
        )
        == 0
    )
    assert (
        f"no events match --aggregate {LORAS[0].id} --type LoraUpdated" in capsys.readouterr().err
    )


def test_cli_errors_print_once_in_the_cli_terms(
    fake: FakeServer, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["--server", fake.address, "generate", "x", "--size", "7x7", "--detach"]
    assert main(argv) == 1
    assert capsys.readouterr().err.splitlines() == [
        "error: --size 7x7: width must be a multiple of 8 from 64 to 2048, or 0"
    ]


def test_cli_generate_waits_for_a_loading_model(
    fake: FakeServer, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["--server", fake.address, "generate", "x", "--model", "loading", "--detach"]
    assert main(argv) == 0
    assert len(fake.sent(command_service_pb2.SubmitGenerationRequest)) == 3
    captured = capsys.readouterr()
    assert f"submitted {GENERATIONS[0].id}" in captured.out
    assert "waiting: model 'loading' is not ready" in captured.err


def test_cli_generate_no_wait_and_broken_models_fail_at_once(
    fake: FakeServer, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["--server", fake.address, "generate", "x", "--detach", "--model"]
    assert main([*argv, "loading", "--no-wait"]) == 1
    assert main([*argv, "broken"]) == 1
    assert len(fake.sent(command_service_pb2.SubmitGenerationRequest)) == 2
    assert "error: FAILED_PRECONDITION: model 'broken' is not ready" in capsys.readouterr().err


def test_cli_recommend_says_what_it_left_out(
    fake: FakeServer, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["--server", fake.address, "recommend", "ink", "--base-model", "SDXL"]) == 0
    captured = capsys.readouterr()
    assert "0.71" in captured.out
    assert "0.00" not in captured.out
    assert LORAS[2].id[:8] not in captured.out
    assert "1 more matched too weakly to show" in captured.err
    assert "--min-confidence 0 shows them" in captured.err
    assert "2 catalog-only LoRAs for SDXL" in captured.err
    assert "--include-unavailable" in captured.err


@pytest.mark.parametrize(
    ("flag", "sent"),
    [
        ([], types_pb2.LORA_KIND_UNSPECIFIED),
        (["--kind", "lora"], types_pb2.LORA_KIND_LORA),
        (["--kind", "embedding"], types_pb2.LORA_KIND_EMBEDDING),
    ],
)
def test_cli_lists_one_kind(
    fake: FakeServer, capsys: pytest.CaptureFixture[str], flag: list[str], sent: int
) -> None:
    assert main(["--server", fake.address, "loras", "list", *flag]) == 0
    assert fake.sent(query_service_pb2.ListLorasRequest)[-1].kind == sent
    capsys.readouterr()
