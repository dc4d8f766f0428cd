"""The composition root: the only module that wires infrastructure to the application.
Tests pass their own pieces by keyword; everything else gets the real thing."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Protocol

from server.application.commands import (
    CommandBus,
    DeleteLoRACommand,
    DeleteLoRAHandler,
    FilterConfidentRecommendationsCommand,
    FilterConfidentRecommendationsHandler,
    ImportLoRACatalogCommand,
    ImportLoRACatalogHandler,
    ImportLoRAsCommand,
    ImportLoRAsHandler,
    RecommendLoRAsCommand,
    RecommendLoRAsHandler,
    RecommendTopLoRACommand,
    RecommendTopLoRAHandler,
    RecordGenerationCommand,
    RecordGenerationHandler,
    RegisterLoRACommand,
    RegisterLoRAHandler,
    UpdateLoRACommand,
    UpdateLoRAHandler,
)
from server.application.commands.generation import (
    CancelGenerationCommand,
    CancelGenerationHandler,
    GenerateImageCommand,
    GenerateImageHandler,
    QuickGenerateCommand,
    QuickGenerateHandler,
    SubmitGenerationCommand,
    SubmitGenerationHandler,
    UpscaleImageCommand,
    UpscaleImageHandler,
)
from server.application.context import SYSTEM_CONTEXT
from server.application.generation.jobs import GenerationJobs
from server.application.generation.lifecycle import GenerationRecorder, fail_interrupted
from server.application.generation.request import GenerationLimits
from server.application.limits import LimitsMiddleware, RateLimiter
from server.application.middleware import Authorizer, Middleware, default_middlewares
from server.application.ports import Executor, LoraFiles, ModelLookup
from server.application.queries import (
    GetAllLoRAsHandler,
    GetAllLoRAsQuery,
    GetGenerationHandler,
    GetGenerationQuery,
    GetLoRAByIdHandler,
    GetLoRAByIdQuery,
    GetLoRAsByBaseModelHandler,
    GetLoRAsByBaseModelQuery,
    ListBaseModelsHandler,
    ListBaseModelsQuery,
    ListEventsHandler,
    ListEventsQuery,
    ListGenerationsHandler,
    ListGenerationsQuery,
    QueryBus,
    QueryCache,
    SearchLoRAsByPromptHandler,
    SearchLoRAsByPromptQuery,
    WatchGenerationHandler,
    WatchGenerationQuery,
)
from server.application.security import Credential, ScopeAuthorizer, TokenAuthenticator
from server.config import Settings, cpu_threads
from server.domain.generation import GenerationState
from server.domain.recommend.engine import RecommendationEngine
from server.domain.tokens import TokenSigner, parse_key
from server.infrastructure.broker.nats_broker import NatsBroker
from server.infrastructure.broker.port import Broker
from server.infrastructure.broker.replica import BrokerExecutor, ClusterModels, RecorderFeed
from server.infrastructure.broker.worker import BrokerWorker
from server.infrastructure.diffusion.compilation import use_cache_dir
from server.infrastructure.diffusion.executor import DiffusionExecutor
from server.infrastructure.diffusion.footprint import DeviceMemory
from server.infrastructure.diffusion.images import ImageStore
from server.infrastructure.diffusion.registry import ModelRegistry
from server.infrastructure.event_store import EventStore
from server.infrastructure.generation_outcomes import ProjectedOutcomes
from server.infrastructure.input_images import PillowImageReader
from server.infrastructure.lora_files import LoraFileReader
from server.infrastructure.metrics import ExecutorState, Metrics
from server.infrastructure.projector import Projector
from server.infrastructure.read_model import ProjectedChange, SqlReadModel
from server.infrastructure.recommend_snapshot import FILE_NAME as SNAPSHOT_FILE_NAME
from server.infrastructure.recommend_snapshot import SnapshotFile
from server.infrastructure.recommender import CatalogRecommender
from server.infrastructure.storage_url import StorageUrl
from server.infrastructure.token_keys import shared_key

log = logging.getLogger("loracle")


class DeviceExecutor(Executor, ExecutorState, Protocol):
    """The executor that owns this process's device: DiffusionExecutor, or a fake in unit
    tests of the generation path."""

    def start(self) -> None: ...
    def stop(self, timeout: float = ...) -> None: ...


@dataclass
class Container:
    settings: Settings
    commands: CommandBus
    queries: QueryBus
    store: EventStore
    read_model: SqlReadModel
    projector: Projector
    files: LoraFiles
    recommender: CatalogRecommender
    models: ModelRegistry
    executor: DeviceExecutor
    recorder: GenerationRecorder
    authenticator: TokenAuthenticator
    generations: GenerationJobs
    tokens: TokenSigner
    middlewares: list[Middleware] = field(default_factory=list)
    # Cluster mode only: the broker link, the outcome recorder and an optional worker.
    broker: Broker | None = None
    feed: RecorderFeed | None = None
    worker: BrokerWorker | None = None

    def close(self) -> None:
        if self.worker is not None:
            self.worker.stop()
        if self.feed is not None:
            self.feed.stop()
        self.executor.stop()
        self.recorder.flush()
        self.recorder.close()
        self.models.close()
        self.projector.stop()
        self.recommender.stop()
        self.read_model.close()
        self.store.close()
        if self.broker is not None:
            self.broker.close()

    def metrics(self) -> Metrics:
        """This server's Prometheus registry, fed by the projector from now on."""
        return Metrics.create(
            executor=self.executor,
            cache=self.queries.cache,
            store=self.store,
            projector=self.projector,
        )


