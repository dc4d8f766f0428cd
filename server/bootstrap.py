"""The composition root: the only module that wires infrastructure to the application.
Tests pass their own pieces by keyword; everything else gets the real thing."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

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
from server.application.commands.generate import GenerateImageHandler
from server.application.commands.generation import GenerateImageCommand
from server.application.middleware import Authorizer, Middleware, default_middlewares
from server.application.ports import LoraFiles
from server.application.queries import (
    GetAllLoRAsHandler,
    GetAllLoRAsQuery,
    GetLoRAByIdHandler,
    GetLoRAByIdQuery,
    GetLoRAsByBaseModelHandler,
    GetLoRAsByBaseModelQuery,
    ListBaseModelsHandler,
    ListBaseModelsQuery,
    ListEventsHandler,
    ListEventsQuery,
    QueryBus,
    SearchLoRAsByPromptHandler,
    SearchLoRAsByPromptQuery,
)
from server.config import Settings
from server.domain.recommend.engine import RecommendationEngine
from server.infrastructure.diffusion.executor import DiffusionExecutor, make_job
from server.infrastructure.diffusion.registry import ModelRegistry
from server.infrastructure.event_store import EventStore
from server.infrastructure.lora_files import LoraFileReader
from server.infrastructure.projector import Projector
from server.infrastructure.read_model import ProjectedChange, SqlReadModel
from server.infrastructure.recommender import CatalogRecommender
from server.infrastructure.storage_url import StorageUrl

log = logging.getLogger("loracle")


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
    executor: DiffusionExecutor
    middlewares: list[Middleware] = field(default_factory=list)

    def close(self) -> None:
        self.executor.stop()
        self.models.close()
        self.projector.stop()
        self.read_model.close()
        self.store.close()


def bootstrap(
    settings: Settings,
    *,
    files: LoraFiles | None = None,
    authorizer: Authorizer | None = None,
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
    read_model = SqlReadModel(url)
    projector = Projector(store, read_model)
    middlewares = default_middlewares(authorizer)
    queries = QueryBus(middlewares, consistency=projector)

    recommender = CatalogRecommender(RecommendationEngine(), read_model)

    def invalidate(change: ProjectedChange) -> None:
        topics = {"events"} if change.audit else set()
        if change.upserts or change.deletes:
            topics.add("loras")
        if change.history:
            topics.add("history")
        queries.invalidate(topics)

    # The index must see a batch before the cache forgets the old answers.
    projector.on_change(recommender.on_change)
    projector.on_change(invalidate)
    if settings.rebuild_projections:
        log.info("rebuilt read models up to position %d", projector.rebuild())

    commands = CommandBus(middlewares)
    commands.register(RegisterLoRACommand, RegisterLoRAHandler(files, store, read_model, projector))
    commands.register(ImportLoRAsCommand, ImportLoRAsHandler(files, store, read_model, projector))
    commands.register(ImportLoRACatalogCommand, ImportLoRACatalogHandler(store))
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
    queries.register(SearchLoRAsByPromptQuery, SearchLoRAsByPromptHandler(recommender))
    models = ModelRegistry(settings.models, data_dir=settings.data_dir.resolve())
    queries.register(ListBaseModelsQuery, ListBaseModelsHandler(models))
    if build_embedded_model and settings.embedded_model:
        models.ensure_embedded()
    executor = DiffusionExecutor(max_queue=settings.max_queue)
    commands.register(GenerateImageCommand, GenerateImageHandler(models, executor, make_job))
    executor.start()

    if start_projector:
        projector.catch_up()
    # Loaded after the catch-up and before the projector thread runs, so no batch is missed
    # or applied twice.
    recommender.load()
    if start_projector:
        projector.start()
    return Container(
        settings=settings,
        commands=commands,
        queries=queries,
        store=store,
        read_model=read_model,
        projector=projector,
        files=files,
        recommender=recommender,
        models=models,
        executor=executor,
        middlewares=middlewares,
    )
