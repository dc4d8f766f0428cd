"""Runs every Python block of docs/buses.md: the seed's examples, import root changed only."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from server.application.commands import ImportLoRACatalogCommand, LoRARecommendation
from server.application.commands.import_catalog import CatalogRecordInput
from server.application.context import DispatchContext
from server.bootstrap import Container
from server.domain.models import LoraView

DOC = Path(__file__).resolve().parents[2] / "docs" / "buses.md"
BLOCKS = re.findall(r"```python\n(.*?)```", DOC.read_text(), flags=re.S)


class FakeRecommender:
    """Recommends every SDXL LoRA it was given, with fixed confidences."""

    def __init__(self, loras: list[LoraView]) -> None:
        self.loras = loras
        self.calls: list[tuple[str, str]] = []

    def recommend(
        self,
        prompt: str,
        base_model: str,
        *,
        max_loras: int,
        min_confidence: float | None,
        include_unavailable: bool,
    ) -> list[LoRARecommendation]:
        self.calls.append((prompt, base_model))
        recs = [LoRARecommendation(v, 0.9 - 0.1 * i, 0.8) for i, v in enumerate(self.loras)]
        return [r for r in recs if min_confidence is None or r.confidence >= min_confidence][
            :max_loras
        ]


def test_doc_has_the_seed_examples() -> None:
    assert len(BLOCKS) == 4
    joined = "\n".join(BLOCKS)
    for name in (
        "RecommendLoRAsCommand",
        "RecommendLoRAsHandler",
        "GetAllLoRAsQuery",
        "GetAllLoRAsHandler",
        "RecommendTopLoRACommand",
        "GetLoRAsByBaseModelQuery",
    ):
        assert name in joined


@pytest.mark.parametrize("block", BLOCKS, ids=[f"block{i}" for i in range(len(BLOCKS))])
def test_example_runs(
    block: str, memory_container: Container, capsys: pytest.CaptureFixture[str]
) -> None:
    records = tuple(
        CatalogRecordInput(source_id=f"test:{i}", name=name, base_model=base)
        for i, (name, base) in enumerate(
            [("Anime Lines", "SDXL 1.0"), ("Sword Art", "Pony"), ("Old Film", "SD 1.5")]
        )
    )
    position = memory_container.commands.dispatch(
        ImportLoRACatalogCommand(records=records), DispatchContext(request_id="seed")
    ).position
    memory_container.projector.wait_for(position, 5)
    sdxl = [
        v
        for v in memory_container.read_model.all_views()
        if v.metadata.base_model.architecture.value == "SDXL"
    ]
    uses_recommender = "Recommend" in block
    service: object = FakeRecommender(sdxl) if uses_recommender else memory_container.read_model
    exec(compile(block, str(DOC), "exec"), {"lora_service": service})
    out = capsys.readouterr().out
    if "GetAllLoRAsQuery" in block:
        assert out.strip() == "Found 3 LoRAs"
    elif "GetLoRAsByBaseModelQuery" in block:
        assert sorted(out.split("\n")[:-1]) == ["Anime Lines SDXL", "Sword Art SDXL"]
    elif "RecommendTopLoRACommand" in block:
        assert out.strip() == "Top LoRA: Anime Lines (0.90)"
    else:
        assert out.strip() == "Found 2 LoRAs"
        assert isinstance(service, FakeRecommender)
        assert service.calls == [("anime girl with sword", "SDXL")]
