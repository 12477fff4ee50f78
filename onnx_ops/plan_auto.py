"""The auto step (search for the compression within an accuracy budget) and how a report is measured."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field, model_validator

from onnx_ops._plan_config import FROZEN

__all__ = ["AutoStep", "EvaluationOptions"]

_AutoFamily = Literal["quantize", "prune", "svd", "optimize", "cluster", "int4", "fp16"]
_AUTO_FAMILIES: tuple[_AutoFamily, ...] = ("quantize", "prune", "svd", "optimize", "cluster", "int4", "fp16")


class AutoStep(BaseModel):
    """Search for the compression that meets an accuracy budget, measuring every candidate with ONNX Runtime."""

    model_config = FROZEN

    kind: Literal["auto"] = "auto"
    budget: Literal["cosine", "accuracy"] = Field(
        "cosine",
        description="What must be kept. cosine: the output cosine similarity to the original model (no labels "
        "needed). accuracy: task accuracy on labelled evaluation data (an evaluation file with 'labels').",
    )
    min_cosine: float = Field(
        0.99, gt=0.0, le=1.0, description="cosine only: worst output cosine similarity allowed (1 is identical)."
    )
    max_accuracy_drop: float = Field(
        1.0, ge=0.0, le=100.0, description="accuracy only: largest drop of task accuracy allowed, in points."
    )
    goal: Literal["fastest", "smallest", "balanced"] = Field(
        "balanced",
        description="Which model to prefer among those within budget. balanced: the smallest that is not "
        "measurably slower than the original (ties within timing noise are ties). fastest: the lowest latency "
        "among those measurably faster. smallest: the fewest bytes, never a measurably slower model unless "
        "allow_slower. Speed is the CPU-time ratio of interleaved runs on one thread, with its 95% interval.",
    )
    size_weight: float = Field(
        0.5,
        ge=0.0,
        le=1.0,
        description="balanced only: ignored since report schema 1.2 (balanced prefers the smallest model that is "
        "not measurably slower); kept so that older plans still validate.",
    )
    allow_slower: bool = Field(
        False, description="smallest only: may return a model measurably slower than the original."
    )
    families: list[_AutoFamily] = Field(
        default_factory=lambda: list(_AUTO_FAMILIES),
        description="Pass families the search may use: int8 quantization (settings, and layers left in float "
        "by sensitivity; static settings only when calibration data is given), structured pruning and SVD of "
        "the least sensitive layers; graph simplification before the best plan; and, except for goal fastest, "
        "k-means clusters (decoded at load, as fast as float), int4 for MatMul/Gemm weights and fp16.",
    )
    time_budget_s: int = Field(
        300,
        ge=5,
        le=3600,
        description="Wall-clock seconds the search may take (the final measurement comes after; a service job's "
        "own timeout still applies). Each phase gets a share of the time left when it begins, and a candidate "
        "starts only when the time the same kind of work took earlier fits; the report lists the phases cut "
        "short or skipped for lack of time.",
    )
    max_candidates: int = Field(40, ge=1, le=500, description="Most candidate plans measured.")

    @model_validator(mode="after")
    def _some_family(self) -> AutoStep:
        if not self.families:
            raise ValueError(f"families must name at least one of {', '.join(_AUTO_FAMILIES)}")
        return self

    @property
    def budget_text(self) -> str:
        """The budget in words, e.g. "output cosine >= 0.99"."""
        if self.budget == "accuracy":
            return f"task accuracy drop <= {self.max_accuracy_drop:g} points"
        return f"output cosine >= {self.min_cosine:g}"


class EvaluationOptions(BaseModel):
    """How the before/after report is measured."""

    model_config = FROZEN

    latency_runs: int = Field(
        50, ge=1, le=10_000, description="Least interleaved pairs timed (each model runs once per pair)."
    )
    warmup_runs: int = Field(5, ge=0, le=1000, description="Untimed runs per model before timing.")
    latency_seconds: float = Field(
        10.0,
        ge=0.0,
        le=600.0,
        description="Timing goes on past latency_runs pairs, up to this many seconds, until the 95% interval of "
        "the time ratio is within 10% (see README: how latency is measured).",
    )
    threads: int = Field(
        0, ge=0, le=256, description="ONNX Runtime intra-op threads for latency (0: ONNX Runtime's default)."
    )
    max_samples: int = Field(256, ge=1, description="Use at most this many evaluation samples.")
    synthetic_samples: int = Field(
        16, ge=1, le=1024, description="Samples synthesized when no evaluation or calibration data is given."
    )
    seed: int = Field(0, description="Seed for synthesized inputs.")
