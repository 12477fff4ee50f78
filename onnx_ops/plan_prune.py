"""The prune step: which MatMul, Gemm, Conv and recurrent weights go, and how (see passes/prune.py)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field, model_validator

from onnx_ops._plan_config import FROZEN

__all__ = ["PruneStep"]

_PruneOp = Literal["MatMul", "Gemm", "Conv", "LSTM", "GRU", "RNN"]
_PRUNE_OPS: tuple[_PruneOp, ...] = ("MatMul", "Gemm", "Conv", "LSTM", "GRU", "RNN")


class PruneStep(BaseModel):
    """Magnitude pruning of the weights of MatMul, Gemm, Conv and recurrent (LSTM/GRU/RNN) nodes."""

    model_config = FROZEN

    kind: Literal["prune"] = "prune"
    method: Literal["unstructured", "n:m", "structured"] = Field(
        "unstructured",
        description="unstructured: zero the smallest weights (smaller gzip size, not faster in ONNX Runtime). "
        "n:m: in every group of m consecutive weights along the input dimension keep the n largest. "
        "structured: remove whole output neurons/channels with the smallest norm and shrink the "
        "consumers, so the model really gets smaller and faster.",
    )
    sparsity: float = Field(
        0.5,
        ge=0.0,
        lt=1.0,
        description="unstructured: fraction of weights set to zero. structured: fraction of output "
        "neurons/channels removed from each prunable layer. Ignored by n:m (sparsity is 1 - n/m).",
    )
    scope: Literal["per_tensor", "global"] = Field(
        "per_tensor",
        description="unstructured only: one threshold per tensor, or one threshold over all selected tensors.",
    )
    channel_multiple: int = Field(
        16,
        ge=1,
        le=64,
        description="structured only: a Conv layer whose channel count is a multiple of this keeps a multiple of it "
        "(rounded to the nearest), so ONNX Runtime's blocked Conv kernels (8 or 16 channels at a time) still apply; "
        "a Conv of 16 channels is then left whole. 1: exactly floor(sparsity * channels) are removed.",
    )
    n: int = Field(2, ge=1, description="n:m only: weights kept in each group.")
    m: int = Field(4, ge=2, description="n:m only: group size along the input dimension.")
    norm: Literal["l1", "l2"] = Field("l2", description="structured only: norm used to rank neurons/channels.")
    op_types: list[_PruneOp] = Field(
        default_factory=lambda: list(_PRUNE_OPS),
        description="Node types whose weights are pruned (structured pruning handles MatMul, Gemm and Conv).",
    )
    exclude_nodes: list[str] = Field(default_factory=list, description="Names of nodes left untouched.")
    only_nodes: list[str] = Field(
        default_factory=list,
        description="Prune only the weights of these nodes (all eligible nodes when empty). Structured pruning "
        "still shrinks their consumers.",
    )
    min_elements: int = Field(256, ge=0, description="Weights with fewer elements than this are left untouched.")
    # Activation-aware masks (Wanda): what decides which weights go.
    criterion: Literal["magnitude", "activation"] = Field(
        "magnitude",
        description="unstructured and n:m: magnitude: remove the smallest |W| (no data needed). activation: "
        "remove the smallest |W| times the norm of the input each weight multiplies over the calibration data, "
        "compared within each output row (Wanda); needs calibration data. MatMul, Gemm and Conv weights get "
        "these scores, other weights are pruned by magnitude.",
    )
    positions: int = Field(
        256,
        ge=1,
        le=65536,
        description="activation only: Conv output positions sampled per calibration feed for the input norms.",
    )
    # Per-layer sparsity with the same overall fraction (see onnx_ops/passes/_prune_allocation.py).
    allocation: Literal["uniform", "owl", "measured"] = Field(
        "uniform",
        description="unstructured with criterion activation only. uniform: every layer loses `sparsity` of its "
        "weights. owl: layers with more activation outliers (scores above 5x their mean) lose fewer, those with "
        "fewer lose more. measured: per layer, its output error after a ridge refit of the kept weights at "
        "sparsities in steps of 0.05, times how much that layer moves the model's outputs (one model run over "
        "the calibration data per layer); the next 0.05 goes to the layer whose error grows slowest. Either way "
        "each layer stays within sparsity +- allocation_range and the weights pruned over those layers are "
        "`sparsity` of them (size-weighted); the step's log lists each layer's sparsity.",
    )
    allocation_range: float = Field(
        0.15, ge=0.0, le=0.45, description="owl and measured: how far a layer's sparsity may move from `sparsity`."
    )

    @model_validator(mode="after")
    def _check_pattern(self) -> PruneStep:
        if self.method == "n:m" and self.n >= self.m:
            raise ValueError(f"n:m pruning needs n < m, got n={self.n}, m={self.m}")
        if self.criterion == "activation" and self.method == "structured":
            raise ValueError("criterion 'activation' is for unstructured and n:m pruning; structured ranks by norm")
        if self.allocation != "uniform" and (self.method != "unstructured" or self.criterion != "activation"):
            raise ValueError("allocation owl or measured is for unstructured pruning with criterion 'activation'")
        if self.criterion == "activation" and self.scope == "global":
            raise ValueError("criterion 'activation' compares weights within each output row: use scope per_tensor")
        return self
