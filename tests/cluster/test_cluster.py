"""The cluster as a user runs it: two API replicas on one PostgreSQL, two workers fed by NATS
JetStream, and the failures the issue names: a worker killed mid-job, a replica killed
mid-stream, the broker restarting, PostgreSQL unreachable."""

from __future__ import annotations

import hashlib
import json
import re
import signal
import time
import urllib.request
import uuid
from pathlib import Path

import pytest

from client import LoracleClient, Unavailable
from loracle.v1 import types_pb2
from server.devtools.cluster import Cluster, NatsServer, postgres_schema, start_cluster
from server.devtools.synthetic_loras import write_synthetic_lora
from server.devtools.tiny_loras import write_lora_for_pipeline
from server.domain.models import Architecture, BaseModelConfig
from server.infrastructure.broker.nats_broker import NatsBroker
from server.infrastructure.broker.port import BrokerUnavailable, Claim
from server.infrastructure.diffusion.registry import EMBEDDED_NAME, load_pipeline
from tests.cluster.conftest import LEASE_SECONDS, MAX_ATTEMPTS, final_generation, wait_until
from tests.cluster.proxy import CuttableProxy
from tests.e2e.test_tenancy import ADMIN, OTHER, OWNER, tenancy_matrix
from tests.support import POSTGRES_URL

Events = list[types_pb2.GenerationEvent]


def images(events: Events) -> dict[int, bytes]:
    """Reassembles images, checking offsets are contiguous and each checksum matches."""
    parts: dict[int, bytearray] = {}
    for e in events:
        if e.HasField("image_chunk"):
            got = parts.setdefault(e.image_chunk.image_index, bytearray())
            assert e.image_chunk.offset == len(got)
            got.extend(e.image_chunk.data)
    done = [e.image_complete for e in events if e.HasField("image_complete")]
    assert sorted(i.index for i in done) == sorted(parts)
    for info in done:
        assert hashlib.sha256(parts[info.index]).hexdigest() == info.sha256
    return {i: bytes(b) for i, b in parts.items()}


def kinds(events: Events) -> list[str]:
    return [str(e.WhichOneof("event")) for e in events]


def slow(prompt: str, seed: int, num_images: int = 1) -> types_pb2.GenerationSpec:
    """A job that runs for seconds on the tiny model (~0.1 s a step at 64x64 on one core),
    long enough to kill things mid-way."""
    return types_pb2.GenerationSpec(prompt=prompt, seed=seed, steps=50, num_images=num_images)


def test_jobs_spread_over_both_workers_and_any_replica_relays_them(
    cluster: Cluster, broker: NatsBroker
) -> None:
    submitted: list[str] = []
    with cluster.client(0) as a, cluster.client(1) as b:
        for i in range(6):
            # Different step counts: no two of them can share a batch.
            spec = types_pb2.GenerationSpec(prompt=f"a kite {i}", seed=i, steps=4 + i)
            submitted.append((a if i % 2 else b).submit_generation(spec).generation_id)
        for i, generation_id in enumerate(submitted):
            watcher = b if i % 2 else a  # the other replica
            events = list(watcher.watch_generation(generation_id))
            assert kinds(events)[0] == "queued"
            assert kinds(events)[-1] == "completed"
            [image] = images(events).values()
            record = final_generation(a, generation_id)
            assert record.state == types_pb2.GENERATION_STATE_SUCCEEDED
            assert [x.sha256 for x in record.images] == [hashlib.sha256(image).hexdigest()]
            # Resuming from any point on either replica gives exactly the rest.
            assert list(a.watch_generation(generation_id, after_sequence=3)) == events[3:]
    ran_on = {broker.claim(g).worker for g in submitted}  # type: ignore[union-attr]
    assert ran_on == {w.name for w in cluster.workers}
    # Each worker's own metrics show the images it made.
    for worker in cluster.workers:
        with urllib.request.urlopen(f"http://{worker.metrics_address}/metrics") as page:
            text = page.read().decode()
        [made] = re.findall(r"^loracle_generation_images_total (\S+)$", text, re.MULTILINE)
        assert float(made) >= 1


