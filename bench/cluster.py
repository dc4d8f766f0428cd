"""Cluster benchmark on the CPU: one worker against two, and what the broker path adds to a job.

Everything runs as real processes on loopback: a private nats-server with JetStream (on a free
port, its store in a temporary folder), schemas of their own in the shared PostgreSQL, API
replicas (`python -m server --config X`) and workers (`python -m server.worker`), started by
`server.devtools.cluster`, the launcher that `make cluster` and the cluster tests use. Every
worker runs the embedded tiny SD1.5 (64x64) on one torch thread, so two workers can use the two
cores of the development machine. A single-machine server (in-process executor, no broker, one
torch thread too) runs beside the cluster as the reference. Both figures are measured side by
side in one run over interleaved rounds and reported as medians and ratios: absolute times
drift on a small shared machine, the ratios are the figures to compare.

1. Throughput, one worker against two. N client threads each run M generations back to back
   (a closed loop). Two workloads:
   - `distinct`: every client has a batch key of its own (its own guidance scale), so no two
     waiting jobs can share a batch: every batch is one image, and a second worker can only
     help by running a second job at the same time;
   - `compatible`: every job has the same batch key (only the seed differs), so jobs can be
     batched, up to `max_batch`, across the cluster.
   Each round measures three sides in a rotating order: the single-machine server, the cluster
   with its second worker paused (SIGSTOP, once its last pull request has expired, so it holds
   no job) and the cluster with both workers (SIGCONT): no worker start is paid between rounds.
   The mean batch size comes from each job's `started` event. The CPU time of every process
   (workers, replicas, NATS, PostgreSQL backends, the server, this client) is read from /proc
   around each round: on two cores the ratio is bounded by the cores, and that table shows who
   uses them.
2. Per-job overhead of the broker path. Sequential single jobs (batch 1) through the
   single-machine server against the cluster path (replica -> NATS -> worker -> NATS ->
   replica) with one worker, both stores on PostgreSQL, interleaved over rounds: the median
   added milliseconds per job, the ratio, the time to the first event (`queued`) and to
   `started`, and the CPU time per job of each process.

A job that a replica refuses as "model not ready" while a worker is running is retried and
counted (`refused_not_ready`; see docs/benchmarks.md). Every process is stopped, and the
PostgreSQL schemas dropped, on success, error, Ctrl-C and SIGTERM alike.

Usage: .venv/bin/python bench/cluster.py [--quick] [--clients N] [--replicas 1|2] [--keep] [--json]
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime
from pathlib import Path
from typing import Any

from client import FailedPrecondition, LoracleClient
from loracle.v1 import types_pb2
from server.devtools.bench_support import log, run_bench
from server.devtools.cluster import (
    DEFAULT_POSTGRES,
    Cluster,
    NatsServer,
    RunningWorker,
    postgres_schema,
    start_cluster,
)
from server.devtools.local_server import RunningServer, start_server, wait_for_models

MODEL = "tiny-sd15"
PROMPT = "a lighthouse at dusk, detailed, oil painting"
SIDE = 64
STEPS = 3
GUIDANCE = 7.0
SEED = 1234
# A job that takes longer than this is a hang: the run fails and shows the logs.
STREAM_TIMEOUT = 120.0
# A paused worker's last pull request (1 s) must have expired before a one-worker round.
PULL_EXPIRY = 1.5
# Before a pause, time for the worker to finish acknowledging its last job.
SETTLE = 0.5
# A call in flight when a worker was paused times out (and logs it) within this of a resume.
RESUME_GRACE = 3.0
# A round counts as quiet when nothing else on the machine took more than this many cores
# while its one-worker and two-worker sides ran.
QUIET_CORES = 0.3
BEGAN = time.perf_counter()


def say(message: str) -> None:
    log(f"{time.perf_counter() - BEGAN:6.1f}s {message}")


@dataclass(frozen=True)
class Plan:
    clients: int
    jobs_per_client: int
    throughput_rounds: int
    overhead_rounds: int
    overhead_jobs: int


QUICK = Plan(clients=8, jobs_per_client=2, throughput_rounds=2, overhead_rounds=3, overhead_jobs=3)
DEFAULT = Plan(
    clients=8, jobs_per_client=3, throughput_rounds=6, overhead_rounds=10, overhead_jobs=4
)


# --- one job --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Job:
    """One generation as the client saw it (seconds from the call)."""

    seconds: float
    queued: float
    started: float
    batch_size: int


class Refusals:
    """Jobs a replica refused because no worker served the model at that moment (a replica
    may briefly see no worker advertised; see docs/benchmarks.md). The job is retried after
    the replica's 1 s model cache has expired, and its time counts from the first call."""

    RETRIES = 3
    DELAY = 1.1
    _lock = threading.Lock()
    count = 0

    @classmethod
    def note(cls, error: FailedPrecondition) -> None:
        with cls._lock:
            cls.count += 1
        log(f"refused, retrying in {cls.DELAY} s: {error}")


