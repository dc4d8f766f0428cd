"""The re-ranker: logistic regression over retrieval features. Its coefficients are fitted on
the dev split by `bench/train_ranker.py` and shipped as data; its output is the confidence."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from importlib import resources

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
)


@dataclass(frozen=True)
class Ranker:
    coefficients: FloatArray
    intercept: float
    mean: FloatArray
    scale: FloatArray
    # Isotonic map from the model's probability to the observed hit rate of the top
    # recommendations (what users see); empty for the identity.
    calibration_x: FloatArray = field(default_factory=lambda: np.zeros(0))
    calibration_y: FloatArray = field(default_factory=lambda: np.zeros(0))

    @staticmethod
    def default() -> Ranker:
        path = resources.files("server.domain.recommend").joinpath("ranker.json")
        return Ranker.from_json(path.read_text())

    @staticmethod
    def neutral() -> Ranker:
        """Scores every candidate 0.5: for computing features before a fit exists."""
        n = len(FEATURES)
        return Ranker(np.zeros(n), 0.0, np.zeros(n), np.ones(n))

    @staticmethod
    def from_json(text: str) -> Ranker:
        data = json.loads(text)
        if list(data["features"]) != list(FEATURES):
            raise ValueError("ranker.json was fitted on other features; refit it")
        return Ranker(
            np.array(data["coefficients"], dtype=float),
            float(data["intercept"]),
            np.array(data["mean"], dtype=float),
            np.array(data["scale"], dtype=float),
            np.array(data.get("calibration_x", []), dtype=float),
            np.array(data.get("calibration_y", []), dtype=float),
        )

    def to_json(self, **extra: object) -> str:
        return json.dumps(
            {
                "features": list(FEATURES),
                "coefficients": self.coefficients.round(6).tolist(),
                "intercept": round(self.intercept, 6),
                "mean": self.mean.round(6).tolist(),
                "scale": self.scale.round(6).tolist(),
                "calibration_x": self.calibration_x.round(6).tolist(),
                "calibration_y": self.calibration_y.round(6).tolist(),
                **extra,
            },
            indent=1,
        )

    def predict(self, matrix: FloatArray) -> FloatArray:
        scale = np.where(self.scale > 0, self.scale, 1.0)
        z = ((matrix - self.mean) / scale) @ self.coefficients + self.intercept
        raw = 1.0 / (1.0 + np.exp(-np.clip(z, -30, 30)))
        if len(self.calibration_x) == 0:
            return raw
        return np.interp(raw, self.calibration_x, self.calibration_y)

    def with_calibration(self, x: FloatArray, y: FloatArray) -> Ranker:
        return Ranker(self.coefficients, self.intercept, self.mean, self.scale, x, y)

    def raw(self) -> Ranker:
        return Ranker(self.coefficients, self.intercept, self.mean, self.scale)