def test_compatible_jobs_batch_across_the_cluster(cluster: Cluster, broker: NatsBroker) -> None:
    spec = types_pb2.GenerationSpec(prompt="a lamp", seed=1, steps=3)
    with cluster.client(0) as a, cluster.client(1) as b:
        # Hold both workers with slow jobs (two step counts: they cannot share a batch),
        # then queue four compatible ones behind them.
        busy = []
        for i in range(2):
            spec_i = slow(f"busy {i}", i)
            spec_i.steps += i
            busy.append(a.submit_generation(spec_i).generation_id)

        def both_busy() -> bool:
            claims = [broker.claim(g) for g in busy]
            return all(c is not None and c.state == "running" for c in claims)

        wait_until(both_busy, 60, "both workers to be busy")
        queued = [(a if i % 2 else b).submit_generation(spec).generation_id for i in range(4)]
        sizes = []
        for generation_id in queued:
            events = list(b.watch_generation(generation_id))
            sizes += [e.started.batch_size for e in events if e.HasField("started")]
        for generation_id in busy:
            list(a.watch_generation(generation_id))
    assert max(sizes) >= 2, sizes


def test_consistency_token_from_one_replica_holds_on_the_other(cluster: Cluster) -> None:
    folder = cluster.base / cluster.workers[0].name / "models" / EMBEDDED_NAME
    pipe = load_pipeline(BaseModelConfig(EMBEDDED_NAME, Architecture.SD1, folder))
    path = cluster.base / "loras" / "cluster_ink.safetensors"
    write_lora_for_pipeline(
        pipe, path, seed=4, metadata={"ss_base_model_version": "sd_v1", "ss_output_name": "ink"}
    )
    with cluster.client(0) as a, cluster.client(1) as b:
        registered = a.register_lora(path.name)
        lora = b.get_lora(registered.lora.id, consistency_token=registered.consistency_token)
        assert lora.id == registered.lora.id
        # The worker finds the LoRA under its own root by the catalog's relative path.
        plain = types_pb2.GenerationSpec(prompt="a boat", seed=9, steps=2)
        styled = types_pb2.GenerationSpec(prompt="a boat <lora:cluster_ink:0.9>", seed=9, steps=2)
        with_lora = list(b.generate_image(styled))
        without = list(b.generate_image(plain))
        assert kinds(with_lora)[-1] == "completed", with_lora[-1]
        assert images(with_lora) != images(without)


def test_cancel_and_retry_reach_the_job_from_any_replica(cluster: Cluster) -> None:
    with cluster.client(0) as a, cluster.client(1) as b:
        # A running job cancelled through the other replica stops within a step.
        running = a.submit_generation(slow("a tide", 5)).generation_id
        for event in b.watch_generation(running):
            if event.HasField("progress"):
                break
        assert b.cancel_generation(running).generation.state == (
            types_pb2.GENERATION_STATE_CANCELLED
        )
        assert kinds(list(a.watch_generation(running)))[-1] == "cancelled"
        # A retried GenerateImage (same request_id) on the other replica re-attaches to the
        # job instead of generating twice.
        spec = types_pb2.GenerationSpec(prompt="a dune", seed=8, steps=6)
        first = a.generate_image(spec, request_id="retry-across-replicas")
        queued = next(first)
        first.close()  # type: ignore[attr-defined]  # the client goes away
        retried = list(b.generate_image(spec, request_id="retry-across-replicas"))
        assert retried[0].generation_id == queued.generation_id
        assert kinds(retried)[-1] in ("completed", "cancelled")


def test_a_replica_killed_mid_stream_another_gives_the_rest(cluster: Cluster) -> None:
    doomed = cluster.add_replica()
    seen: Events = []
    with LoracleClient(doomed.address) as client:
        stream = client.generate_image(slow("a harbour", 3, num_images=2))
        for event in stream:
            seen.append(event)
            if event.HasField("progress") and event.progress.step >= 3:
                break
        doomed.stop(signal.SIGKILL)
        generation_id = seen[0].generation_id
        with cluster.client(1) as b, cluster.client(0) as a:
            rest = list(b.watch_generation(generation_id, after_sequence=seen[-1].sequence))
            whole = list(a.watch_generation(generation_id))
    cluster.replicas.remove(doomed)
    assert seen + rest == whole
    assert [e.sequence for e in whole] == list(range(1, len(whole) + 1))
    assert kinds(whole)[-1] == "completed"
    assert len(images(whole)) == 2