def run_job(client: LoracleClient, spec: types_pb2.GenerationSpec) -> Job:
    """Consumes a whole GenerateImage stream; raises unless it completed with an image."""
    began = time.perf_counter()
    for attempt in range(Refusals.RETRIES + 1):
        try:
            return _run_job(client, spec, began)
        except FailedPrecondition as exc:
            if exc.reason != "MODEL_NOT_READY" or attempt == Refusals.RETRIES:
                raise
            Refusals.note(exc)
            time.sleep(Refusals.DELAY)
    raise AssertionError("unreachable")


def _run_job(client: LoracleClient, spec: types_pb2.GenerationSpec, began: float) -> Job:
    queued = started = -1.0
    batch_size = 0
    images = 0
    last = ""
    for event in client.generate_image(spec):
        now = time.perf_counter() - began
        last = event.WhichOneof("event") or ""
        if last == "queued" and queued < 0:
            queued = now
        elif last == "started" and started < 0:
            started = now
            batch_size = event.started.batch_size
        elif last == "image_complete":
            images += 1
        elif last == "failed":
            raise RuntimeError(f"generation failed: {event.failed.error}")
        elif last == "cancelled":
            raise RuntimeError("generation cancelled")
    seconds = time.perf_counter() - began
    if last != "completed" or images == 0 or started < 0:
        raise RuntimeError(f"the stream ended without a completed image (last event {last!r})")
    return Job(seconds, queued if queued >= 0 else started, started, batch_size)


def spec(seed: int, guidance: float = GUIDANCE) -> types_pb2.GenerationSpec:
    return types_pb2.GenerationSpec(
        model=MODEL,
        prompt=PROMPT,
        width=SIDE,
        height=SIDE,
        steps=STEPS,
        guidance_scale=guidance,
        seed=seed,
        num_images=1,
    )


def median_ms(values: Sequence[float]) -> float:
    return round(statistics.median(values) * 1000, 1)


def mean_ms(values: Sequence[float]) -> float:
    return round(statistics.fmean(values) * 1000, 1)


# --- CPU time per process -------------------------------------------------------------------

_TICK = os.sysconf("SC_CLK_TCK")
# Rows of the CPU tables, in print order.
COMPONENTS = ("server", "workers", "replicas", "nats", "postgres", "client")


def _process_cpu(pid: int) -> float:
    """User + system seconds of a process, all threads (0 once it is gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return 0.0
    return (int(fields[11]) + int(fields[12])) / _TICK


def _machine_busy() -> float:
    """Busy seconds of the whole machine, all CPUs (from /proc/stat: all but idle, iowait)."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    return (sum(fields[:8]) - fields[3] - fields[4]) / _TICK


def _postgres_pids() -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                if (entry / "comm").read_text().strip() == "postgres":
                    pids.append(int(entry.name))
    return pids


@dataclass
class CpuMeter:
    """CPU seconds by component, read from /proc: the single-machine server, the workers, the
    replicas, nats-server, every PostgreSQL backend (shared with whatever else uses it), and
    this process (the client threads)."""

    pids: Callable[[], dict[str, list[int]]]

    def snapshot(self) -> dict[str, float]:
        out = {name: sum(_process_cpu(p) for p in pids) for name, pids in self.pids().items()}
        out["postgres"] = sum(_process_cpu(p) for p in _postgres_pids())
        times = os.times()
        out["client"] = times.user + times.system
        out["machine"] = _machine_busy()
        return out

    @staticmethod
    def per_item(
        before: dict[str, float], after: dict[str, float], items: int, wall: float
    ) -> dict[str, float]:
        """CPU milliseconds per image by component and their total, the cores they kept busy,
        and the cores that anything else on the machine took meanwhile (noise)."""
        delta = {k: max(0.0, after.get(k, 0.0) - before.get(k, 0.0)) for k in COMPONENTS}
        ours = sum(delta.values())
        machine = after["machine"] - before["machine"]
        out = {k: round(v / items * 1000, 1) for k, v in delta.items()}
        out["total"] = round(ours / items * 1000, 1)
        out["cores_busy"] = round(ours / wall, 2)
        out["other_cores"] = round(max(0.0, machine - ours) / wall, 2)
        return out


