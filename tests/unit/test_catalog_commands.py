"""The catalog use cases through the real buses, on in-memory storage and real LoRA files."""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from server.application.commands import (
    CatalogRecordInput,
    DeleteLoRACommand,
    ImportLoRACatalogCommand,
    ImportLoRAsCommand,
    ImportOutcome,
    ImportUpdate,
    RegisterLoRACommand,
    UpdateLoRACommand,
    import_loras,
)
from server.application.commands.idempotency import fingerprint
from server.application.context import DispatchContext
from server.application.queries import (
    GetAllLoRAsQuery,
    GetLoRAByIdQuery,
    GetLoRAsByBaseModelQuery,
    ListEventsQuery,
)
from server.bootstrap import Container
from server.devtools.synthetic_loras import write_synthetic_lora
from server.domain.errors import NotFoundError, ValidationError
from server.domain.lora import CommandRecord, legacy_command_record_id
from server.domain.models import Architecture


def ctx(request_id: str = "", principal: str = "tester") -> DispatchContext:
    return DispatchContext(principal=principal, request_id=request_id)


def root(c: Container) -> Path:
    return c.files.roots[0]


def lora_file(
    c: Container,
    rel: str,
    *,
    arch: Architecture = Architecture.SD1,
    name: str = "Test",
    seed: int = 0,
) -> Path:
    path = root(c) / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    return write_synthetic_lora(
        path, architecture=arch, name=name, trigger_words=["trg"], tags=["style"], seed=seed
    )


def run_import(c: Container, directory: str = "", request_id: str = "") -> list[ImportUpdate]:
    return list(c.commands.stream(ImportLoRAsCommand(directory=directory), ctx(request_id)))


def count_events(c: Container) -> int:
    return c.store.max_position()


def read(c: Container, position: int) -> None:
    c.projector.wait_for(position, 5)


def test_register_reads_metadata_and_is_queryable(memory_container: Container) -> None:
    c = memory_container
    lora_file(c, "a/watercolor.safetensors", name="Watercolor", arch=Architecture.SDXL)
    result = c.commands.dispatch(RegisterLoRACommand(path="a/watercolor.safetensors"), ctx("r1"))
    assert result.is_success, result.error
    data = result.unwrap()
    assert data.created
    assert data.lora.name == "Watercolor"
    assert data.lora.metadata.base_model.architecture is Architecture.SDXL
    assert data.lora.file is not None
    assert data.lora.file.path == "a/watercolor.safetensors"
    read(c, result.position)
    view = c.queries.dispatch(GetLoRAByIdQuery(lora_id=data.lora.id)).data
    assert view == data.lora


def test_registering_the_same_file_again_changes_nothing(memory_container: Container) -> None:
    c = memory_container
    lora_file(c, "x.safetensors")
    first = c.commands.dispatch(RegisterLoRACommand(path="x.safetensors"), ctx("r1")).unwrap()
    before = count_events(c)
    again = c.commands.dispatch(RegisterLoRACommand(path="x.safetensors"), ctx("r2")).unwrap()
    assert not again.created
    assert again.lora.id == first.lora.id
    # Only the second request's idempotency record and the position of its answer.
    assert count_events(c) == before + 2


def test_retry_with_same_request_id_returns_first_result_and_writes_nothing(
    memory_container: Container,
) -> None:
    c = memory_container
    lora_file(c, "x.safetensors")
    first = c.commands.dispatch(RegisterLoRACommand(path="x.safetensors"), ctx("same"))
    before = count_events(c)
    retry = c.commands.dispatch(RegisterLoRACommand(path="x.safetensors"), ctx("same"))
    assert retry.unwrap().created is True  # the first answer, not "already there"
    assert retry.unwrap().lora.id == first.unwrap().lora.id
    assert count_events(c) == before


def test_request_id_reused_for_another_request_is_refused(memory_container: Container) -> None:
    c = memory_container
    lora_file(c, "x.safetensors")
    lora_file(c, "y.safetensors", seed=1)
    c.commands.dispatch(RegisterLoRACommand(path="x.safetensors"), ctx("dup")).unwrap()
    result = c.commands.dispatch(RegisterLoRACommand(path="y.safetensors"), ctx("dup"))
    assert result.error is not None
    assert isinstance(result.error, ValidationError)
    assert result.error.field_violations[0].field == "request_id"


@pytest.mark.parametrize(
    ("path", "field"),
    [
        ("../outside.safetensors", "path"),
        ("/etc/passwd", "path"),
        ("missing.safetensors", "path"),
    ],
)
def test_bad_paths_are_refused_with_field_violations(
    memory_container: Container, path: str, field: str
) -> None:
    result = memory_container.commands.dispatch(RegisterLoRACommand(path=path), ctx())
    assert result.error is not None
    assert isinstance(result.error, ValidationError)
    assert result.error.field_violations[0].field == field
    assert count_events(memory_container) == 0


