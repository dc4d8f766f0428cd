"""Every grpcurl command in docs/grpcurl.md, run against the live server."""

from __future__ import annotations

import base64
import hashlib
import re
from pathlib import Path
from typing import Any

import grpc
import pytest

from client import LoracleClient
from server.devtools.local_server import RunningServer, wait_for_models
from tests.e2e.reflection_client import run_grpcurl_line

DOC = Path(__file__).resolve().parents[2] / "docs" / "grpcurl.md"
LINES = [
    line.strip()
    for block in re.findall(r"```sh\n(.*?)```", DOC.read_text(), flags=re.S)
    for line in block.splitlines()
    if line.strip().startswith("grpcurl")
]


def by_verb(fragment: str) -> list[str]:
    return [line for line in LINES if fragment in line]


def run(server: RunningServer, line: str) -> Any:
    return run_grpcurl_line(line, server.address)


def test_doc_lists_the_commands_we_check() -> None:
    assert len(LINES) == 14


def test_list_and_describe(server: RunningServer) -> None:
    services = run(server, by_verb(" list")[0])
    assert {
        "loracle.v1.CommandService",
        "loracle.v1.QueryService",
        "grpc.health.v1.Health",
        "grpc.reflection.v1alpha.ServerReflection",
    } <= set(services)
    described = run(server, by_verb("describe loracle.v1.QueryService")[0])
    assert described["methods"] == [
        "GetLora",
        "ListLoras",
        "SearchLoras",
        "ListBaseModels",
        "GetGeneration",
        "ListGenerations",
        "WatchGeneration",
        "ListEvents",
    ]
    lora = run(server, by_verb("describe loracle.v1.Lora")[0])
    assert {"id", "name", "base_model", "trigger_words", "file", "available"} <= set(lora["fields"])


def test_writes_then_reads(server: RunningServer) -> None:
    imported = run(server, by_verb("CommandService/ImportLoras")[0])
    assert imported[-1]["done"] is True
    assert imported[-1]["progress"]["files_total"] == 6
    registered = run(server, by_verb("CommandService/RegisterLora")[0])
    assert registered[0]["lora"]["name"] == "Watercolor Style"
    again = run(server, by_verb("CommandService/RegisterLora")[0])
    assert again == registered  # same request_id: the first answer
    catalog = run(server, by_verb("ImportLoraCatalog")[0])
    assert catalog[0].get("created", 0) + catalog[0].get("unchanged", 0) == 1

    first_page, filtered = (run(server, line) for line in by_verb("QueryService/ListLoras"))
    assert len(first_page[0]["loras"]) == 2
    assert first_page[0]["next_page_token"]
    assert [lora["name"] for lora in filtered[0]["loras"]] == ["Aiko - Original Character"]
    events = run(server, by_verb("ListEvents")[0])
    assert events[0]["events"]
    assert {e["type"] for e in events[0]["events"]} == {"LoraRegistered"}
    health = run(server, by_verb("Health/Check")[0])
    assert health == [{"status": "SERVING"}]


def test_generation(server: RunningServer) -> None:
    with LoracleClient(server.address) as client:
        wait_for_models(client, timeout=120)
    submitted = run(server, by_verb("SubmitGeneration")[0])[0]
    generation_id = submitted["generation_id"]
    lines = run(server, by_verb("WatchGeneration")[0].replace("GENERATION_ID", generation_id))
    events = [line["event"] for line in lines]
    assert "completed" in events[-1]
    data = b"".join(
        base64.b64decode(e["image_chunk"]["data"]) for e in events if "image_chunk" in e
    )
    done = next(e["image_complete"] for e in events if "image_complete" in e)
    assert hashlib.sha256(data).hexdigest() == done["sha256"]
    line = by_verb("GetGeneration")[0].replace("GENERATION_ID", generation_id)
    record = run(server, line.replace("TOKEN", submitted["consistency_token"]))[0]
    assert record["generation"]["id"] == generation_id
    assert record["generation"]["spec"]["prompt"] == "a lighthouse at dusk"


def test_documented_error(server: RunningServer) -> None:
    line = next(line for line in LINES if "etc/passwd" in line)
    with pytest.raises(grpc.RpcError) as err:
        run(server, line)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "'..' components" in (err.value.details() or "")
