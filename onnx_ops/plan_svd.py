"""The svd step: low-rank factorization of constant MatMul/Gemm weights (see passes/svd.py)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field, model_validator

from onnx_ops._plan_config import FROZEN

__all__ = ["SvdStep"]

_SVD_OPS: tuple[Literal["MatMul", "Gemm"], ...] = ("MatMul", "Gemm")


class SvdStep(BaseModel):
    """Low-rank factorization of constant MatMul/Gemm weights: W[K,N] ~ A[K,r] @ B[r,N]."""

    model_config = FROZEN

    kind: Literal["svd"] = "svd"
    rank: int | None = Field(None, ge=1, description="Keep exactly this rank (capped by the matrix).")
    rank_ratio: float | None = Field(
        None, gt=0.0, le=1.0, description="Keep this fraction of min(K, N) singular values."
    )
    energy: float | None = Field(
        None,
        gt=0.0,
        le=1.0,
        description="Keep the smallest rank whose singular values hold this fraction of the squared "
        "Frobenius norm (default 0.99 when neither rank nor rank_ratio is given).",
    )
    max_rel_error: float | None = Field(
        None, gt=0.0, description="Skip matrices whose relative reconstruction error would exceed this."
    )
    op_types: list[Literal["MatMul", "Gemm"]] = Field(default_factory=lambda: list(_SVD_OPS))
    exclude_nodes: list[str] = Field(default_factory=list, description="Names of nodes left untouched.")
    min_elements: int = Field(4096, ge=0, description="Matrices with fewer elements are left untouched.")
    algorithm: Literal["auto", "exact", "randomized"] = Field(
        "auto",
        description="auto: eigen-decomposition of the smaller Gram matrix (W^T W or W W^T) in float64: exact "
        "energies at a fraction of a full SVD's cost. exact: LAPACK's SVD. randomized: a truncated randomized SVD.",
    )
    # Rank rules and options of activation-aware factorization (svd-aware).
    param_ratio: float | None = Field(
        None,
        gt=0.0,
        lt=1.0,
        description="Rank rule over all eligible matrices together: keep this fraction of their parameters, "
        "spending rank where it removes the most error per parameter (relative weight energy; with "
        "activation_aware, each layer's output error weighted by its measured effect on the model's outputs). "
        "Matrices not worth factorizing stay whole and count in full.",
    )
    activation_aware: bool = Field(
        False,
        description="Factorize for the layer's outputs on the calibration data instead of its weights: whiten by "
        "the inputs' covariance before truncating, then refit the second factor and the bias by least squares to "
        "the original model's layer outputs. Needs calibration data; handles MatMul(x, W) and Gemm without "
        "transA (bias: Gemm's constant C, or a constant Add after the MatMul).",
    )
    max_output_error: float | None = Field(
        None,
        gt=0.0,
        description="activation_aware only, rank rule: per layer, the smallest rank whose added relative output "
        "error on the calibration inputs (||dY|| / ||Y||) is at most this (default 0.1 when activation_aware and "
        "no other rank rule is given). energy, when given with activation_aware, applies to the whitened spectrum.",
    )
    damping: float = Field(
        0.01,
        ge=0.0,
        le=10.0,
        description="activation_aware only: ridge term, relative to the mean input variance, that pulls the fit "
        "towards the original weight in directions the calibration data barely excites (0: exact fit to the "
        "calibration inputs).",
    )
    sequential: bool = Field(
        False,
        description="activation_aware only: fit layers in graph order on the inputs the already factorized "
        "layers upstream produce, so errors do not pile up (one capture per level of the graph).",
    )
    block_steps: int = Field(
        0,
        ge=0,
        le=100000,
        description="activation_aware only: transformer FFN blocks (both layers factorized, GELU between): "
        "gradient steps that tune the four factors and two biases together to the original block's output, "
        "on the inputs the factorized model produces; kept only where held-out calibration feeds improve "
        "(needs at least 4 feeds). 0: off.",
    )

    @model_validator(mode="after")
    def _one_rank_rule(self) -> SvdStep:
        rules = ("rank", "rank_ratio", "energy", "param_ratio", "max_output_error")
        given = [k for k in rules if getattr(self, k) is not None]
        if len(given) > 1:
            raise ValueError(f"give only one of {', '.join(rules)} (got {', '.join(given)})")
        if self.max_output_error is not None and not self.activation_aware:
            raise ValueError("max_output_error needs activation_aware: true (it is measured on calibration data)")
        return self

    @property
    def effective_energy(self) -> float | None:
        """The energy threshold in force (0.99 when no rank rule was given and the step is not activation-aware)."""
        rules = (self.rank, self.rank_ratio, self.energy, self.param_ratio, self.max_output_error)
        if all(rule is None for rule in rules) and not self.activation_aware:
            return 0.99
        return self.energy

    @property
    def effective_output_error(self) -> float | None:
        """The per-layer output error budget in force (0.1 when activation-aware with no rank rule given)."""
        rules = (self.rank, self.rank_ratio, self.energy, self.param_ratio, self.max_output_error)
        if self.activation_aware and all(rule is None for rule in rules):
            return 0.1
        return self.max_output_error
