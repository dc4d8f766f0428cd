"""Every generation belongs to its principal, against a real server with tokens: an owner x
other x admin matrix over every RPC that touches a generation. The matrix is a function of
three clients, so the cluster tests run it too (owner and other on different replicas)."""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from client import LoracleClient, NotFound, PermissionDenied
from loracle.v1 import types_pb2
from server.application.security import token_sha256
from server.devtools.local_server import RunningServer, start_server, wait_for_models


@dataclass(frozen=True)
class Principal:
    name: str
    token: str
    scopes: tuple[str, ...]


OWNER = Principal("alice", "tenancy-alice", ("read", "generate"))
OTHER = Principal("bob", "tenancy-bob", ("read", "generate"))
ADMIN = Principal("root", "tenancy-root", ("admin",))
PRINCIPALS = (OWNER, OTHER, ADMIN)


def token_lines(principals: tuple[Principal, ...] = PRINCIPALS) -> list[str]:
    """The [[tokens]] tables of a settings file (they go after every top-level key)."""
    lines: list[str] = []
    for p in principals:
        scopes = ", ".join(f'"{s}"' for s in p.scopes)
        lines += [
            "[[tokens]]",
            f'name = "{p.name}"',
            f'sha256 = "{token_sha256(p.token)}"',
            f"scopes = [{scopes}]",
        ]
    return lines


def spec(prompt: str, steps: int = 2) -> types_pb2.GenerationSpec:
    """The embedded placeholder at 64x64: cheap."""
    return types_pb2.GenerationSpec(prompt=prompt, width=64, height=64, steps=steps, seed=1)


def not_found_shape(call: Callable[[], Any], generation_id: str) -> tuple[str, str, dict[str, str]]:
    """What a client learns from the NOT_FOUND `call` raises, with the id it names blanked:
    equal shapes mean the caller cannot tell a hidden generation from a missing one. `call`
    consumes a stream itself."""
    with pytest.raises(NotFound) as err:
        call()
    e = err.value
    blank = {
        k: v.replace(generation_id, "ID") for k, v in e.metadata.items() if k != "correlation_id"
    }
    return e.message.replace(generation_id, "ID"), str(e.reason), blank


def assert_hidden(call: Callable[[str], Any], generation_id: str) -> None:
    """`call(generation_id)` fails exactly as `call` of an id that never existed."""
    unknown = str(uuid.uuid4())
    hidden = not_found_shape(lambda: call(generation_id), generation_id)
    missing = not_found_shape(lambda: call(unknown), unknown)
    assert hidden == missing
    assert "ID" in hidden[0]


def finish(client: LoracleClient, generation_id: str, timeout: float = 60.0) -> None:
    """Follows the generation until it ends."""
    deadline = time.monotonic() + timeout
    for event in client.watch_generation(generation_id):
        if event.WhichOneof("event") in ("completed", "failed", "cancelled"):
            return
        assert time.monotonic() < deadline


