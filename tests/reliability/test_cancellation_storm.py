"""A cancellation storm on the embedded model: concurrent GenerateImage clients (64x64, 20 to 40
steps, distinct seeds), each on its own connection, each cancelling at a random point: at a
random early step, right after `queued`, through CancelGeneration from another connection, or
by a short deadline. Afterwards nothing is left behind: every job is CANCELLED (SUCCEEDED only
where its client saw it complete) and none is QUEUED or RUNNING, the executor is idle (a new job
is at queue position 0), a fixed-seed image has the same pixels as before the storm, the model is
still ready, no stream slot leaked (the per-principal stream cap equals the number of clients,
so one leaked slot refuses a client of the next storm), the log has no stack trace from server
code, and the server's memory does not grow from one storm to the next.

Cancel points are drawn from the first steps (1 to 8) so that a storm costs seconds, not the
minutes that 12 full 40-step jobs take on two cores. LORACLE_STORM_CLIENTS sets the clients per
storm (12), LORACLE_STORM_ROUNDS the storms (2), LORACLE_STORM_SEED the random seed.
"""

from __future__ import annotations

import io
import os
import random
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field

import grpc
import pytest
from PIL import Image

from client import LoracleClient
from loracle.v1 import command_service_pb2 as cmd_pb
from loracle.v1 import command_service_pb2_grpc as cmd_grpc
from loracle.v1 import types_pb2
from server.devtools.local_server import RunningServer, start_server
from tests.reliability.support import rss_kib, wait_until_ready

CLIENTS = int(os.environ.get("LORACLE_STORM_CLIENTS", "12"))
ROUNDS = max(2, int(os.environ.get("LORACLE_STORM_ROUNDS", "2")))
SEED = int(os.environ.get("LORACLE_STORM_SEED", str(random.randrange(2**32))))
MODES = ("step", "queued", "cancel_rpc", "deadline")
# Resident memory may grow this much from the end of the first storm to the end of the last
# (allocator noise and caches; a leaked pipeline or adapter set is far larger on real models,
# but the embedded one is tiny, so this mainly catches per-job leaks).
RSS_GROWTH_LIMIT_KIB = 150 * 1024
REFERENCE = types_pb2.GenerationSpec(
    prompt="a lighthouse, reference", width=64, height=64, steps=6, seed=1234
)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    data = tmp_path_factory.mktemp("storm")
    config = data / "loracle.toml"
    config.write_text(f"max_streams_per_principal = {CLIENTS}\nmax_queue = {CLIENTS + 4}\n")
    running = start_server(data, "--config", str(config))
    try:
        wait_until_ready(running.address)
        yield running
    finally:
        running.stop()


@dataclass
class Client:
    """One storm client's plan and what it saw."""

    index: int
    mode: str
    steps: int
    seed: int
    cancel_step: int  # 0: cancel right after `queued`
    deadline: float
    generation_id: str = ""
    events: list[str] = field(default_factory=list)
    code: grpc.StatusCode | None = None

    @property
    def completed(self) -> bool:
        return "completed" in self.events


def plan(rng: random.Random, round_: int) -> list[Client]:
    seeds = rng.sample(range(1, 2**31), CLIENTS)
    return [
        Client(
            index=i,
            mode=MODES[(i + round_) % len(MODES)],
            steps=rng.randint(20, 40),
            seed=seeds[i],
            cancel_step=rng.choice([0, *range(1, 9)]),
            deadline=rng.uniform(0.3, 1.5),
        )
        for i in range(CLIENTS)
    ]


def run_client(address: str, client: Client, start: threading.Barrier) -> None:
    spec = types_pb2.GenerationSpec(
        prompt=f"storm client {client.index}",
        width=64,
        height=64,
        steps=client.steps,
        seed=client.seed,
    )
    request = cmd_pb.GenerateImageRequest(request_id=str(uuid.uuid4()), spec=spec)
    with grpc.insecure_channel(address) as channel, grpc.insecure_channel(address) as other:
        stub = cmd_grpc.CommandServiceStub(channel)
        start.wait()
        timeout = client.deadline if client.mode == "deadline" else 120.0
        call = stub.GenerateImage(request, timeout=timeout)
        cancelled = False
        try:
            for response in call:
                event = response.event
                kind = event.WhichOneof("event") or ""
                client.generation_id = event.generation_id
                client.events.append(kind)
                due = (client.cancel_step == 0 and kind == "queued") or (
                    kind == "progress" and event.progress.step >= client.cancel_step
                )
                if not due or cancelled:
                    continue
                if client.mode in ("step", "queued"):
                    call.cancel()
                    break
                if client.mode == "cancel_rpc":
                    # From another connection; this stream must then end with `cancelled`.
                    cmd_grpc.CommandServiceStub(other).CancelGeneration(
                        cmd_pb.CancelGenerationRequest(generation_id=event.generation_id),
                        timeout=30,
                    )
                    cancelled = True
            client.code = call.code()
        except grpc.RpcError as err:
            client.code = getattr(err, "code", lambda: grpc.StatusCode.UNKNOWN)()