def test_bad_file_is_refused_and_nothing_is_written(memory_container: Container) -> None:
    c = memory_container
    (root(c) / "junk.safetensors").write_bytes(b"\x00" * 3)
    result = c.commands.dispatch(RegisterLoRACommand(path="junk.safetensors"), ctx("j"))
    assert result.error is not None
    assert isinstance(result.error, ValidationError)
    assert count_events(c) == 0


def test_import_registers_updates_skips_fails_and_marks_missing(
    memory_container: Container,
) -> None:
    c = memory_container
    lora_file(c, "styles/a.safetensors", name="A")
    lora_file(c, "styles/b.safetensors", name="B", seed=1)
    lora_file(c, "chars/c.safetensors", name="C", seed=2, arch=Architecture.SDXL)
    (root(c) / "styles" / "broken.safetensors").write_bytes(b"nope")
    (root(c) / "styles" / "model.ckpt").write_bytes(b"pickle")
    first = run_import(c, request_id="i1")
    outcomes = {u.file.path: u.file.outcome for u in first if u.file}
    assert outcomes == {
        "chars/c.safetensors": ImportOutcome.REGISTERED,
        "styles/a.safetensors": ImportOutcome.REGISTERED,
        "styles/b.safetensors": ImportOutcome.REGISTERED,
        "styles/broken.safetensors": ImportOutcome.FAILED,
        "styles/model.ckpt": ImportOutcome.FAILED,
    }
    assert first[-1].done
    assert first[-1].totals.registered == 3
    assert first[-1].totals.failed == 2
    assert [u.totals.files_done for u in first[:-1]] == [1, 2, 3, 4, 5]
    errors = {u.file.path: u.file.error for u in first if u.file and u.file.error}
    assert "pickle" in errors["styles/model.ckpt"]

    # Change one file (new content, new mtime), delete another, add nothing.
    changed = lora_file(c, "styles/a.safetensors", name="A2", seed=9)
    os.utime(changed, (1_800_000_000, 1_800_000_000))
    (root(c) / "styles" / "b.safetensors").unlink()
    second = run_import(c, request_id="i2")
    outcomes = {u.file.path: u.file.outcome for u in second if u.file}
    assert outcomes["styles/a.safetensors"] is ImportOutcome.UPDATED
    assert outcomes["chars/c.safetensors"] is ImportOutcome.UNCHANGED
    assert outcomes["styles/b.safetensors"] is ImportOutcome.MARKED_UNAVAILABLE
    read(c, second[-1].position)
    page = c.queries.dispatch(GetAllLoRAsQuery()).data
    by_name = {v.name: v for v in page}
    assert set(by_name) == {"A2", "B", "C"}
    assert not by_name["B"].available
    assert by_name["A2"].available
    available = c.queries.dispatch(GetAllLoRAsQuery(available_only=True)).data
    assert {v.name for v in available} == {"A2", "C"}


def test_import_reads_files_in_parallel_bounded_and_reports_in_scan_order(
    memory_container: Container, monkeypatch: pytest.MonkeyPatch
) -> None:
    c = memory_container
    for i in range(12):
        lora_file(c, f"many/{i:02d}.safetensors", name=f"L{i}", seed=i)
    read = c.files.read
    both_reading = threading.Barrier(2, timeout=10)
    lock = threading.Lock()
    in_flight = [0, 0]  # now, most at once

    def watched(path: str) -> Any:
        with lock:
            in_flight[0] += 1
            in_flight[1] = max(in_flight)
        try:
            if path.endswith(("00.safetensors", "01.safetensors")):
                both_reading.wait()  # raises (the file FAILS) unless two reads overlap
            return read(path)
        finally:
            with lock:
                in_flight[0] -= 1

    monkeypatch.setattr(c.files, "read", watched)
    updates = run_import(c)
    files = [u.file for u in updates if u.file]
    assert [f.path for f in files] == [f"many/{i:02d}.safetensors" for i in range(12)]
    assert {f.outcome for f in files} == {ImportOutcome.REGISTERED}
    assert 2 <= in_flight[1] <= import_loras.READERS


def test_import_of_a_subdirectory_leaves_the_rest_alone(memory_container: Container) -> None:
    c = memory_container
    lora_file(c, "one/a.safetensors", name="A")
    lora_file(c, "two/b.safetensors", name="B", seed=1)
    run_import(c)
    updates = run_import(c, "two")
    assert [u.file.path for u in updates if u.file] == ["two/b.safetensors"]
    assert updates[-1].totals.marked_unavailable == 0


def test_retried_import_returns_the_stored_summary(memory_container: Container) -> None:
    c = memory_container
    lora_file(c, "a.safetensors")
    first = run_import(c, request_id="imp")
    before = count_events(c)
    retry = run_import(c, request_id="imp")
    assert len(retry) == 1
    assert retry[0].done
    assert retry[0].totals == first[-1].totals
    assert count_events(c) == before


