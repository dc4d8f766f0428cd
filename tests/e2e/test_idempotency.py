"""Idempotency against a real server with two principals: every unary CommandService RPC
(read from the service descriptor, so a new RPC cannot ship without a case here) retried with
its request_id answers the first answer byte for byte, whatever changed in between; the
streams retry as the README says; and a request_id is per principal."""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from google.protobuf import field_mask_pb2
from google.protobuf.message import Message
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from client import LoracleClient
from loracle.v1 import command_service_pb2 as cmd
from loracle.v1 import command_service_pb2_grpc, types_pb2
from server.application.security import token_sha256
from server.devtools.local_server import RunningServer, start_server, wait_for_models
from server.devtools.synthetic_loras import write_demo_loras, write_synthetic_lora
from server.domain.models import Architecture

TOKENS = {"alice": "idem-token-alice", "bob": "idem-token-bob"}
STREAMING = {"ImportLoras", "GenerateImage", "QuickGenerate", "UpscaleImage"}
PROMPT = "a watercolor painting of a fox, wtrcolor style"


def write_settings(folder: Path) -> Path:
    lines: list[str] = []
    for name, token in TOKENS.items():
        lines += ["[[tokens]]", f'name = "{name}"', f'sha256 = "{token_sha256(token)}"']
        lines += ['scopes = ["admin"]']
    path = folder / "settings.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    data = tmp_path_factory.mktemp("idempotency")
    write_demo_loras(data / "loras")
    running = start_server(data, "--config", str(write_settings(data)))
    try:
        with LoracleClient(running.address, token=TOKENS["alice"]) as client:
            list(client.import_loras())
            wait_for_models(client, timeout=120)
            recommendable(running)
        yield running
    finally:
        running.stop()


def recommendable(server: RunningServer, timeout: float = 30) -> None:
    """Until the recommender has indexed the imported demo LoRAs."""
    api = Api(server, "alice")
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            made = api.call(
                "RecommendLoras", cmd.RecommendLorasRequest(prompt=PROMPT, base_model="SD 1.5")
            )
            assert isinstance(made, cmd.RecommendLorasResponse)
            if made.recommendations:
                return
            time.sleep(0.2)
    finally:
        api.close()
    raise AssertionError("no recommendation for the test prompt")


class Api:
    """The CommandService as one principal sees it."""

    def __init__(self, server: RunningServer, principal: str) -> None:
        self.server = server
        self._channel = grpc.insecure_channel(server.address)
        self.stub = command_service_pb2_grpc.CommandServiceStub(self._channel)
        self.metadata = (("authorization", f"Bearer {TOKENS[principal]}"),)

    def call(self, method: str, request: Message) -> Message:
        response: Message = getattr(self.stub, method)(request, metadata=self.metadata, timeout=60)
        return response

    def stream(self, method: str, request: Message) -> list[Message]:
        return list(getattr(self.stub, method)(request, metadata=self.metadata, timeout=120))

    def close(self) -> None:
        self._channel.close()

    # -- state for the cases -------------------------------------------------------------

    def new_file(self) -> str:
        """A LoRA file of its own under the LoRA root, not registered yet."""
        name = f"idem/{uuid.uuid4().hex}.safetensors"
        path = self.server.lora_root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        write_synthetic_lora(
            path, architecture=Architecture.SD1, name="Idem", seed=uuid.uuid4().int % 1000
        )
        return name

    def new_lora(self) -> types_pb2.Lora:
        """A LoRA of its own, registered without a request_id of the test's."""
        name = self.new_file()
        response = self.call("RegisterLora", cmd.RegisterLoraRequest(request_id=rid(), path=name))
        assert isinstance(response, cmd.RegisterLoraResponse)
        return response.lora

    def update(self, lora_id: str, **fields: str) -> None:
        self.call(
            "UpdateLora",
            cmd.UpdateLoraRequest(
                request_id=rid(),
                lora=types_pb2.Lora(id=lora_id, **fields),  # type: ignore[arg-type]
                update_mask=field_mask_pb2.FieldMask(paths=list(fields)),
            ),
        )

    def delete(self, lora_id: str) -> None:
        self.call("DeleteLora", cmd.DeleteLoraRequest(request_id=rid(), id=lora_id))

    def touch(self, recommendations: list[types_pb2.Recommendation]) -> None:
        """Changes every recommended LoRA (its description, so rankings stay as they are)."""
        assert recommendations, "the case needs a recommendation to change"
        for rec in recommendations:
            self.update(rec.lora.id, description=f"changed {uuid.uuid4().hex}")

    def forget(self) -> None:
        """Writes something else (another generation): the log moves on."""
        self.submit()

    def submit(self) -> str:
        response = self.call(
            "SubmitGeneration", cmd.SubmitGenerationRequest(request_id=rid(), spec=spec())
        )
        assert isinstance(response, cmd.SubmitGenerationResponse)
        return response.generation_id


def rid() -> str:
    return str(uuid.uuid4())


def spec(steps: int = 2) -> types_pb2.GenerationSpec:
    return types_pb2.GenerationSpec(prompt="a lighthouse", width=64, height=64, steps=steps, seed=1)