def bootstrap(
    settings: Settings,
    *,
    files: LoraFiles | None = None,
    authorizer: Authorizer | None = None,
    executor: DeviceExecutor | None = None,
    broker: Broker | None = None,
    models: ModelLookup | None = None,
    start_projector: bool = True,
    build_embedded_model: bool = True,
) -> Container:
    url = StorageUrl.parse(settings.resolved_storage_url)
    if url.kind == "sqlite":
        assert url.sqlite_path is not None
        url.sqlite_path.parent.mkdir(parents=True, exist_ok=True)
    if files is None:
        roots = settings.resolved_lora_roots
        for root in roots:
            root.mkdir(parents=True, exist_ok=True)
        files = LoraFileReader(roots, max_header_bytes=settings.max_header_bytes)

    store = EventStore(url)
    # One signer for page and consistency tokens; the key is shared by every replica.
    tokens = TokenSigner(parse_key(settings.token_key) if settings.token_key else shared_key(url))
    read_model = SqlReadModel(url, tokens)
    projector = Projector(store, read_model)
    authenticator = TokenAuthenticator(
        [Credential(t.name, t.sha256, t.scopes) for t in settings.tokens]
    )
    if authorizer is None and authenticator.enabled:
        authorizer = ScopeAuthorizer()
    rate = settings.rate_limit_per_second
    limits = LimitsMiddleware(
        RateLimiter(rate, max(1.0, 2 * rate)) if rate > 0 else None,
        settings.max_streams_per_principal,
    )
    middlewares = default_middlewares(authorizer, limits)
    cache = QueryCache(
        max_entries=settings.query_cache_entries,
        max_bytes=int(settings.query_cache_mib * 1024 * 1024),
    )
    queries = QueryBus(middlewares, cache=cache, consistency=projector)

    # The index keeps no views: it reads the few it returns from the read model. Its state
    # is saved beside the read models (not for an in-memory database, gone at restart).
    snapshot = (
        None
        if url.kind == "memory"
        else SnapshotFile(settings.data_dir.resolve() / SNAPSHOT_FILE_NAME, url.identity())
    )
    recommender = CatalogRecommender(
        RecommendationEngine(views=read_model.views_by_id),
        read_model,
        snapshot=snapshot,
        replay=projector.changes,
    )

    def invalidate(change: ProjectedChange) -> None:
        topics = {"events"} if change.audit else set()
        if change.upserts or change.deletes:
            topics.add("loras")
        if change.history or change.feedback:
            topics.add("history")
        if change.generations:
            topics.add("generations")
        queries.invalidate(topics)

    # The index must see a batch before the cache forgets the old answers.
    projector.on_change(recommender.on_change)
    projector.on_change(invalidate)
    if settings.rebuild_projections:
        log.info("rebuilt read models up to position %d", projector.rebuild())

    commands = CommandBus(middlewares)
    commands.register(RegisterLoRACommand, RegisterLoRAHandler(files, store, read_model, projector))
    commands.register(ImportLoRAsCommand, ImportLoRAsHandler(files, store, read_model, projector))
    commands.register(ImportLoRACatalogCommand, ImportLoRACatalogHandler(store, read_model))
    commands.register(UpdateLoRACommand, UpdateLoRAHandler(store))
    commands.register(DeleteLoRACommand, DeleteLoRAHandler(store))
    commands.register(
        RecommendLoRAsCommand,
        RecommendLoRAsHandler(recommender, catalog=store, read_model=read_model),
    )
    commands.register(
        RecommendTopLoRACommand,
        RecommendTopLoRAHandler(recommender, catalog=store, read_model=read_model),
    )
    commands.register(
        FilterConfidentRecommendationsCommand,
        FilterConfidentRecommendationsHandler(store, read_model),
    )
    commands.register(RecordGenerationCommand, RecordGenerationHandler(store))

    queries.register(GetLoRAByIdQuery, GetLoRAByIdHandler(read_model))
    queries.register(GetAllLoRAsQuery, GetAllLoRAsHandler(read_model))
    queries.register(GetLoRAsByBaseModelQuery, GetLoRAsByBaseModelHandler(read_model))
    queries.register(ListEventsQuery, ListEventsHandler(read_model))
    queries.register(SearchLoRAsByPromptQuery, SearchLoRAsByPromptHandler(recommender, tokens))
    registry = ModelRegistry(
        settings.models,
        data_dir=settings.data_dir.resolve(),
        controlnets=settings.controlnets,
        upscalers=settings.upscalers,
        device_memory=DeviceMemory.probe(settings.device_budget_gb),
    )
    if broker is None and settings.broker_url:
        broker = connect_broker(settings, "loracle-server")
    model_lookup: ModelLookup = registry if models is None else models
    if broker is not None:
        model_lookup = ClusterModels(
            broker,
            tuple(m.config for m in model_lookup.statuses()),
            controlnets=model_lookup.controlnets(),
            upscalers=model_lookup.upscaler_models(),
        )
    queries.register(ListBaseModelsQuery, ListBaseModelsHandler(model_lookup))
    # A cluster replica runs no model unless it also runs a worker.
    local_models = broker is None or settings.run_worker
    if build_embedded_model and settings.embedded_model and local_models:
        registry.ensure_embedded()
    images = ImageStore(
        settings.data_dir.resolve() / "generations",
        retention_seconds=settings.image_retention_hours * 3600,
    )
    if executor is None:
        executor = device_executor(settings, settings.max_queue, images)
    outcomes = ProjectedOutcomes()
    projector.on_change(outcomes.on_change)

    def record_history(prompt: str, lora_ids: tuple[str, ...], key: str) -> None:
        commands.dispatch(
            RecordGenerationCommand(prompt=prompt, lora_ids=lora_ids, generation_key=key),
            SYSTEM_CONTEXT,
        ).unwrap()

    recorder = GenerationRecorder(store, record_history)
    jobs = GenerationJobs(
        limits=GenerationLimits(
            prompt_chars=settings.max_prompt_chars,
            side=settings.max_image_side,
            pixels=settings.max_image_pixels,
            steps=settings.max_steps,
            images=settings.max_images_per_request,
            loras=settings.max_loras_per_request,
            input_bytes=settings.max_input_image_bytes,
            input_pixels=settings.max_input_image_pixels,
        ),
        images=PillowImageReader(),
        stored=images,
        models=model_lookup,
        executor=executor
        if broker is None
        else BrokerExecutor(broker, max_queue=settings.max_queue),
        catalog=store,
        loras=read_model,
        files=files,
        recorder=recorder,
        outcomes=outcomes,
    )
    commands.register(GenerateImageCommand, GenerateImageHandler(jobs))
    commands.register(UpscaleImageCommand, UpscaleImageHandler(jobs))
    commands.register(QuickGenerateCommand, QuickGenerateHandler(jobs, recommender))
    commands.register(SubmitGenerationCommand, SubmitGenerationHandler(jobs))
    commands.register(CancelGenerationCommand, CancelGenerationHandler(jobs, store))
    queries.register(GetGenerationQuery, GetGenerationHandler(read_model))
    queries.register(ListGenerationsQuery, ListGenerationsHandler(read_model))
    queries.register(WatchGenerationQuery, WatchGenerationHandler(read_model, jobs, images))
    executor.start()

    if start_projector:
        projector.catch_up()
    # Loaded after the catch-up and before the projector thread runs, so no batch is missed
    # or applied twice.
    recommender.load()
    if start_projector:
        projector.start()
        recommender.start()
    feed: RecorderFeed | None = None
    worker: BrokerWorker | None = None
    if broker is not None:
        feed = RecorderFeed(broker, recorder)
        feed.start()
        if settings.run_worker:
            if not isinstance(executor, DiffusionExecutor):
                raise TypeError("run_worker needs the device executor, not a fake")
            worker = cluster_worker(settings, broker, executor, registry, files)
            worker.start()
    elif start_projector:
        # A job the previous process left queued or running can never finish now (in
        # cluster mode it is still in the broker's queue).
        stale = read_model.list_generations((GenerationState.QUEUED, GenerationState.RUNNING), 1000)
        if stale.items:
            log.warning(
                "marked %d interrupted generation(s) failed", fail_interrupted(store, stale.items)
            )
            # Serve only once the read models say so too: a client's first read after the
            # restart must not still see them running.
            projector.wait_for(store.max_position(), 30)
    return Container(
        settings=settings,
        commands=commands,
        queries=queries,
        store=store,
        read_model=read_model,
        projector=projector,
        files=files,
        recommender=recommender,
        models=registry,
        executor=executor,
        recorder=recorder,
        authenticator=authenticator,
        generations=jobs,
        tokens=tokens,
        middlewares=middlewares,
        broker=broker,
        feed=feed,
        worker=worker,
    )