def test_a_worker_killed_mid_job_is_redelivered_and_completes_once(
    cluster: Cluster, broker: NatsBroker
) -> None:
    with cluster.client(0) as a, cluster.client(1) as b:
        generation_id = a.submit_generation(slow("a lighthouse", 7, num_images=2)).generation_id
        for event in b.watch_generation(generation_id):
            if event.HasField("progress") and event.progress.step >= 2:
                break
        first = broker.claim(generation_id)
        assert first is not None
        assert first.state == "running"
        assert first.attempt == 1
        victim = next(w for w in cluster.workers if w.name == first.worker)
        killed_at = time.monotonic()
        victim.stop(signal.SIGKILL)
        cluster.workers.remove(victim)
        events = list(b.watch_generation(generation_id))
        recovered_after = time.monotonic() - killed_at
        record = final_generation(a, generation_id)
    claim = broker.claim(generation_id)
    assert claim is not None
    assert claim.attempt == 2
    assert claim.worker != victim.name
    assert kinds(events).count("started") == 2
    assert kinds(events).count("completed") == 1
    assert kinds(events).count("image_complete") == 2  # each image once
    got = images(events)
    assert record.state == types_pb2.GENERATION_STATE_SUCCEEDED
    assert [x.sha256 for x in record.images] == [
        hashlib.sha256(got[i]).hexdigest() for i in sorted(got)
    ]
    assert recovered_after >= LEASE_SECONDS  # redelivered only once the lease ran out
    cluster.add_worker(f"{victim.name}b")


def test_a_job_that_kills_every_worker_fails_after_its_attempts(
    cluster: Cluster, broker: NatsBroker
) -> None:
    assert len(cluster.workers) == MAX_ATTEMPTS
    killed: list[str] = []
    seen: list[Claim | None] = [None]  # the claim as last read
    with cluster.client(0) as a:
        generation_id = a.submit_generation(slow("a storm", 11)).generation_id
        # Each attempt runs on a worker that is still alive, and is killed mid-job.
        # Replacements start only after the last kill: one started in between may take so
        # long to start that the next attempt runs to its end before the test looks.
        for attempt in range(1, MAX_ATTEMPTS + 1):

            def running(n: int = attempt) -> bool:
                seen[0] = broker.claim(generation_id)
                return seen[0] is not None and seen[0].state == "running" and seen[0].attempt == n

            def said(n: int = attempt) -> str:
                return f"attempt {n} (claim last read: {seen[0]})"

            wait_until(running, 60, said)
            claim = seen[0]
            assert claim is not None
            victim = next(w for w in cluster.workers if w.name == claim.worker)
            victim.stop(signal.SIGKILL)
            cluster.workers.remove(victim)
            killed.append(victim.name)
        assert not cluster.workers
        for name in killed:  # a fresh worker finds the job out of attempts
            cluster.add_worker(f"{name}x")
        record = final_generation(a, generation_id)
    assert record.state == types_pb2.GENERATION_STATE_FAILED
    assert f"gave up after {MAX_ATTEMPTS} attempts" in record.error


def test_queued_jobs_survive_a_broker_restart(cluster: Cluster, nats: NatsServer) -> None:
    for worker in list(cluster.workers):
        worker.stop()
        cluster.workers.remove(worker)
    with cluster.client(0) as a:
        queued = [
            a.submit_generation(types_pb2.GenerationSpec(prompt=f"a fog {i}", seed=i, steps=2))
            for i in range(3)
        ]
    nats.stop()
    nats.start()  # same port, same file store
    cluster.add_worker("after-restart-1")
    cluster.add_worker("after-restart-2")
    with cluster.client(1) as b:
        for submitted in queued:
            assert final_generation(b, submitted.generation_id).state == (
                types_pb2.GENERATION_STATE_SUCCEEDED
            )
        # The replicas reconnected too: a new job goes through end to end.
        fresh = list(b.generate_image(types_pb2.GenerationSpec(prompt="a dawn", steps=2)))
        assert kinds(fresh)[-1] == "completed"