def merge_cpu(samples: Sequence[dict[str, float]]) -> dict[str, float]:
    """Medians over rounds, key by key."""
    return {k: round(statistics.median(s[k] for s in samples), 2) for k in samples[0]}


# --- processes ------------------------------------------------------------------------------


@dataclass
class Pauser:
    """Pauses a worker with SIGSTOP and resumes it with SIGCONT, remembering when it resumed:
    a fetch that was in flight when it stopped times out on resume and logs a warning that
    the benchmark caused, not the cluster."""

    worker: RunningWorker
    resumed: list[float] = field(default_factory=list)
    paused: bool = False

    def pause(self) -> None:
        # A worker acknowledges a job just after publishing its outcome, which the client may
        # already have: let that finish first.
        time.sleep(SETTLE)
        self.worker.process.send_signal(signal.SIGSTOP)
        self.paused = True
        time.sleep(PULL_EXPIRY)

    def resume(self) -> None:
        if self.paused and self.worker.process.poll() is None:
            self.resumed.append(time.time())
            self.worker.process.send_signal(signal.SIGCONT)
        self.paused = False


def stop_all(cluster: Cluster | None, servers: Sequence[RunningServer]) -> None:
    """SIGTERM to every process at once, then wait (a stop takes seconds each); SIGKILL what
    does not exit in time. A paused worker is resumed first, or it could not exit."""
    processes: list[subprocess.Popen[str]] = [s.process for s in servers]
    if cluster is not None:
        processes += [r.process for r in cluster.replicas]
        processes += [w.process for w in cluster.workers]
    for process in processes:
        if process.poll() is None:
            with contextlib.suppress(OSError):
                process.send_signal(signal.SIGCONT)
                process.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + 30
    for process in processes:
        try:
            process.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            log(f"process {process.pid} did not stop in time: killing it")
            process.kill()
            process.wait(timeout=10)


def log_tails(base: Path, limit: int = 2500) -> None:
    """The end of every replica, worker, server and NATS log, for a failed run."""
    for path in sorted(base.rglob("*.log")):
        with contextlib.suppress(OSError):
            text = path.read_text(errors="replace")
            log(f"--- {path} (last {limit} characters)\n{text[-limit:]}")


def log_warnings(base: Path, resumed: Sequence[float]) -> tuple[list[str], int]:
    """WARNING and ERROR lines of the cluster's logs (workers and replicas), less the workers'
    lines logged within a few seconds of a resume (counted apart: the benchmark caused them)."""
    lines: list[str] = []
    after_resume = 0
    for path in sorted(base.rglob("*.log")):
        if not path.name.startswith(("worker-", "server-")) or "cluster" not in path.parts:
            continue
        with contextlib.suppress(OSError):
            for line in path.read_text(errors="replace").splitlines():
                if " WARNING " not in line and " ERROR " not in line:
                    continue
                try:
                    at = datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S,%f").timestamp()
                except ValueError:
                    at = 0.0
                worker = path.name.startswith("worker-")
                if worker and any(-0.01 <= at - r < RESUME_GRACE for r in resumed):
                    after_resume += 1
                else:
                    lines.append(f"{path.parent.name}: {line}")
    return lines, after_resume


# --- 2. per-job overhead --------------------------------------------------------------------