def records(n: int) -> tuple[CatalogRecordInput, ...]:
    return tuple(
        CatalogRecordInput(
            source_id=f"civitai:{i}", name=f"LoRA {i}", base_model="SD 1.5", tags=("style",)
        )
        for i in range(n)
    )


def test_catalog_import_creates_updates_and_reports_bad_records(
    memory_container: Container,
) -> None:
    c = memory_container
    first = c.commands.dispatch(ImportLoRACatalogCommand(records=records(5)), ctx("c1")).unwrap()
    assert (first.created, first.updated, first.unchanged) == (5, 0, 0)
    changed = (
        *records(5)[:3],
        CatalogRecordInput(source_id="civitai:3", name="Renamed", base_model="SDXL 1.0"),
        CatalogRecordInput(source_id="", name="no id"),
        CatalogRecordInput(source_id="civitai:9", name=" "),
    )
    second = c.commands.dispatch(ImportLoRACatalogCommand(records=changed), ctx("c2"))
    result = second.unwrap()
    assert (result.created, result.updated, result.unchanged) == (0, 1, 3)
    assert [(e.index, e.error.split(":")[0]) for e in result.errors] == [
        (4, "source_id"),
        (5, "name"),
    ]
    read(c, second.position)
    sdxl = c.queries.dispatch(GetLoRAsByBaseModelQuery(base_model="Pony")).data
    assert [v.name for v in sdxl] == ["Renamed"]
    assert not sdxl.items[0].available
    assert sdxl.items[0].source_id == "civitai:3"


def test_update_and_delete(memory_container: Container) -> None:
    c = memory_container
    lora_file(c, "x.safetensors", name="Old")
    lora = c.commands.dispatch(RegisterLoRACommand(path="x.safetensors"), ctx()).unwrap().lora
    updated = c.commands.dispatch(
        UpdateLoRACommand(
            lora_id=lora.id,
            changes={"name": "New", "tags": ["a", "a", " b "], "preferred_weight": 0.7},
        ),
        ctx("u1"),
    )
    view = updated.unwrap()
    assert (view.name, view.metadata.tags, view.metadata.preferred_weight) == (
        "New",
        ("a", "b"),
        0.7,
    )
    bad = c.commands.dispatch(
        UpdateLoRACommand(
            lora_id=lora.id, changes={"sha256": "x", "preferred_weight": float("nan")}
        ),
        ctx(),
    )
    assert bad.error is not None
    assert {v.field for v in bad.error.field_violations} == {"update_mask", "lora.preferred_weight"}
    deleted = c.commands.dispatch(DeleteLoRACommand(lora_id=lora.id), ctx("d1"))
    assert deleted.is_success
    read(c, deleted.position)
    with pytest.raises(NotFoundError):
        c.queries.dispatch(GetLoRAByIdQuery(lora_id=lora.id))
    again = c.commands.dispatch(DeleteLoRACommand(lora_id=lora.id), ctx("d2"))
    assert again.error is not None
    assert isinstance(again.error, NotFoundError)
    # Registering the file again brings the LoRA back under the same id.
    back = c.commands.dispatch(RegisterLoRACommand(path="x.safetensors"), ctx()).unwrap()
    assert back.lora.id == lora.id
    assert back.lora.available


def test_events_are_the_audit_trail(memory_container: Container) -> None:
    c = memory_container
    lora_file(c, "x.safetensors")
    reg = c.commands.dispatch(
        RegisterLoRACommand(path="x.safetensors"), ctx("r1", principal="alice")
    ).unwrap()
    upd = c.commands.dispatch(
        UpdateLoRACommand(lora_id=reg.lora.id, changes={"name": "N"}), ctx("r2", principal="bob")
    )
    read(c, upd.position)
    events = c.queries.dispatch(ListEventsQuery()).data
    assert [(e.type, e.principal, e.request_id) for e in events] == [
        ("LoraRegistered", "alice", "r1"),
        ("LoraEdited", "bob", "r2"),
    ]
    assert events.items[1].data == {"changes": {"name": "N"}}
    bobs = c.queries.dispatch(ListEventsQuery(principal="bob")).data
    assert [e.type for e in bobs] == ["LoraEdited"]
    first_page = c.queries.dispatch(ListEventsQuery(page_size=1)).data
    assert first_page.next_page_token
    second_page = c.queries.dispatch(
        ListEventsQuery(page_size=1, page_token=first_page.next_page_token)
    )
    assert [e.type for e in second_page.data] == ["LoraEdited"]