# -- pieces the worker process (server/worker.py) builds the same way -------------------------


def connect_broker(settings: Settings, name: str) -> NatsBroker:
    return NatsBroker(
        settings.broker_url,
        namespace=settings.broker_namespace,
        lease_seconds=settings.job_lease_seconds,
        retention_seconds=settings.image_retention_hours * 3600,
        max_queue=settings.max_queue,
        name=name,
    )


def device_executor(
    settings: Settings, max_queue: int, images: ImageStore | None = None
) -> DiffusionExecutor:
    if any(model.compile for model in settings.models):
        use_cache_dir(settings.data_dir / "compile-cache")
    return DiffusionExecutor(
        max_queue=max_queue,
        max_batch=settings.max_batch,
        batch_wait=settings.batch_wait_ms / 1000,
        threads=cpu_threads(settings.torch_threads),
        device_budget_gb=settings.device_budget_gb,
        adapter_budget_gb=settings.adapter_budget_gb,
        mix_loras=settings.mixed_lora_batches,
        images=images,
    )


def cluster_worker(
    settings: Settings,
    broker: Broker,
    executor: DiffusionExecutor,
    models: ModelRegistry,
    files: LoraFiles,
) -> BrokerWorker:
    return BrokerWorker(
        broker,
        executor,
        models,
        files,
        name=settings.worker_name,
        lease_seconds=settings.job_lease_seconds,
        max_attempts=settings.job_max_attempts,
        max_batch=settings.max_batch,
        batch_wait=settings.batch_wait_ms / 1000,
    )
