"""The real server process through the typed client: catalog, errors, idempotency, health,
consistency tokens, restart and graceful shutdown."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2

from client import (
    InvalidArgument,
    LoracleClient,
    NotFound,
)
from loracle.v1 import command_service_pb2, types_pb2
from server.devtools.local_server import RunningServer, start_server
from server.devtools.synthetic_loras import write_synthetic_lora
from server.domain.models import Architecture


def test_health_reports_both_services_serving(server: RunningServer) -> None:
    with grpc.insecure_channel(server.address) as channel:
        # The health stub's type stubs omit its methods; call the method path directly.
        check = channel.unary_unary(
            "/grpc.health.v1.Health/Check",
            request_serializer=health_pb2.HealthCheckRequest.SerializeToString,
            response_deserializer=health_pb2.HealthCheckResponse.FromString,
        )
        for name in ("", "loracle.v1.CommandService", "loracle.v1.QueryService"):
            reply = check(health_pb2.HealthCheckRequest(service=name), timeout=5)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING


def test_import_list_show_update_delete(server: RunningServer) -> None:
    with LoracleClient(server.address) as client:
        updates = list(client.import_loras())
        final = updates[-1]
        assert final.done
        assert final.progress.files_total == 6
        assert final.progress.registered + final.progress.unchanged == 6
        loras = list(client.iter_loras(consistency_token=final.consistency_token))
        names = {lora.name for lora in loras}
        assert {"Watercolor Style", "Cyberpunk City XL", "Aiko - Original Character"} <= names
        sdxl = client.list_loras(base_model="SDXL")
        assert {lora.base_model.architecture for lora in sdxl.loras} == {
            types_pb2.ARCHITECTURE_SDXL
        }
        one = next(lora for lora in loras if lora.name == "Watercolor Style")
        assert client.get_lora(one.id).file.sha256 == one.file.sha256
        changed = client.update_lora(one.id, tags=["watercolor", "paint"], preferred_weight=0.6)
        fresh = client.get_lora(one.id, consistency_token=changed.consistency_token)
        assert list(fresh.tags) == ["watercolor", "paint"]
        assert fresh.preferred_weight == pytest.approx(0.6)
        events = list(
            client.iter_events(aggregate_id=one.id, consistency_token=changed.consistency_token)
        )
        assert [e.type for e in events][-1] == "LoraEdited"
        assert events[-1].principal == "anonymous"
        gone = client.delete_lora(one.id)
        with pytest.raises(NotFound):
            client.get_lora(one.id, consistency_token=gone.consistency_token)
        # Re-importing brings the file's LoRA back under the same id.
        back = list(client.import_loras())[-1]
        assert client.get_lora(one.id, consistency_token=back.consistency_token).available


def test_retry_with_same_request_id_writes_nothing_twice(server: RunningServer) -> None:
    path = server.lora_root / "retry" / "once.safetensors"
    path.parent.mkdir(exist_ok=True)
    write_synthetic_lora(path, architecture=Architecture.SD1, name="Once", seed=42)
    rid = str(uuid.uuid4())
    with LoracleClient(server.address) as client:
        first = client.register_lora("retry/once.safetensors", request_id=rid)
        positions_after_first = len(
            list(
                client.iter_events(
                    aggregate_id=first.lora.id, consistency_token=first.consistency_token
                )
            )
        )
        second = client.register_lora("retry/once.safetensors", request_id=rid)
        assert second.created == first.created is True
        assert second.lora.id == first.lora.id
        events = list(
            client.iter_events(
                aggregate_id=first.lora.id, consistency_token=second.consistency_token
            )
        )
        assert len(events) == positions_after_first == 1


def test_errors_carry_status_codes_and_rich_details(server: RunningServer) -> None:
    with LoracleClient(server.address) as client:
        with pytest.raises(InvalidArgument) as bad_path:
            client.register_lora("../../etc/passwd")
        assert bad_path.value.field_violations[0][0] == "path"
        assert bad_path.value.reason == "INVALID_FIELD"
        assert bad_path.value.metadata["correlation_id"]
        with pytest.raises(InvalidArgument) as bad_page:
            client.list_loras(page_size=5000)
        assert bad_page.value.field_violations[0][0] == "page_size"
        with pytest.raises(InvalidArgument):
            client.get_lora("x", consistency_token="not-a-token")
        with pytest.raises(NotFound) as missing:
            client.get_lora(str(uuid.uuid4()))
        assert missing.value.reason == "LORA_NOT_FOUND"
        with pytest.raises(InvalidArgument) as bad_model:
            client.recommend_loras("a cat", "Potato XL 9000")
        assert bad_model.value.field_violations[0][0] == "base_model"
        with pytest.raises(NotFound) as missing:
            client.get_generation("00000000-0000-0000-0000-000000000000")
        assert missing.value.reason == "GENERATION_NOT_FOUND"


def test_embedded_placeholder_model_is_listed_and_becomes_ready(server: RunningServer) -> None:
    with LoracleClient(server.address) as client:
        deadline = time.monotonic() + 90
        while True:
            (model,) = client.list_base_models()
            if model.ready or time.monotonic() > deadline:
                break
            time.sleep(0.5)
    assert model.name == "tiny-sd15"
    assert model.is_placeholder
    assert model.architecture == types_pb2.ARCHITECTURE_SD1
    assert model.ready, model.error
    assert model.default_scheduler == "EulerDiscreteScheduler"


def test_bad_files_are_reported_without_stopping_the_import(server: RunningServer) -> None:
    bad = server.lora_root / "bad"
    bad.mkdir(exist_ok=True)
    (bad / "empty.safetensors").write_bytes(b"")
    (bad / "pickled.ckpt").write_bytes(b"\x80\x04K\x01.")
    write_synthetic_lora(bad / "good.safetensors", architecture=Architecture.SD2, name="Good")
    with LoracleClient(server.address) as client:
        updates = list(client.import_loras("bad"))
    outcomes = {u.file.path: u.file.outcome for u in updates if u.HasField("file")}
    assert outcomes == {
        "bad/empty.safetensors": command_service_pb2.IMPORT_OUTCOME_FAILED,
        "bad/good.safetensors": command_service_pb2.IMPORT_OUTCOME_REGISTERED,
        "bad/pickled.ckpt": command_service_pb2.IMPORT_OUTCOME_FAILED,
    }


def test_catalog_import_in_batches_is_idempotent(server: RunningServer) -> None:
    records = [
        {
            "source_id": f"e2e:{i}",
            "name": f"Catalog {i}",
            "base_model": "SD 1.5",
            "tags": ["style"],
            "trigger_words": [f"w{i}"],
            "downloads": i,
        }
        for i in range(2500)
    ]
    with LoracleClient(server.address) as client:
        result = client.import_lora_catalog(records, batch_size=1000, request_id="cat-1")
        assert (result.created, result.updated, len(result.errors)) == (2500, 0, 0)
        total = client.list_loras(tag="style", consistency_token=result.consistency_token)
        assert total.total_size >= 2500
        events_before = sum(
            1
            for _ in client.iter_events(
                type="LoraRegistered", consistency_token=result.consistency_token
            )
        )
        again = client.import_lora_catalog(records, batch_size=1000, request_id="cat-1")
        assert again.created == 2500  # the first answer, replayed
        assert (
            sum(
                1
                for _ in client.iter_events(
                    type="LoraRegistered", consistency_token=again.consistency_token
                )
            )
            == events_before
        )


def test_state_survives_restart_and_sigterm_is_graceful(tmp_path: Path) -> None:
    running = start_server(tmp_path)
    write_synthetic_lora(
        running.lora_root / "keep.safetensors", architecture=Architecture.SD1, name="Keep"
    )
    with LoracleClient(running.address) as client:
        registered = client.register_lora("keep.safetensors")
    assert running.stop(signal.SIGTERM) == 0
    assert "shutting down gracefully" in running.log()
    again = start_server(tmp_path)
    try:
        with LoracleClient(again.address) as client:
            assert client.get_lora(registered.lora.id).name == "Keep"
    finally:
        again.stop()


def test_unreachable_store_is_a_clean_startup_failure(tmp_path: Path) -> None:
    bad = subprocess.run(
        [
            sys.executable,
            "-m",
            "server",
            "--data-dir",
            str(tmp_path),
            "--storage-url",
            "postgresql://nobody@127.0.0.1:1/none",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert bad.returncode == 1
    assert "cannot start" in bad.stderr
    assert "Traceback" not in bad.stderr