def wait_state(client: LoracleClient, generation_id: str, timeout: float = 30.0) -> str:
    """Until the generation's final state is projected (on a busy cluster the replica asked
    may not have projected the generation at all yet: NOT_FOUND until it has)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            state = types_pb2.GenerationState.Name(client.get_generation(generation_id).state)
        except NotFound:
            if time.monotonic() > deadline:
                raise
            state = ""
        if state.endswith(("SUCCEEDED", "FAILED", "CANCELLED")) or time.monotonic() > deadline:
            return state
        time.sleep(0.1)


def listed(client: LoracleClient, **kwargs: Any) -> dict[str, str]:
    """id -> owner of every generation ListGenerations shows `client`."""
    out: dict[str, str] = {}
    token = ""
    while True:
        page = client.list_generations(page_size=1000, page_token=token, **kwargs)
        out.update({g.id: g.owner for g in page.generations})
        token = page.next_page_token
        if not token:
            return out


def event_ids(client: LoracleClient, **kwargs: Any) -> set[str]:
    return {e.aggregate_id for e in client.iter_events(page_size=1000, **kwargs)}


def tenancy_matrix(owner: LoracleClient, other: LoracleClient, admin: LoracleClient) -> None:
    """Owner sees and acts on its own; the other principal gets NOT_FOUND, shaped as for an
    unknown id; the admin sees all. The three clients may talk to different replicas."""
    # SubmitGeneration, then WatchGeneration live and replayed.
    submitted = owner.submit_generation(spec("alice's secret lighthouse"))
    gid = submitted.generation_id
    assert_hidden(lambda i: list(other.watch_generation(i)), gid)  # live (or just finished)
    finish(owner, gid)
    assert wait_state(owner, gid).endswith("SUCCEEDED")
    replayed = list(owner.watch_generation(gid))
    assert replayed[-1].WhichOneof("event") == "completed"
    assert any(e.WhichOneof("event") == "image_complete" for e in replayed)
    assert_hidden(lambda i: list(other.watch_generation(i)), gid)  # replay of stored images
    assert list(admin.watch_generation(gid))[-1].WhichOneof("event") == "completed"

    # GenerateImage: the owner's stream; the other's own generation is its own.
    streamed = list(owner.generate_image(spec("alice streams")))
    gid2 = streamed[0].generation_id
    assert streamed[-1].WhichOneof("event") == "completed"
    bobs = list(other.generate_image(spec("bob's own")))
    bob_gid = bobs[0].generation_id
    assert bobs[-1].WhichOneof("event") == "completed"
    wait_state(owner, gid2)
    wait_state(other, bob_gid)

    # GetGeneration.
    got = owner.get_generation(gid)
    assert got.owner == OWNER.name
    assert got.spec.prompt == "alice's secret lighthouse"
    assert_hidden(lambda i: other.get_generation(i), gid)
    assert admin.get_generation(gid).owner == OWNER.name
    assert other.get_generation(bob_gid).owner == OTHER.name

    # ListGenerations: own by default; every owner's, or one owner's, with admin only.
    mine = listed(owner)
    assert {gid, gid2} <= set(mine)
    assert bob_gid not in mine
    assert set(mine.values()) == {OWNER.name}
    theirs = listed(other)
    assert bob_gid in theirs
    assert gid not in theirs
    assert gid2 not in theirs
    assert listed(owner, owner=OWNER.name) == mine
    for kwargs in ({"all_owners": True}, {"owner": OWNER.name}):
        with pytest.raises(PermissionDenied) as denied:
            other.list_generations(**kwargs)
        assert denied.value.metadata.get("required_scope") == "admin"
    everyone = listed(admin, all_owners=True)
    assert everyone[gid] == OWNER.name
    assert everyone[bob_gid] == OTHER.name
    alices = listed(admin, owner=OWNER.name)
    assert {gid, gid2} <= set(alices)
    assert bob_gid not in alices

    # ListEvents: the other sees none of the owner's generations' events (their prompts).
    assert gid in event_ids(owner, aggregate_id=gid)
    assert not event_ids(other, aggregate_id=gid)
    assert not {gid, gid2} & event_ids(other)
    assert bob_gid in event_ids(other)
    assert {gid, gid2, bob_gid} <= event_ids(admin)

    # CancelGeneration: a long job the other cannot cancel, and its owner can.
    long = owner.submit_generation(spec("alice waits", steps=150)).generation_id
    assert_hidden(lambda i: other.cancel_generation(i), long)
    assert_hidden(lambda i: list(other.watch_generation(i)), long)
    owner.cancel_generation(long)
    assert not wait_state(owner, long).endswith("FAILED")
    assert_hidden(lambda i: other.cancel_generation(i), long)
    admin.cancel_generation(gid)  # finished: nothing to do, but the admin may ask


def request_id_matrix(owner: LoracleClient, other: LoracleClient) -> None:
    """A request_id is the caller's own: another principal reusing it starts a generation of
    its own instead of replaying (or re-attaching to) the owner's."""
    rid = f"shared-{uuid.uuid4().hex[:8]}"
    first = owner.submit_generation(spec("alice's request"), request_id=rid)
    again = owner.submit_generation(spec("alice's request"), request_id=rid)
    assert again.generation_id == first.generation_id
    finish(owner, first.generation_id)
    reused = other.submit_generation(spec("bob's request"), request_id=rid)
    assert reused.generation_id != first.generation_id
    stream_rid = f"stream-{uuid.uuid4().hex[:8]}"
    events = list(owner.generate_image(spec("alice streams", steps=150), request_id=stream_rid))
    assert events
    theirs = list(other.generate_image(spec("bob streams"), request_id=stream_rid))
    assert theirs[0].generation_id != events[0].generation_id


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    data = tmp_path_factory.mktemp("tenancy")
    settings = data / "settings.toml"
    settings.write_text("\n".join(["image_retention_hours = 24", *token_lines()]) + "\n")
    running = start_server(data, "--config", str(settings))
    with LoracleClient(running.address, token=ADMIN.token) as admin:
        wait_for_models(admin, timeout=120)
    yield running
    running.stop()


@pytest.fixture
def clients(server: RunningServer) -> Iterator[tuple[LoracleClient, ...]]:
    opened = [LoracleClient(server.address, token=p.token, timeout=60) for p in PRINCIPALS]
    yield tuple(opened)
    for client in opened:
        client.close()


def test_owner_other_admin_matrix(clients: tuple[LoracleClient, ...]) -> None:
    tenancy_matrix(*clients)


def test_a_request_id_is_per_principal(clients: tuple[LoracleClient, ...]) -> None:
    request_id_matrix(clients[0], clients[1])


def test_a_server_without_tokens_shows_everyone_everything(tmp_path: Path) -> None:
    """The loopback default: everyone is `anonymous` with every scope, so all is theirs."""
    running = start_server(tmp_path)
    try:
        with LoracleClient(running.address, timeout=60) as client:
            wait_for_models(client, timeout=120)
            gid = client.submit_generation(spec("anyone")).generation_id
            finish(client, gid)
            assert client.get_generation(gid).owner == "anonymous"
            assert gid in listed(client)
            assert gid in listed(client, all_owners=True)
    finally:
        running.stop()