def measure_overhead(
    local: LoracleClient, remote: LoracleClient, plan: Plan, meter: CpuMeter
) -> dict[str, Any]:
    for warm in (local, remote):  # warm-up: the first jobs load the pipeline
        for n in range(2):
            run_job(warm, spec(SEED + n))
    per_round: list[dict[str, float]] = []
    jobs: dict[str, list[Job]] = {"local": [], "cluster": []}
    cpu: dict[str, list[dict[str, float]]] = {"local": [], "cluster": []}
    seed = SEED
    for number in range(plan.overhead_rounds):
        order = ("local", "cluster") if number % 2 == 0 else ("cluster", "local")
        ms: dict[str, float] = {}
        for target in order:
            client = local if target == "local" else remote
            before, began = meter.snapshot(), time.perf_counter()
            done = [run_job(client, spec(seed + n)) for n in range(plan.overhead_jobs)]
            wall = time.perf_counter() - began
            cpu[target].append(CpuMeter.per_item(before, meter.snapshot(), len(done), wall))
            jobs[target] += done
            ms[target] = statistics.fmean(j.seconds for j in done) * 1000
        seed += plan.overhead_jobs
        per_round.append(ms)
        say(
            f"(2) round {number + 1}: in-process {ms['local']:.0f} ms/job, cluster "
            f"{ms['cluster']:.0f} ms/job, {ms['cluster'] - ms['local']:+.0f} ms"
        )

    def side(name: str) -> dict[str, Any]:
        done = jobs[name]
        return {
            "ms_per_job": round(statistics.median(r[name] for r in per_round), 1),
            "total_p50_ms": median_ms([j.seconds for j in done]),
            "queued_p50_ms": median_ms([j.queued for j in done]),
            "queued_mean_ms": mean_ms([j.queued for j in done]),
            "started_p50_ms": median_ms([j.started for j in done]),
            "started_mean_ms": mean_ms([j.started for j in done]),
            "started_max_ms": round(max(j.started for j in done) * 1000, 1),
            "after_started_p50_ms": median_ms([j.seconds - j.started for j in done]),
            "batch_sizes": sorted({j.batch_size for j in done}),
            "cpu_ms_per_job": merge_cpu(cpu[name]),
        }

    return {
        "local": side("local"),
        "cluster": side("cluster"),
        # Medians of the paired per-round figures: both sides of a round saw the same load.
        "added_ms": round(statistics.median(r["cluster"] - r["local"] for r in per_round), 1),
        "ratio": round(statistics.median(r["cluster"] / r["local"] for r in per_round), 3),
        "rounds": [{k: round(v, 1) for k, v in r.items()} for r in per_round],
        "jobs_per_round": plan.overhead_jobs,
    }


# --- 1. throughput --------------------------------------------------------------------------

# The sides of a throughput round: the single-machine server, the cluster with its second
# worker paused, and the cluster with both workers.
SIDES = ("local", "1", "2")
SIDE_NAMES = {"local": "in-process", "1": "1 worker", "2": "2 workers"}


@dataclass(frozen=True)
class Round:
    images_per_s: float
    seconds: float
    jobs: list[Job]
    cpu: dict[str, float]


def closed_loop(
    clients: Sequence[LoracleClient],
    workload: str,
    jobs_per_client: int,
    seed: int,
    pool: concurrent.futures.ThreadPoolExecutor,
    stop: threading.Event,
    meter: CpuMeter,
) -> Round:
    """Every client runs its jobs back to back; the round ends when the last one completes."""

    def one_client(index: int) -> list[Job]:
        # `distinct`: a guidance scale (so a batch key) per client; every job costs the same.
        guidance = 5.0 + 0.5 * index if workload == "distinct" else GUIDANCE
        done: list[Job] = []
        for n in range(jobs_per_client):
            if stop.is_set():
                break
            done.append(run_job(clients[index], spec(seed + index * 1000 + n, guidance)))
        return done

    before = meter.snapshot()
    began = time.perf_counter()
    futures = [pool.submit(one_client, i) for i in range(len(clients))]
    jobs = [job for future in futures for job in future.result()]
    seconds = time.perf_counter() - began
    cpu = CpuMeter.per_item(before, meter.snapshot(), len(jobs), seconds)
    return Round(len(jobs) / seconds, seconds, jobs, cpu)


def mean_batch(jobs: Sequence[Job]) -> float:
    """Images per batch: jobs over batches, where a job in a batch of b counts 1/b batch."""
    return round(len(jobs) / sum(1 / max(j.batch_size, 1) for j in jobs), 2)