@dataclass
class Case:
    """The request to retry, and how to change the state between the call and its retry."""

    request: Message
    change: Callable[[Message], None]


def register(api: Api) -> Case:
    path = api.new_file()

    def change(first: Message) -> None:
        assert isinstance(first, cmd.RegisterLoraResponse)
        assert first.created
        api.update(first.lora.id, name="renamed")
        api.delete(first.lora.id)

    return Case(cmd.RegisterLoraRequest(request_id=rid(), path=path), change)


def import_catalog(api: Api) -> Case:
    source = f"idem:{uuid.uuid4().hex}"
    record = cmd.CatalogRecord(source_id=source, name="First", base_model="SD 1.5")

    def change(first: Message) -> None:
        renamed = cmd.CatalogRecord(source_id=source, name="Second", base_model="SD 1.5")
        api.call(
            "ImportLoraCatalog",
            cmd.ImportLoraCatalogRequest(request_id=rid(), records=[renamed]),
        )

    return Case(
        cmd.ImportLoraCatalogRequest(request_id=rid(), records=[record, cmd.CatalogRecord()]),
        change,
    )


def update(api: Api) -> Case:
    lora = api.new_lora()

    def change(first: Message) -> None:
        api.update(lora.id, name="B")
        api.delete(lora.id)

    return Case(
        cmd.UpdateLoraRequest(
            request_id=rid(),
            lora=types_pb2.Lora(id=lora.id, name="A"),
            update_mask=field_mask_pb2.FieldMask(paths=["name"]),
        ),
        change,
    )


def delete(api: Api) -> Case:
    lora = api.new_lora()

    def change(first: Message) -> None:
        api.call("RegisterLora", cmd.RegisterLoraRequest(request_id=rid(), path=lora.file.path))
        api.update(lora.id, name="back")

    return Case(cmd.DeleteLoraRequest(request_id=rid(), id=lora.id), change)


def recommend(api: Api) -> Case:
    def change(first: Message) -> None:
        assert isinstance(first, cmd.RecommendLorasResponse)
        api.touch(list(first.recommendations))

    return Case(
        cmd.RecommendLorasRequest(request_id=rid(), prompt=PROMPT, base_model="SD 1.5"), change
    )


def recommend_top(api: Api) -> Case:
    def change(first: Message) -> None:
        assert isinstance(first, cmd.RecommendTopLoraResponse)
        api.touch([first.recommendation])

    return Case(
        cmd.RecommendTopLoraRequest(
            request_id=rid(), prompt=PROMPT, base_model="SD 1.5", min_confidence=0.0
        ),
        change,
    )


def filter_confident(api: Api) -> Case:
    made = api.call(
        "RecommendLoras",
        cmd.RecommendLorasRequest(request_id=rid(), prompt=PROMPT, base_model="SD 1.5"),
    )
    assert isinstance(made, cmd.RecommendLorasResponse)

    def change(first: Message) -> None:
        assert isinstance(first, cmd.FilterConfidentRecommendationsResponse)
        api.touch(list(first.recommendations))

    return Case(
        cmd.FilterConfidentRecommendationsRequest(
            request_id=rid(), recommendation_id=made.recommendation_id, min_confidence=0.0
        ),
        change,
    )


def submit(api: Api) -> Case:
    return Case(
        cmd.SubmitGenerationRequest(request_id=rid(), spec=spec()), lambda first: api.forget()
    )


def cancel(api: Api) -> Case:
    generation_id = api.submit()
    return Case(
        cmd.CancelGenerationRequest(request_id=rid(), generation_id=generation_id),
        lambda first: api.forget(),
    )


# Every unary command RPC, by method name: a new one fails the coverage test until it has one.
CASES: dict[str, Callable[[Api], Case]] = {
    "RegisterLora": register,
    "ImportLoraCatalog": import_catalog,
    "UpdateLora": update,
    "DeleteLora": delete,
    "RecommendLoras": recommend,
    "RecommendTopLora": recommend_top,
    "FilterConfidentRecommendations": filter_confident,
    "SubmitGeneration": submit,
    "CancelGeneration": cancel,
}


def methods(streaming: bool) -> set[str]:
    service = cmd.DESCRIPTOR.services_by_name["CommandService"]
    return {m.name for m in service.methods if m.server_streaming == streaming}


def wire(message: Message) -> bytes:
    return message.SerializeToString(deterministic=True)


@pytest.fixture
def alice(server: RunningServer) -> Iterator[Api]:
    api = Api(server, "alice")
    yield api
    api.close()


@pytest.fixture
def bob(server: RunningServer) -> Iterator[Api]:
    api = Api(server, "bob")
    yield api
    api.close()


def small_png() -> bytes:
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (48, 32), (200, 40, 40)).save(buffer, "PNG")
    return buffer.getvalue()


def test_every_command_rpc_has_a_retry_case() -> None:
    assert methods(streaming=False) == set(CASES)
    assert methods(streaming=True) == STREAMING


