"""The plan steps that store weights in another format or rewrite the graph.

int4 blocks, float16, k-means clusters and graph simplification: see passes/int4.py, fp16.py, cluster.py and
optimize.py.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field, model_validator

from onnx_ops._plan_config import FROZEN

__all__ = ["ClusterStep", "Fp16Step", "Int4Step", "OptimizeStep"]

_Int4Op = Literal["MatMul", "Gemm", "Gather"]
_INT4_OPS: tuple[_Int4Op, ...] = ("MatMul", "Gemm", "Gather")
_ClusterOp = Literal["MatMul", "Gemm", "Conv", "Gather"]
_CLUSTER_OPS: tuple[_ClusterOp, ...] = ("MatMul", "Gemm", "Conv", "Gather")


class Int4Step(BaseModel):
    """Weight-only 4-bit blocks for MatMul/Gemm and embedding weights with ONNX Runtime's MatMulNBitsQuantizer."""

    model_config = FROZEN

    kind: Literal["int4"] = "int4"
    method: Literal["rtn", "hqq", "gptq"] = Field(
        "rtn",
        description="rtn: round each block to the nearest of 16 levels (ONNX Runtime's C++ block quantizer, "
        "fast). hqq: half-quadratic optimization of scales and zero points (needs PyTorch installed). gptq: "
        "error-compensating rounding fitted on the user's calibration data. Embedding tables (Gather) are "
        "always rounded to nearest.",
    )
    block_size: int = Field(
        32,
        ge=16,
        le=256,
        description="Weights sharing one scale along the input dimension (a power of two): smaller blocks keep "
        "more accuracy, larger ones give a smaller file (32: about 5 bits a weight, 128: about 4.3).",
    )
    symmetric: bool = Field(
        False,
        description="One scale per block and no zero point (smaller, less accurate). HQQ is always asymmetric.",
    )
    accuracy_level: int = Field(
        4,
        ge=0,
        le=4,
        description="What ONNX Runtime's MatMulNBits computes in on CPU: 0 its default (float32), 1 fp32, 2 fp16, "
        "3 bf16, 4 int8 activations. Measured on an x86 CPU with VNNI (a 384x1536 weight, one thread): with 4, one "
        "row per call (token-by-token decoding) took 0.25-0.3 of float32's CPU time; 32-128 rows per call "
        "(encoders) took 1.3-1.5x float32's, and 1.1-1.5x with 0.",
    )
    op_types: list[_Int4Op] = Field(
        default_factory=lambda: list(_INT4_OPS),
        description="Node types whose constant weights get 4 bits: MatMul, Gemm (rewritten as MatMul + Add "
        "first: ONNX Runtime has no 4-bit Gemm) and Gather (embedding tables, as GatherBlockQuantized).",
    )
    exclude_nodes: list[str] = Field(default_factory=list, description="Names of nodes left in float.")
    min_elements: int = Field(4096, ge=0, description="Weights with fewer elements than this stay in float.")
    calibration_samples: int | None = Field(
        None, ge=1, description="gptq only: use at most this many calibration samples."
    )

    @model_validator(mode="after")
    def _check_block(self) -> Int4Step:
        if self.block_size & (self.block_size - 1):
            raise ValueError(f"block_size must be a power of two (16 to 256), got {self.block_size}")
        if not self.op_types:
            raise ValueError("op_types must name at least one of MatMul, Gemm, Gather")
        return self


class Fp16Step(BaseModel):
    """Float16 weights and compute through onnxruntime.transformers.float16, float32 inputs and outputs kept."""

    model_config = FROZEN

    kind: Literal["fp16"] = "fp16"
    exclude_op_types: list[str] = Field(
        default_factory=list,
        description="Operator types kept in float32, besides ONNX Runtime's own list of types without float16 "
        "support. On CPU float16 is a storage format: ONNX Runtime computes most operators in float32 behind "
        "inserted Casts, so the file halves and latency usually grows. bfloat16 is not offered: ONNX Runtime's "
        "CPU provider has no bfloat16 MatMul or Add.",
    )
    exclude_nodes: list[str] = Field(default_factory=list, description="Names of nodes kept in float32.")


class ClusterStep(BaseModel):
    """K-means weight clustering: each chosen weight becomes a codebook of 2^bits values and bits-bit indices."""

    model_config = FROZEN

    kind: Literal["cluster"] = "cluster"
    bits: int = Field(
        4,
        ge=2,
        le=8,
        description="Bits per weight index: each weight gets its own codebook of 2^bits float values, so its "
        "stored size is about bits/32 of float32 (4: 16 values, about 8x smaller).",
    )
    init: Literal["kmeans++", "quantile"] = Field(
        "kmeans++",
        description="Starting centroids: kmeans++ (spread out by squared distance on a sample of the weight, "
        "seeded) or quantile (evenly spaced quantiles of the weight, slower to converge at 8 bits).",
    )
    iterations: int = Field(
        20,
        ge=0,
        le=200,
        description="Most Lloyd iterations, each exact over every weight value (cheap: the values are sorted once).",
    )
    codebook: Literal["layer", "channel"] = Field(
        "layer",
        description="layer: one codebook per weight. channel: one per output channel (a Conv's output channels, a "
        "MatMul/Gemm's output columns, an embedding's hidden dimension), for layers whose channels differ in scale "
        "(mobile CNNs); costs 2^bits floats per channel (fewer where a channel has fewer distinct values) and an "
        "int32 offset, counted in the size.",
    )
    keep_zero: bool = Field(
        True,
        description="When at least 1% of a weight's values are exactly zero (a pruned weight), keep 0 as one of "
        "its centroids, so zeros stay exact zeros and the sparsity is kept.",
    )
    op_types: list[_ClusterOp] = Field(
        default_factory=lambda: list(_CLUSTER_OPS),
        description="Node types whose constant float32 weights are clustered (Gather: embedding tables).",
    )
    exclude_nodes: list[str] = Field(default_factory=list, description="Names of nodes left untouched.")
    min_elements: int = Field(4096, ge=0, description="Weights with fewer elements than this stay in float.")
    seed: int = Field(0, description="kmeans++ only: seed of the sampling.")

    @model_validator(mode="after")
    def _check_ops(self) -> ClusterStep:
        if not self.op_types:
            raise ValueError("op_types must name at least one of MatMul, Gemm, Conv, Gather")
        return self


class OptimizeStep(BaseModel):
    """Graph simplification with ONNX Runtime's basic optimizer, saved as a portable ONNX model."""

    model_config = FROZEN

    kind: Literal["optimize"] = "optimize"
    level: Literal["basic"] = Field(
        "basic",
        description="basic: ONNX Runtime's provider-independent rewrites (constant folding, Identity/Dropout "
        "and redundant node removal, BatchNormalization and Mul/Add folded into Conv, shared subexpressions); "
        "the result holds standard ONNX operators only. The extended and all levels write ONNX Runtime's "
        "fused CPU operators, which ONNX Runtime applies itself at load anyway, so they are not offered.",
    )
