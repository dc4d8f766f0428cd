"""The re-ranker: logistic regression over retrieval features, one model for prompts that
contain a specific trigger phrase and one for prompts that do not (users who do not know the
LoRA yet). Both are fitted on the dev split by `bench/train_ranker.py` and shipped as data;
their calibrated output is the confidence."""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from importlib import resources
from typing import Any

import numpy as np

from server.domain.recommend.index import FloatArray

FEATURES = (
    "bm25_all",
    "bm25_name",
    "bm25_file",
    "bm25_trigger",
    "bm25_tags",
    "bm25_description",
    "bm25_history",
    "trigger_idf",
    "trigger_fraction",
    "has_triggers",
    "name_coverage",
    "log_downloads",
    "relative_score",
    "inverse_rank",
    "query_history_max",
    "query_trigger_phrases",
    "trigger_specificity",
    "query_trigger_specificity",
    "tag_coverage",
    "query_coverage",
    "relative_name",
    "relative_tags",
    "relative_description",
    "relative_history",
    "log_length",
    "type_style",
    "type_character",
    "type_celebrity",
    "type_clothing",
    "type_concept",
    "query_terms",
    "query_best_score",
)


# Certainty (1.0) is for LoRAs the prompt names with <lora:...>; a calibration bin where every
# dev recommendation was right still says less.
MAX_CONFIDENCE = 0.99


@dataclass(frozen=True)
class LinearModel:
    coefficients: FloatArray
    intercept: float
    mean: FloatArray
    scale: FloatArray
    # Isotonic map from the model's probability to the observed hit rate of the top
    # recommendations (what users see); empty for the identity.
    calibration_x: FloatArray = field(default_factory=lambda: np.zeros(0))
    calibration_y: FloatArray = field(default_factory=lambda: np.zeros(0))
    # Weight of the first-stage order, added as rank_prior * log(1 / rank) to the model's
    # log-odds: 0 trusts the model alone; large values keep the retriever's order. Chosen by
    # the training script where the model alone would rank worse than the retriever.
    rank_prior: float = 0.0

    @staticmethod
    def neutral() -> LinearModel:
        n = len(FEATURES)
        return LinearModel(np.zeros(n), 0.0, np.zeros(n), np.ones(n))

    @staticmethod
    def from_dict(data: dict[str, Any]) -> LinearModel:
        return LinearModel(
            np.array(data["coefficients"], dtype=float),
            float(data["intercept"]),
            np.array(data["mean"], dtype=float),
            np.array(data["scale"], dtype=float),
            np.array(data.get("calibration_x", []), dtype=float),
            np.array(data.get("calibration_y", []), dtype=float),
            float(data.get("rank_prior", 0.0)),
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "coefficients": self.coefficients.round(6).tolist(),
            "intercept": round(self.intercept, 6),
            "mean": self.mean.round(6).tolist(),
            "scale": self.scale.round(6).tolist(),
            "rank_prior": round(self.rank_prior, 6),
            "calibration_x": self.calibration_x.round(6).tolist(),
            "calibration_y": self.calibration_y.round(6).tolist(),
        }

    def raw(self, matrix: FloatArray) -> FloatArray:
        """The uncalibrated probability."""
        scale = np.where(self.scale > 0, self.scale, 1.0)
        z = ((matrix - self.mean) / scale) @ self.coefficients + self.intercept
        if self.rank_prior:
            z = z + self.rank_prior * np.log(np.maximum(matrix[:, _INVERSE_RANK], 1e-9))
        return 1.0 / (1.0 + np.exp(-np.clip(z, -30, 30)))

    def predict(self, matrix: FloatArray) -> FloatArray:
        raw = self.raw(matrix)
        if len(self.calibration_x) == 0:
            return raw
        calibrated = np.interp(raw, self.calibration_x, self.calibration_y)
        return np.minimum(calibrated, MAX_CONFIDENCE)

    def with_calibration(self, x: FloatArray, y: FloatArray) -> LinearModel:
        return replace(self, calibration_x=x, calibration_y=y)


@dataclass(frozen=True)
class Ranker:
    """Picks the model by the prompt's most specific trigger phrase (a query-level feature,
    the same in every row): at or above `threshold` the trigger model, else the plain one."""

    trigger: LinearModel
    plain: LinearModel
    threshold: float

    @staticmethod
    def default() -> Ranker:
        path = resources.files("server.domain.recommend").joinpath("ranker.json")
        return Ranker.from_json(path.read_text())

    @staticmethod
    def neutral() -> Ranker:
        """Scores every candidate 0.5, so the first-stage order stands: for computing
        features before a fit exists, and as the retriever-only baseline."""
        return Ranker(LinearModel.neutral(), LinearModel.neutral(), 0.0)

    @staticmethod
    def from_json(text: str) -> Ranker:
        data = json.loads(text)
        if list(data["features"]) != list(FEATURES):
            raise ValueError("ranker.json was fitted on other features; refit it")
        return Ranker(
            LinearModel.from_dict(data["trigger"]),
            LinearModel.from_dict(data["plain"]),
            float(data["threshold"]),
        )

    def to_json(self, **extra: object) -> str:
        return json.dumps(
            {
                "features": list(FEATURES),
                "threshold": round(self.threshold, 6),
                "trigger": self.trigger.to_dict(),
                "plain": self.plain.to_dict(),
                **extra,
            },
            indent=1,
        )

    def has_trigger(self, matrix: FloatArray) -> bool:
        return len(matrix) > 0 and float(matrix[0, _QUERY_SPECIFICITY]) >= self.threshold

    def model_for(self, matrix: FloatArray) -> LinearModel:
        return self.trigger if self.has_trigger(matrix) else self.plain

    def predict(self, matrix: FloatArray) -> FloatArray:
        return self.model_for(matrix).predict(matrix)


_INVERSE_RANK = FEATURES.index("inverse_rank")
_QUERY_SPECIFICITY = FEATURES.index("query_trigger_specificity")