@pytest.mark.parametrize("method", sorted(CASES))
def test_a_retry_answers_the_first_answer_byte_for_byte(alice: Api, method: str) -> None:
    case = CASES[method](alice)
    first = alice.call(method, case.request)
    case.change(first)
    retry = alice.call(method, case.request)
    assert wire(retry) == wire(first), (method, first, retry)


def test_another_principals_request_id_is_a_new_request(alice: Api, bob: Api) -> None:
    def catalog(request_id: str) -> cmd.ImportLoraCatalogRequest:
        source = f"idem:{uuid.uuid4().hex}"
        record = cmd.CatalogRecord(source_id=source, name="X", base_model="SD 1.5")
        return cmd.ImportLoraCatalogRequest(request_id=request_id, records=[record])

    # A different request with alice's id: bob's own, never IDEMPOTENCY_KEY_REUSED.
    shared = rid()
    first = alice.call("ImportLoraCatalog", catalog(shared))
    lora = bob.new_lora()
    rename = cmd.UpdateLoraRequest(
        request_id=shared,
        lora=types_pb2.Lora(id=lora.id, name="bob's"),
        update_mask=field_mask_pb2.FieldMask(paths=["name"]),
    )
    updated = bob.call("UpdateLora", rename)
    assert isinstance(updated, cmd.UpdateLoraResponse)
    assert updated.lora.name == "bob's"
    # The same request with alice's id: bob's own answer, not a replay of alice's.
    same = catalog(rid())
    hers = alice.call("ImportLoraCatalog", same)
    assert isinstance(hers, cmd.ImportLoraCatalogResponse)
    assert (hers.created, hers.unchanged) == (1, 0)
    theirs = bob.call("ImportLoraCatalog", same)
    assert isinstance(theirs, cmd.ImportLoraCatalogResponse)
    assert (theirs.created, theirs.unchanged) == (0, 1)
    # Each principal's retry answers its own first answer.
    assert wire(alice.call("ImportLoraCatalog", same)) == wire(hers)
    assert wire(bob.call("ImportLoraCatalog", same)) == wire(theirs)
    assert wire(bob.call("UpdateLora", rename)) == wire(updated)
    # ...and a principal reusing its own id for another request is still refused.
    with pytest.raises(grpc.RpcError) as refused:
        alice.call("DeleteLora", cmd.DeleteLoraRequest(request_id=shared, id=lora.id))
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert reason(refused.value) == "IDEMPOTENCY_KEY_REUSED"
    assert isinstance(first, cmd.ImportLoraCatalogResponse)


def reason(error: grpc.RpcError) -> str:
    status = rpc_status.from_call(error)  # type: ignore[arg-type]
    assert status is not None
    for detail in status.details:
        info = error_details_pb2.ErrorInfo()
        if detail.Unpack(info):
            return str(info.reason)
    return ""


def test_a_retried_import_answers_its_final_message_only(alice: Api) -> None:
    folder = alice.server.lora_root / f"imp-{uuid.uuid4().hex[:8]}"
    folder.mkdir()
    write_synthetic_lora(
        folder / "a.safetensors", architecture=Architecture.SD1, name="ImpA", seed=11
    )
    request = cmd.ImportLorasRequest(request_id=rid(), directory=folder.name)
    first = alice.stream("ImportLoras", request)
    assert isinstance(first[-1], cmd.ImportLorasResponse)
    assert first[-1].done
    write_synthetic_lora(
        folder / "b.safetensors", architecture=Architecture.SD1, name="ImpB", seed=12
    )
    alice.stream("ImportLoras", cmd.ImportLorasRequest(request_id=rid(), directory=folder.name))
    retry = alice.stream("ImportLoras", request)
    assert [wire(m) for m in retry] == [wire(first[-1])]


@pytest.mark.parametrize("method", ["GenerateImage", "QuickGenerate", "UpscaleImage"])
def test_a_retried_generation_re_attaches_to_its_job(alice: Api, bob: Api, method: str) -> None:
    """Within the live streams' retention, a retry streams the first job's events again (it
    never generates (or upscales) twice); another principal's same request_id starts its
    own job."""
    request: Message
    if method == "GenerateImage":
        request = cmd.GenerateImageRequest(request_id=rid(), spec=spec())
    elif method == "UpscaleImage":
        image = types_pb2.InputImage(data=small_png())
        request = cmd.UpscaleImageRequest(request_id=rid(), image=image, upscaler="Lanczos")
    else:
        request = cmd.QuickGenerateRequest(request_id=rid(), prompt="a lighthouse", seed=3)
    first = alice.stream(method, request)
    retry = alice.stream(method, request)
    ids = {m.event.generation_id for m in first}  # type: ignore[attr-defined]
    assert len(ids) == 1
    assert {m.event.generation_id for m in retry} == ids  # type: ignore[attr-defined]
    assert retry[-1].event.HasField("completed")  # type: ignore[attr-defined]
    theirs = bob.stream(method, request)
    assert {m.event.generation_id for m in theirs}.isdisjoint(ids)  # type: ignore[attr-defined]