def measure_throughput(
    local: Sequence[LoracleClient],
    cluster: Sequence[LoracleClient],
    first: Pauser,
    second: Pauser,
    plan: Plan,
    stop: threading.Event,
    meter: CpuMeter,
) -> dict[str, Any]:
    # Warm-up of the second worker alone (it loads its pipeline on its first job).
    first.pause()
    try:
        run_job(cluster[0], spec(SEED))
    finally:
        first.resume()
    result: dict[str, Any] = {}
    with thread_pool(plan.clients, stop) as pool:
        seed = SEED + 100_000
        for workload in ("distinct", "compatible"):
            per_round: list[dict[str, Round]] = []
            for number in range(plan.throughput_rounds):
                # Rotated, so that no side always runs first or last.
                order = SIDES[number % 3 :] + SIDES[: number % 3]
                rounds: dict[str, Round] = {}
                for side in order:
                    if side == "1":
                        second.pause()
                    try:
                        rounds[side] = closed_loop(
                            local if side == "local" else cluster,
                            workload,
                            plan.jobs_per_client,
                            seed,
                            pool,
                            stop,
                            meter,
                        )
                    finally:
                        second.resume()
                    seed += 100_000
                    if side == "1":
                        time.sleep(0.5)  # the resumed worker catches up on its heartbeats
                per_round.append(rounds)
                figures = ", ".join(
                    f"{SIDE_NAMES[k]} {rounds[k].images_per_s:.2f} images/s "
                    f"(batch {mean_batch(rounds[k].jobs)}, cores {rounds[k].cpu['cores_busy']} "
                    f"+ others {rounds[k].cpu['other_cores']})"
                    for k in SIDES
                )
                say(
                    f"(1) {workload} round {number + 1}: {figures}; 2 workers / 1: "
                    f"{rounds['2'].images_per_s / rounds['1'].images_per_s:.3f}"
                )
            result[workload] = summarize_throughput(per_round)
    return result


def summarize_throughput(per_round: list[dict[str, Round]]) -> dict[str, Any]:
    def side(name: str) -> dict[str, Any]:
        rounds = [r[name] for r in per_round]
        jobs = [j for r in rounds for j in r.jobs]
        return {
            "images_per_s": round(statistics.median(r.images_per_s for r in rounds), 3),
            "mean_batch": mean_batch(jobs),
            "job_p50_ms": median_ms([j.seconds for j in jobs]),
            "started_p50_ms": median_ms([j.started for j in jobs]),
            "cpu_ms_per_image": merge_cpu([r.cpu for r in rounds]),
        }

    def ratio(a: str, b: str) -> float:
        return round(statistics.median(r[a].images_per_s / r[b].images_per_s for r in per_round), 3)

    quiet = [r for r in per_round if all(r[k].cpu["other_cores"] < QUIET_CORES for k in "12")]
    return {
        **{name: side(name) for name in SIDES},
        # Medians of the paired per-round ratios.
        "ratio": ratio("2", "1"),
        # The same over the rounds that nothing else disturbed (None: there was none).
        "ratio_quiet": round(
            statistics.median(r["2"].images_per_s / r["1"].images_per_s for r in quiet), 3
        )
        if quiet
        else None,
        "quiet_rounds": len(quiet),
        "ratio_1_to_local": ratio("1", "local"),
        "ratio_2_to_local": ratio("2", "local"),
        "rounds": [{k: round(r[k].images_per_s, 3) for k in SIDES} for r in per_round],
    }


@contextlib.contextmanager
def thread_pool(
    size: int, stop: threading.Event
) -> Iterator[concurrent.futures.ThreadPoolExecutor]:
    """On an error or Ctrl-C the pool is not joined (its threads end when their streams do,
    once the servers are stopped); `stop` keeps them from starting another job."""
    pool = concurrent.futures.ThreadPoolExecutor(size, thread_name_prefix="bench-client")
    try:
        yield pool
    except BaseException:
        stop.set()
        pool.shutdown(wait=False, cancel_futures=True)
        raise
    pool.shutdown(wait=True)


# --- orchestration --------------------------------------------------------------------------


