"""The distill step: label-free refit of pruned or factorized layers (see passes/distill.py)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field

from onnx_ops._plan_config import FROZEN

__all__ = ["DistillStep"]


class DistillStep(BaseModel):
    """Label-free recovery of pruned MatMul/Gemm/Conv layers: refit the kept weights to the original model's outputs.

    The original model (before the plan) is the teacher and the calibration data is the training set: for
    every pruned layer, the weights that pruning kept (and the bias) are refit by ridge least squares so the
    layer's output matches the teacher's; zeros stay zero, so the sparsity pattern (unstructured or N:M)
    is unchanged. After structured pruning, every MatMul/Gemm/Conv whose weight lost channels is refit the
    same way on the output channels it kept, so the removed channels' contribution is re-expressed by the
    ones that stay (the ridge term is then chosen by cross-validation over the calibration feeds).
    """

    model_config = FROZEN

    kind: Literal["distill"] = "distill"
    damping: float = Field(
        0.01,
        ge=0.0,
        le=10.0,
        description="Ridge term, relative to the mean of the diagonal of X^T X (the inputs' second moments), "
        "pulling the refit weights towards the pruned ones: larger trusts the calibration data less.",
    )
    sequential: bool = Field(
        True,
        description="Refit each layer on the inputs the partly recovered model itself produces (upstream "
        "layers already refit), so errors do not pile up; false: one pass on the pruned model's inputs.",
    )
    min_elements: int = Field(256, ge=0, description="Weights with fewer elements than this are left untouched.")
    exclude_nodes: list[str] = Field(default_factory=list, description="Names of nodes left untouched.")
    positions: int = Field(
        256,
        ge=1,
        le=65536,
        description="Conv layers: output positions sampled per calibration feed (each gives one row of "
        "im2col patches); bounds the capture's memory and time whatever the image size.",
    )
    block_steps: int = Field(
        200,
        ge=0,
        le=100000,
        description="Transformer FFN blocks (MatMul + bias, GELU, MatMul + bias) whose layers were refit: "
        "gradient steps that tune both layers together to the original block's output after the layer-wise "
        "refit, kept only where they predict held-out calibration feeds better; 0: no block-wise refinement.",
    )
    downstream: bool = Field(
        False,
        description="Also refit the layers the plan left unchanged but that read a changed layer's output, "
        "sequentially on the student's own inputs, so they absorb the error upstream left (each kept only "
        "where it predicts held-out calibration feeds better).",
    )
    residual: bool = Field(
        False,
        description="Fit a layer whose output is added to another activation (a transformer's residual "
        "stream) to the original model's sum minus the student's other addend, so it also makes up for "
        "the error already in that stream.",
    )
    rows: Literal["real", "all"] = Field(
        "real",
        description="Transformers with an attention mask: real: fit on the real tokens' rows only (padded "
        "positions' outputs are ignored by the model's user); all: on every position, padded ones too, so "
        "the token-level output matches the original model's everywhere.",
    )