def storm(address: str, clients: list[Client]) -> None:
    start = threading.Barrier(len(clients))
    threads = [
        threading.Thread(target=run_client, args=(address, c, start), daemon=True) for c in clients
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(90)
    assert not any(t.is_alive() for t in threads), "a storm client hung"


def check_clients(clients: list[Client]) -> None:
    for c in clients:
        where = f"client {c.index} ({c.mode}, cancel at {c.cancel_step}): {c.events} {c.code}"
        if c.mode == "deadline":
            assert c.code in (grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.OK), where
        elif c.mode == "cancel_rpc":
            assert c.code == grpc.StatusCode.OK, where
            assert c.events[-1] in ("cancelled", "completed"), where
        else:
            assert c.code == grpc.StatusCode.CANCELLED, where
        if c.mode != "deadline":
            assert c.generation_id, where


def wait_for_final_states(client: LoracleClient, clients: list[Client]) -> None:
    CANCELLED = types_pb2.GENERATION_STATE_CANCELLED
    SUCCEEDED = types_pb2.GENERATION_STATE_SUCCEEDED
    deadline = time.monotonic() + 20
    while True:
        live = [
            *client.list_generations(state=types_pb2.GENERATION_STATE_QUEUED).generations,
            *client.list_generations(state=types_pb2.GENERATION_STATE_RUNNING).generations,
        ]
        if not live:
            break
        assert time.monotonic() < deadline, f"still live after the storm: {live[0]}"
        time.sleep(0.2)
    for c in clients:
        if not c.generation_id:
            continue  # a deadline that ran out before the first event; covered above
        generation = client.get_generation(c.generation_id)
        state = types_pb2.GenerationState.Name(generation.state)
        assert generation.state == CANCELLED or (generation.state == SUCCEEDED and c.completed), (
            f"client {c.index} ({c.mode}): {state}, saw {c.events}"
        )


def wait_until_idle(client: LoracleClient) -> None:
    """A fresh 1-step job finds nothing ahead of it within a few seconds."""
    deadline = time.monotonic() + 10
    while True:
        events = list(client.generate_image(types_pb2.GenerationSpec(prompt="idle?", steps=1)))
        assert events[-1].HasField("completed")
        if events[0].queued.position == 0:
            return
        assert time.monotonic() < deadline, "the executor stayed busy after the storm"
        time.sleep(0.2)


def pixels(client: LoracleClient, spec: types_pb2.GenerationSpec) -> bytes:
    events = list(client.generate_image(spec))
    assert events[-1].HasField("completed"), events[-1]
    data = b"".join(e.image_chunk.data for e in events if e.HasField("image_chunk"))
    return Image.open(io.BytesIO(data)).convert("RGB").tobytes()


@pytest.mark.timeout(max(120, CLIENTS * ROUNDS * 5))
def test_cancellation_storms_leave_nothing_behind(server: RunningServer) -> None:
    rng = random.Random(SEED)
    print(f"\nstorm seed {SEED} (LORACLE_STORM_SEED), {CLIENTS} clients x {ROUNDS} storms")
    rss: list[int] = []
    with LoracleClient(server.address, timeout=30, stream_timeout=60) as client:
        before = pixels(client, REFERENCE)
        for round_ in range(ROUNDS):
            clients = plan(rng, round_)
            started = time.monotonic()
            storm(server.address, clients)
            print(f"storm {round_}: {time.monotonic() - started:.1f} s")
            assert server.process.poll() is None, "the server died in the storm"
            check_clients(clients)
            wait_for_final_states(client, clients)
            wait_until_idle(client)
            assert all(m.ready for m in client.list_base_models())
            assert pixels(client, REFERENCE) == before, "the storm changed a seeded image"
            rss.append(rss_kib(server.process.pid))
    print(f"server RSS after each storm (MiB): {[round(r / 1024) for r in rss]}")
    assert rss[-1] - rss[0] < RSS_GROWTH_LIMIT_KIB, f"RSS grew from {rss[0]} to {rss[-1]} KiB"
    problems = [
        block
        for block in server.log().split("Traceback (most recent call last):")[1:]
        if "/server/" in block
    ]
    assert not problems, "stack traces from server code in the log:\n" + problems[0][:3000]
    for needle in ("generation batch failed", "could not record", "listener failed"):
        assert needle not in server.log(), needle