def test_postgres_unreachable_fails_fast_and_loses_nothing(
    cluster: Cluster, storage_url: str, tmp_path: Path
) -> None:
    proxy = CuttableProxy(("127.0.0.1", 5432))
    via_proxy = storage_url.replace("127.0.0.1:5432", f"127.0.0.1:{proxy.port}")
    text = cluster.config.read_text().replace(storage_url, via_proxy)
    config = tmp_path / "via-proxy.toml"
    config.write_text(text)
    assert via_proxy in config.read_text()
    replica = cluster.add_replica(config=config)
    library = cluster.base / "loras"
    for name in ("before", "during"):
        write_synthetic_lora(
            library / f"pg_{name}.safetensors", architecture=Architecture.SD1, name=f"pg_{name}"
        )
    try:
        with LoracleClient(replica.address) as client, cluster.client(0) as a:
            before = client.register_lora("pg_before.safetensors", request_id="pg-before")
            proxy.cut()
            started = time.monotonic()
            with pytest.raises(Unavailable) as refused:
                client.register_lora("pg_during.safetensors", request_id="pg-during")
            assert time.monotonic() - started < 10
            assert refused.value.retry_after is not None
            with pytest.raises(Unavailable):
                client.submit_generation(types_pb2.GenerationSpec(prompt="a void", steps=2))
            proxy.restore()

            def retried() -> bool:
                try:
                    client.register_lora("pg_during.safetensors", request_id="pg-during")
                except Unavailable:
                    return False
                return True

            wait_until(retried, 30, "the replica to reconnect")
            again = client.register_lora("pg_during.safetensors", request_id="pg-during")
            listed = a.list_loras(page_size=1000, consistency_token=again.consistency_token)
            names = [x.name for x in listed.loras]
            assert names.count("pg_before") == 1
            assert names.count("pg_during") == 1
            assert a.get_lora(before.lora.id).id == before.lora.id
    finally:
        replica.stop()
        cluster.replicas.remove(replica)
        proxy.close()


def test_a_replica_started_with_run_worker_runs_jobs_itself(
    cluster: Cluster, broker: NatsBroker, tmp_path: Path
) -> None:
    config = tmp_path / "with-worker.toml"
    config.write_text(
        cluster.config.read_text() + 'run_worker = true\nworker_name = "in-replica"\n'
    )
    replica = cluster.add_replica(config=config)
    for worker in list(cluster.workers):
        worker.stop()
        cluster.workers.remove(worker)
    try:

        def advertised_ready() -> bool:
            try:
                document = broker.workers().get("in-replica")
            except BrokerUnavailable:  # a read starved while the replica builds its model
                return False
            return document is not None and all(m["ready"] for m in json.loads(document)["models"])

        wait_until(advertised_ready, 60, "the replica's own worker to be ready")
        with LoracleClient(replica.address) as client:
            spec = types_pb2.GenerationSpec(prompt="a reef", seed=3, steps=2)
            events = list(client.generate_image(spec))
        assert kinds(events)[-1] == "completed"
        claim = broker.claim(events[0].generation_id)
        assert claim is not None
        assert claim.worker == "in-replica"
    finally:
        replica.stop()
        cluster.replicas.remove(replica)


@pytest.mark.timeout(400)
def test_tenancy_every_generation_belongs_to_its_principal_across_replicas(
    tmp_path: Path, nats: NatsServer
) -> None:
    """The tenancy matrix on a secured cluster of its own: owner and other call different
    replicas, so every check crosses the broker (live handles, the owner in job messages)."""
    with postgres_schema(POSTGRES_URL.replace("postgresql+psycopg", "postgresql")) as url:
        secured = start_cluster(
            tmp_path / "secured",
            broker_url=nats.url,
            storage_url=url,
            replicas=2,
            workers=1,
            tokens=[(p.name, p.token, p.scopes) for p in (OWNER, OTHER, ADMIN)],
            broker_namespace=f"s{uuid.uuid4().hex[:8]}",
            batch_wait_ms=50,
        )
        try:
            with (
                secured.client(0, OWNER.token) as owner,
                secured.client(1, OTHER.token) as other,
                secured.client(1, ADMIN.token) as admin,
            ):
                tenancy_matrix(owner, other, admin)
        finally:
            secured.stop()