def run(args: argparse.Namespace) -> dict[str, Any]:
    plan = QUICK if args.quick else DEFAULT
    if args.clients:
        plan = replace(plan, clients=args.clients)
    begin = time.perf_counter()
    base = Path(tempfile.mkdtemp(prefix="loracle-cluster-bench-"))
    nats = NatsServer(base / "nats")
    cluster: Cluster | None = None
    local: RunningServer | None = None
    second: Pauser | None = None
    clients: list[LoracleClient] = []
    stop = threading.Event()
    ok = False

    def pids() -> dict[str, list[int]]:
        return {
            "server": [local.process.pid] if local is not None else [],
            "workers": [w.process.pid for w in cluster.workers] if cluster else [],
            "replicas": [r.process.pid for r in cluster.replicas] if cluster else [],
            "nats": [nats.process.pid] if nats.process is not None else [],
        }

    meter = CpuMeter(pids)
    try:
        with (
            postgres_schema(args.postgres) as cluster_store,
            postgres_schema(args.postgres) as local_store,
        ):
            try:
                nats.start()
                say(f"nats-server on {nats.url}; logs under {base}")
                # The single-machine server starts while the cluster does.
                with concurrent.futures.ThreadPoolExecutor(1) as starter:
                    local_started = starter.submit(
                        start_server, base / "local", "--storage-url", local_store
                    )
                    try:
                        cluster = start_cluster(
                            base / "cluster",
                            broker_url=nats.url,
                            storage_url=cluster_store,
                            replicas=args.replicas,
                            workers=1,
                            # One torch thread per worker (the default, spelled out), as
                            # the single-machine server's executor: two workers can then
                            # use the two cores.
                            torch_threads=1,
                            log_level="INFO",
                        )
                    finally:
                        local = local_started.result()
                say(
                    f"cluster up: {args.replicas} replica(s), 1 worker; single-machine server "
                    f"on {local.address}"
                )
                clients = [
                    LoracleClient(local.address, stream_timeout=STREAM_TIMEOUT)
                    for _ in range(plan.clients)
                ] + [
                    LoracleClient(
                        cluster.replicas[i % len(cluster.replicas)].address,
                        stream_timeout=STREAM_TIMEOUT,
                    )
                    for i in range(plan.clients)
                ]
                local_clients, cluster_clients = clients[: plan.clients], clients[plan.clients :]
                wait_for_models(local_clients[0], timeout=120)
                # (2) first, while the cluster has one worker.
                overhead = measure_overhead(local_clients[0], cluster_clients[0], plan, meter)
                # (1) then with a second worker.
                second = Pauser(cluster.add_worker())
                say(f"second worker {second.worker.name} up")
                throughput = measure_throughput(
                    local_clients,
                    cluster_clients,
                    Pauser(cluster.workers[0]),
                    second,
                    plan,
                    stop,
                    meter,
                )
                ok = True
            except BaseException as exc:
                stop.set()
                if not isinstance(exc, (KeyboardInterrupt, SystemExit)):
                    log_tails(base)
                raise
            finally:
                say("stopping every process")
                for c in clients:
                    c.close()
                stop_all(cluster, [local] if local is not None else [])
                nats.stop()
        warnings, after_resume = log_warnings(base, second.resumed if second else [])
    finally:
        if ok and not args.keep:
            shutil.rmtree(base, ignore_errors=True)
        else:
            log(f"logs kept under {base}")
    result = {
        "throughput": throughput,
        "overhead": overhead,
        "refused_not_ready": Refusals.count,
        "cluster_log_warnings": len(warnings),
        "worker_warnings_after_resume": after_resume,
        "settings": {
            "model": MODEL,
            "size": SIDE,
            "steps": STEPS,
            "replicas": args.replicas,
            "clients": plan.clients,
            "jobs_per_client": plan.jobs_per_client,
            "throughput_rounds": plan.throughput_rounds,
            "overhead_rounds": plan.overhead_rounds,
            "quick": args.quick,
        },
        "seconds": round(time.perf_counter() - begin, 1),
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
    }
    for line in warnings[:12]:
        log(f"cluster log: {line}")
    if not args.json:
        print_table(result)
    return result


def _cpu_rows(columns: Sequence[dict[str, float]], names: Sequence[str], indent: str) -> None:
    print(f"{indent}{'CPU ms per image':<24}" + "".join(f"{n:>14}" for n in names))
    for key in (*COMPONENTS, "total"):
        print(f"{indent}  {key:<22}" + "".join(f"{c[key]:>14.0f}" for c in columns))
    for key, label in (("cores_busy", "cores busy (of 2)"), ("other_cores", "cores others took")):
        print(f"{indent}  {label:<22}" + "".join(f"{c[key]:>14.2f}" for c in columns))


