"""Recommendations through the real server, the client and the CLI."""

from __future__ import annotations

import json

import pytest

from client import InvalidArgument, LoracleClient, NotFound
from client.cli import main
from server.devtools.local_server import RunningServer


@pytest.fixture(scope="module")
def imported(server: RunningServer) -> str:
    with LoracleClient(server.address) as client:
        token = list(client.import_loras())[-1].consistency_token
        # Recommendations read the index the projector keeps; a query with the import's
        # token returns once the projection (and so the index) has caught up.
        client.list_loras(consistency_token=token)
        return token


def test_recommend_top_and_filter(server: RunningServer, imported: str) -> None:
    with LoracleClient(server.address) as client:
        response = client.recommend_loras(
            "masterpiece, best quality, a castle at dusk, wtrcolor style, soft colors",
            "SD 1.5",
            max_loras=3,
        )
        assert response.recommendation_id
        top = response.recommendations[0]
        assert top.lora.name == "Watercolor Style"
        assert 0.0 < top.confidence <= 1.0
        assert "wtrcolor style" in top.trigger_words
        assert top.weight > 0
        assert any("wtrcolor style" in reason for reason in top.reasons)
        assert all(r.lora.base_model.lineage != "sdxl_base_v1-0" for r in response.recommendations)

        kept = client.filter_confident_recommendations(response.recommendation_id, top.confidence)
        assert [r.lora.id for r in kept.recommendations][:1] == [top.lora.id]
        assert all(r.confidence >= top.confidence for r in kept.recommendations)
        with pytest.raises(NotFound):
            client.filter_confident_recommendations("00000000-0000-0000-0000-000000000000", 0.5)

        best = client.recommend_top_lora("cyberpunk city, neon lights, rain", "SDXL")
        assert best.recommendation.lora.name == "Cyberpunk City XL"
        none = client.recommend_top_lora("cyberpunk city, neon lights", "SDXL", min_confidence=1.0)
        assert not none.HasField("recommendation")
        assert none.none_reason

        with pytest.raises(InvalidArgument) as bad:
            client.recommend_loras("", "SD 1.5")
        assert bad.value.field_violations[0][0] == "prompt"


def test_recommendations_are_recorded_events(server: RunningServer, imported: str) -> None:
    with LoracleClient(server.address) as client:
        response = client.recommend_loras("pixel art, a knight", "SD 1.5", request_id="rec-1")
        again = client.recommend_loras("pixel art, a knight", "SD 1.5", request_id="rec-1")
        assert again.recommendation_id == response.recommendation_id
        events = list(
            client.iter_events(type="RecommendationMade", consistency_token=again.consistency_token)
        )
        assert [e.aggregate_id for e in events].count(response.recommendation_id) == 1
        data = json.loads(events[-1].data_json)
        assert data["prompt"] == "pixel art, a knight"


def test_search(server: RunningServer, imported: str) -> None:
    with LoracleClient(server.address) as client:
        results = client.search_loras("anime girl with blue hair, twin tails")
        assert results.results[0].lora.name.startswith("Aiko")
        page = client.search_loras("style", page_size=1)
        assert len(page.results) == 1
        if page.next_page_token:
            second = client.search_loras("style", page_size=1, page_token=page.next_page_token)
            assert second.results[0].lora.id != page.results[0].lora.id


def test_cli_recommend(
    server: RunningServer, imported: str, capsys: pytest.CaptureFixture[str]
) -> None:
    args = [
        "--server",
        server.address,
        "recommend",
        "pixel art, a knight on a horse",
        "--base-model",
        "SD 1.5",
    ]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "Pixel Art" in out
    assert "confidence" in out
    assert main(["--server", server.address, "--json", *args[2:]]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["recommendations"][0]["lora"]["name"] == "Pixel Art"
