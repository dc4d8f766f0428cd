"""Commands and their handlers; the names of the seed API are kept."""

from server.application.commands.base import (
    CommandBus,
    CommandResult,
    HandlerAlreadyRegisteredError,
    ICommand,
    ICommandHandler,
    IStreamCommand,
    IStreamCommandHandler,
)
from server.application.commands.generation import (
    CancelGenerationCommand,
    GenerateImageCommand,
    GenerationRequest,
    LoraChoice,
    QuickGenerateCommand,
    SubmitGenerationCommand,
)
from server.application.commands.import_catalog import (
    CatalogRecordInput,
    ImportCatalogResult,
    ImportLoRACatalogCommand,
    ImportLoRACatalogHandler,
    RecordError,
)
from server.application.commands.import_loras import (
    ImportFileResult,
    ImportLoRAsCommand,
    ImportLoRAsHandler,
    ImportOutcome,
    ImportTotals,
    ImportUpdate,
)
from server.application.commands.recommend import (
    FilterConfidentRecommendationsCommand,
    FilterConfidentRecommendationsHandler,
    LoRARecommendation,
    RecommendationSet,
    Recommender,
    RecommendLoRAsCommand,
    RecommendLoRAsHandler,
    RecommendTopLoRACommand,
    RecommendTopLoRAHandler,
    TopRecommendation,
)
from server.application.commands.record_generation import (
    RecordGenerationCommand,
    RecordGenerationHandler,
)
from server.application.commands.register_lora import (
    RegisterLoRACommand,
    RegisterLoRAHandler,
    RegisterLoRAResult,
)
from server.application.commands.update_lora import (
    DeleteLoRACommand,
    DeleteLoRAHandler,
    UpdateLoRACommand,
    UpdateLoRAHandler,
)
from server.application.generation.request import ControlChoice, HiresRequest, ImageInput

__all__ = [
    "CancelGenerationCommand",
    "CatalogRecordInput",
    "CommandBus",
    "CommandResult",
    "ControlChoice",
    "DeleteLoRACommand",
    "DeleteLoRAHandler",
    "FilterConfidentRecommendationsCommand",
    "FilterConfidentRecommendationsHandler",
    "GenerateImageCommand",
    "GenerationRequest",
    "HandlerAlreadyRegisteredError",
    "HiresRequest",
    "ICommand",
    "ICommandHandler",
    "IStreamCommand",
    "IStreamCommandHandler",
    "ImageInput",
    "ImportCatalogResult",
    "ImportFileResult",
    "ImportLoRACatalogCommand",
    "ImportLoRACatalogHandler",
    "ImportLoRAsCommand",
    "ImportLoRAsHandler",
    "ImportOutcome",
    "ImportTotals",
    "ImportUpdate",
    "LoRARecommendation",
    "LoraChoice",
    "QuickGenerateCommand",
    "RecommendLoRAsCommand",
    "RecommendLoRAsHandler",
    "RecommendTopLoRACommand",
    "RecommendTopLoRAHandler",
    "RecommendationSet",
    "Recommender",
    "RecordError",
    "RecordGenerationCommand",
    "RecordGenerationHandler",
    "RegisterLoRACommand",
    "RegisterLoRAHandler",
    "RegisterLoRAResult",
    "SubmitGenerationCommand",
    "TopRecommendation",
    "UpdateLoRACommand",
    "UpdateLoRAHandler",
]