def print_table(result: dict[str, Any]) -> None:
    s, tp, oh = result["settings"], result["throughput"], result["overhead"]
    print(
        f"1. Throughput: {s['clients']} clients x {s['jobs_per_client']} jobs back to back, "
        f"{s['replicas']} replica(s), tiny SD1.5 {s['size']}x{s['size']}, {s['steps']} steps, "
        f"one torch thread per worker; {s['throughput_rounds']} interleaved rounds, medians"
    )
    header = "".join(f"{SIDE_NAMES[k]:>16}" for k in SIDES)
    print(f"  {'images/s (batch)':<18}{header}{'2w / 1w':>9}{'1w / in-proc':>14}")
    for workload in ("distinct", "compatible"):
        w = tp[workload]
        row = "".join(
            f"{w[k]['images_per_s']:.2f} ({w[k]['mean_batch']:.1f})".rjust(16) for k in SIDES
        )
        print(f"  {workload:<18}{row}{w['ratio']:>9.3f}{w['ratio_1_to_local']:>14.3f}")
    print("  (batch: mean images per batch, from the jobs' started events)")
    for workload in ("distinct", "compatible"):
        w = tp[workload]
        quiet = f"{w['ratio_quiet']:.3f}" if w["ratio_quiet"] is not None else "-"
        print(
            f"  {workload}: 2w / 1w over the rounds where other processes took under "
            f"{QUIET_CORES} cores: {quiet} ({w['quiet_rounds']} of {len(w['rounds'])} rounds)"
        )
    for workload in ("distinct", "compatible"):
        print(f"  {workload}:")
        _cpu_rows(
            [tp[workload][k]["cpu_ms_per_image"] for k in SIDES],
            [SIDE_NAMES[k] for k in SIDES],
            "    ",
        )
    lo, cl = oh["local"], oh["cluster"]
    print(
        f"2. Per job: sequential single jobs, {s['overhead_rounds']} interleaved rounds of "
        f"{oh['jobs_per_round']}, ms"
    )
    rows = (
        ("end to end (median of round means)", "ms_per_job", ""),
        ("end to end, p50 of all jobs", "total_p50_ms", ""),
        ("to queued, p50 / mean", "queued_p50_ms", "queued_mean_ms"),
        ("to started, p50 / mean", "started_p50_ms", "started_mean_ms"),
        ("to started, max", "started_max_ms", ""),
        ("started to completed, p50", "after_started_p50_ms", ""),
    )
    print(f"  {'':<36}{'in-process':>14}{'cluster':>14}")
    for label, first, second in rows:
        cells = [
            f"{side[first]:.1f}" + (f" / {side[second]:.0f}" if second else "") for side in (lo, cl)
        ]
        print(f"  {label:<36}{cells[0]:>14}{cells[1]:>14}")
    print(
        f"  added by the broker path: {oh['added_ms']:+.1f} ms per job, ratio {oh['ratio']:.3f} "
        "(cluster / in-process)"
    )
    _cpu_rows([lo["cpu_ms_per_job"], cl["cpu_ms_per_job"]], ["in-process", "cluster"], "  ")
    print(
        f"{result['machine']['cpus']} CPUs, Python {result['machine']['python']}, "
        f"{result['seconds']:.0f} s; jobs refused as 'model not ready' (retried): "
        f"{result['refused_not_ready']}; warnings in the cluster's logs: "
        f"{result['cluster_log_warnings']} (+{result['worker_warnings_after_resume']} right "
        "after resuming the paused worker)"
    )
    print()


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Cluster throughput with one worker against two, and the per-job overhead "
        "of the broker path against the in-process executor, on the tiny CPU model."
    )
    parser.add_argument(
        "--quick", action="store_true", help="a short run (about 2 minutes instead of 6)"
    )
    parser.add_argument(
        "--clients",
        type=int,
        choices=range(1, 15),
        metavar="N",
        default=0,
        help="concurrent clients in (1) (default 8; the queue holds 16 jobs)",
    )
    parser.add_argument(
        "--replicas", type=int, choices=(1, 2), default=1, help="API replicas (default 1)"
    )
    parser.add_argument("--postgres", default=DEFAULT_POSTGRES, help="PostgreSQL URL")
    parser.add_argument("--keep", action="store_true", help="keep the logs folder")
    parser.add_argument(
        "--json", action="store_true", help="print only the JSON line on stdout, no table"
    )
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(list(sys.argv[1:] if argv is None else argv))
    return run_bench(lambda: run(args))


if __name__ == "__main__":
    sys.exit(main())