def test_listing_validates_paging_and_base_model(memory_container: Container) -> None:
    c = memory_container
    for query in (
        GetAllLoRAsQuery(page_size=-1),
        GetAllLoRAsQuery(page_size=1001),
        GetAllLoRAsQuery(page_token="garbage"),
        GetLoRAsByBaseModelQuery(base_model="Potato 9"),
    ):
        with pytest.raises(ValidationError):
            c.queries.dispatch(query)


def test_pages_cover_the_catalog_exactly_once(memory_container: Container) -> None:
    c = memory_container
    result = c.commands.dispatch(ImportLoRACatalogCommand(records=records(23)), ctx())
    read(c, result.position)

    def pages() -> Iterator[list[str]]:
        token = ""
        while True:
            page = c.queries.dispatch(GetAllLoRAsQuery(page_size=5, page_token=token)).data
            yield [v.id for v in page]
            assert page.total_size == 23
            token = page.next_page_token
            if not token:
                return

    ids = [i for page in pages() for i in page]
    assert len(ids) == len(set(ids)) == 23
    token = c.queries.dispatch(GetAllLoRAsQuery(page_size=5)).data.next_page_token
    with pytest.raises(ValidationError):  # a token is bound to its filter
        c.queries.dispatch(GetAllLoRAsQuery(page_size=5, page_token=token, tag="style"))


def test_a_retried_update_answers_the_first_update_whatever_happened_since(
    memory_container: Container,
) -> None:
    c = memory_container
    lora_file(c, "x.safetensors", name="Old")
    lora = c.commands.dispatch(RegisterLoRACommand(path="x.safetensors"), ctx()).unwrap().lora
    first = c.commands.dispatch(
        UpdateLoRACommand(lora_id=lora.id, changes={"name": "A"}), ctx("u1")
    )
    c.commands.dispatch(UpdateLoRACommand(lora_id=lora.id, changes={"name": "B"}), ctx("u2"))
    retry = c.commands.dispatch(
        UpdateLoRACommand(lora_id=lora.id, changes={"name": "A"}), ctx("u1")
    )
    assert retry.unwrap() == first.unwrap()
    assert retry.unwrap().name == "A"
    assert retry.position == first.position
    c.commands.dispatch(DeleteLoRACommand(lora_id=lora.id), ctx("d1")).unwrap()
    after_delete = c.commands.dispatch(
        UpdateLoRACommand(lora_id=lora.id, changes={"name": "A"}), ctx("u1")
    )
    assert after_delete.unwrap() == first.unwrap()
    assert after_delete.position == first.position


def test_request_ids_are_per_principal(memory_container: Container) -> None:
    c = memory_container
    lora_file(c, "x.safetensors")
    lora_file(c, "y.safetensors", seed=1)
    alice = c.commands.dispatch(RegisterLoRACommand(path="x.safetensors"), ctx("k", "alice"))
    assert alice.unwrap().created
    # Bob's "k" is his own request: neither alice's answer nor IDEMPOTENCY_KEY_REUSED.
    bob = c.commands.dispatch(RegisterLoRACommand(path="y.safetensors"), ctx("k", "bob"))
    assert bob.unwrap().lora.id != alice.unwrap().lora.id
    carol = c.commands.dispatch(RegisterLoRACommand(path="x.safetensors"), ctx("k", "carol"))
    assert carol.unwrap().created is False  # a new request: the file was already there
    again = c.commands.dispatch(RegisterLoRACommand(path="x.safetensors"), ctx("k", "alice"))
    assert again.unwrap() == alice.unwrap()
    assert again.position == alice.position


def test_a_record_keyed_by_request_id_alone_still_answers_its_own_principal(
    memory_container: Container,
) -> None:
    """Records stored before keys were per principal: uuid5 of the request_id alone, with the
    result of that version (the LoRA's id, no view, no position)."""
    c = memory_container
    lora_file(c, "x.safetensors")
    command = RegisterLoRACommand(path="x.safetensors")
    lora = c.commands.dispatch(command, ctx()).unwrap().lora
    c.store.save(
        CommandRecord._create(
            CommandRecord.Recorded,  # type: ignore[attr-defined]
            id=legacy_command_record_id("old"),
            request_id="old",
            command="RegisterLoRACommand",
            fingerprint=fingerprint(command),
            result={"lora_id": lora.id, "created": True},
            principal="alice",
        )
    )
    assert c.store.find_command("alice", "old") is not None
    assert c.store.find_command("bob", "old") is None
    before = count_events(c)
    replayed = c.commands.dispatch(command, ctx("old", "alice")).unwrap()
    assert replayed.created is True  # the stored answer, not "already there"
    assert replayed.lora.id == lora.id
    assert count_events(c) == before
    # Another principal's reuse of the id is a new request, even for a different command.
    other = c.commands.dispatch(ImportLoRACatalogCommand(records=records(1)), ctx("old", "bob"))
    assert other.unwrap().created == 1
