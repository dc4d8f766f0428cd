"""The edge's table of input bounds covers every request field, applies them by path, and is
the README's table."""

from __future__ import annotations

import uuid
from pathlib import Path

from loracle.v1 import command_service_pb2 as cmd_pb
from loracle.v1 import query_service_pb2 as qry_pb
from server.domain.errors import Reason, RequestTooLargeError, UndecodableRequestError
from server.domain.tokens import MAX_TOKEN_CHARS, TokenSigner, new_key
from server.rpc.field_limits import (
    FIELD_LIMITS,
    MIB,
    bounded_fields,
    limit_table,
    limit_violations,
    limits,
    request_types,
)
from server.rpc.validation import RejectionLog, check_request, method_limits


def test_every_string_bytes_and_repeated_request_field_has_a_limit() -> None:
    """A new request field (or RPC) fails here until it gets an entry in FIELD_LIMITS."""
    needed = {name for message in request_types().values() for name in bounded_fields(message)}
    missing = sorted(needed - set(FIELD_LIMITS))
    assert not missing, f"add these to server/rpc/field_limits.py FIELD_LIMITS: {missing}"
    assert not sorted(set(FIELD_LIMITS) - needed), "entries for fields no request has"
    for name, limit in FIELD_LIMITS.items():
        assert limit.size is not None or limit.items is not None, name
        assert limit.why, name


def test_repeated_strings_bound_both_their_items_and_each_item() -> None:
    for message in request_types().values():
        for field in message.fields:
            if field.is_repeated and field.message_type is None:
                limit = FIELD_LIMITS[field.full_name]
                assert limit.items is not None, field.full_name
                assert limit.size is not None, field.full_name


def test_violations_are_named_by_path() -> None:
    request = cmd_pb.ImportLoraCatalogRequest(
        records=[cmd_pb.CatalogRecord(source_id=f"s{i}", name="n") for i in range(5)]
    )
    request.records[3].name = "x" * 513
    request.records[1].tags.extend(["ok", "t" * 257])
    assert [(v.field, v.description) for v in limit_violations(request, limits())] == [
        ("records[1].tags[1]", "at most 256 characters"),
        ("records[3].name", "at most 512 characters"),
    ]
    too_many = cmd_pb.ImportLoraCatalogRequest(records=[cmd_pb.CatalogRecord()] * 10_001)
    assert [v.field for v in limit_violations(too_many, limits())] == ["records"]


def test_known_offenders_are_bounded() -> None:
    search = qry_pb.SearchLorasRequest(query="q" * 10_001)
    error = check_request(search)
    assert error is not None
    assert error.reason == Reason.INVALID_FIELD
    assert error.field_violations[0].field == "query"
    listing = qry_pb.ListLorasRequest(base_model="b" * 513)
    error = check_request(listing)
    assert error is not None
    assert error.field_violations[0].field == "base_model"
    assert check_request(qry_pb.SearchLorasRequest(query="q" * 10_000)) is None


def test_prompt_limits_never_fall_below_the_handler_settings() -> None:
    table = limits(max_prompt_chars=50_000, max_loras_per_request=100)
    spec = cmd_pb.GenerateImageRequest()
    spec.spec.prompt = "p" * 50_000
    assert limit_violations(spec, table) == []
    assert limit_violations(spec, limits()) != []
    assert table["loracle.v1.GenerationSpec.loras"].items == 100
    assert limits(max_prompt_chars=100)["loracle.v1.GenerationSpec.prompt"].size == 10_000


def test_only_a_catalog_import_and_requests_with_images_take_large_requests() -> None:
    sizes = method_limits(16 * MIB)
    for method in ("ImportLoraCatalog", "GenerateImage", "SubmitGeneration", "UpscaleImage"):
        assert sizes.pop(f"/loracle.v1.CommandService/{method}") == 16 * MIB
    assert set(sizes.values()) == {MIB}
    assert set(method_limits(MIB // 2).values()) == {MIB // 2}


def test_frame_errors_are_plain_sentences() -> None:
    assert UndecodableRequestError("SearchLorasRequest").message == (
        "the request is not a valid SearchLorasRequest"
    )
    assert RequestTooLargeError("SearchLoras", 2_000_000, MIB).message == (
        "the request is 2,000,000 bytes; SearchLoras takes at most 1,048,576"
    )


def test_frame_rejections_are_logged_once_per_principal_per_period(caplog: object) -> None:
    now = [0.0]
    lines: list[str] = []
    rejections = RejectionLog(period=60, clock=lambda: now[0])
    import logging

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            lines.append(record.getMessage())

    handler = Keep()
    logging.getLogger("loracle.rpc").addHandler(handler)
    try:
        error = UndecodableRequestError("GetLoraRequest")
        for _ in range(100):
            rejections.note(error, "alice", "/m")
        rejections.note(error, "bob", "/m")
        rejections.note(check_request(qry_pb.GetLoraRequest(id="x")), "carol", "/m")  # not a frame
        now[0] = 61
        rejections.note(error, "alice", "/m")
    finally:
        logging.getLogger("loracle.rpc").removeHandler(handler)
    assert len(lines) == 3
    assert "principal=alice" in lines[0]
    assert "principal=bob" in lines[1]
    assert "(and 99 more since the last report)" in lines[2]


def test_the_readme_table_of_field_limits_is_the_table() -> None:
    """Regenerate with `python -m server.rpc.field_limits` when a limit changes."""
    text = (Path(__file__).parents[2] / "README.md").read_text()
    block = text.split("<!-- field limits table: python -m server.rpc.field_limits -->\n")[1]
    block = block.split("\n<!-- end of field limits table -->")[0]
    assert block == limit_table()


def test_an_over_long_token_is_answered_as_a_forged_token() -> None:
    """A token over its field's limit gets the token's reason and sentence, not a generic
    field limit: to a client, every token the server did not issue is the same case."""
    page = check_request(qry_pb.ListLorasRequest(page_token="A" * 100_000))
    assert page is not None
    assert page.reason is Reason.INVALID_PAGE_TOKEN
    consistency = check_request(
        qry_pb.GetLoraRequest(id=str(uuid.uuid4()), consistency_token="A" * 5000)
    )
    assert consistency is not None
    assert consistency.reason is Reason.INVALID_CONSISTENCY_TOKEN


def test_the_longest_page_token_the_server_issues_passes_the_edge() -> None:
    """The keyset token after a LoRA whose 512-character name is all 4-byte UTF-8 (the
    longest name the edge admits) must not be refused by the edge's own token limit."""
    name = "\U0001f98a" * FIELD_LIMITS["loracle.v1.Lora.name"].size  # type: ignore[operator]
    token = TokenSigner(new_key()).page_token("None||False", n=name.casefold(), i=str(uuid.uuid4()))
    assert len(token) <= MAX_TOKEN_CHARS
    assert check_request(qry_pb.ListLorasRequest(page_token=token)) is None
