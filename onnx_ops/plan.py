"""The compression plan: an ordered list of steps, one schema for the library, the CLI and the service.

A plan is JSON such as::

    {"steps": [
      {"kind": "prune", "method": "unstructured", "sparsity": 0.5},
      {"kind": "svd", "energy": 0.99},
      {"kind": "quantize", "mode": "static", "format": "qdq", "per_channel": true}
    ]}

``onnx-compress plan-schema`` prints the full JSON schema with every field's description.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from onnx_ops.plan_formats import ClusterStep, Fp16Step, Int4Step, OptimizeStep

__all__ = [
    "DEFAULT_PLAN",
    "FINAL_KINDS",
    "LOSSLESS_KINDS",
    "AutoStep",
    "ClusterStep",
    "DistillStep",
    "EvaluationOptions",
    "Fp16Step",
    "Int4Step",
    "OptimizeStep",
    "Plan",
    "PruneStep",
    "QuantizeStep",
    "Step",
    "SvdStep",
]

_FROZEN = ConfigDict(frozen=True, extra="forbid")
_PruneOp = Literal["MatMul", "Gemm", "Conv", "LSTM", "GRU", "RNN"]
_PRUNE_OPS: tuple[_PruneOp, ...] = ("MatMul", "Gemm", "Conv", "LSTM", "GRU", "RNN")
_SVD_OPS: tuple[Literal["MatMul", "Gemm"], ...] = ("MatMul", "Gemm")
# Steps that leave weights in a format the other passes cannot read: one of them per plan, as its last step.
FINAL_KINDS = ("quantize", "int4", "fp16", "cluster")
# Steps exact up to float round-off: distill's teacher is the model after the plan's leading ones (see teacher.py).
LOSSLESS_KINDS = ("optimize",)
_AutoFamily = Literal["quantize", "prune", "svd", "optimize", "cluster", "int4", "fp16"]
_AUTO_FAMILIES: tuple[_AutoFamily, ...] = ("quantize", "prune", "svd", "optimize", "cluster", "int4", "fp16")


class PruneStep(BaseModel):
    """Magnitude pruning of the weights of MatMul, Gemm, Conv and recurrent (LSTM/GRU/RNN) nodes."""

    model_config = _FROZEN

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


class SvdStep(BaseModel):
    """Low-rank factorization of constant MatMul/Gemm weights: W[K,N] ~ A[K,r] @ B[r,N]."""

    model_config = _FROZEN

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
        "spending rank where it removes the most relative error per parameter (weight energy, or output error "
        "when activation_aware). Matrices not worth factorizing stay whole and count in full.",
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


class QuantizeStep(BaseModel):
    """Int8 quantization through onnxruntime.quantization (dynamic, or static with calibration data)."""

    model_config = _FROZEN

    kind: Literal["quantize"] = "quantize"
    mode: Literal["dynamic", "static"] = Field(
        "dynamic",
        description="dynamic: weights int8, activations quantized at run time (no data needed). "
        "static: activations calibrated on the user's calibration data.",
    )
    format: Literal["qdq", "qoperator"] = Field(
        "qdq", description="static only: QuantizeLinear/DequantizeLinear pairs (qdq) or QLinear* operators."
    )
    per_channel: bool = Field(
        True,
        description="One scale per output channel of each weight (per-channel kept embedding cosine at 0.996 "
        "instead of 0.980 on a MiniLM encoder at the same speed). Dynamic mode falls back to one scale per "
        "tensor when the model's opset cannot be raised to 13, which per-channel needs.",
    )
    weight_type: Literal["int8", "uint8"] = Field("int8", description="Type of quantized weights.")
    activation_type: Literal["uint8", "int8"] = Field(
        "uint8",
        description="static only: type of quantized activations (uint8 is fast on x86; int8 activations "
        "with int8 weights are slow there).",
    )
    calibration_method: Literal["minmax", "entropy", "percentile", "distribution"] = Field(
        "minmax", description="static only: how activation ranges are computed from the calibration data."
    )
    calibration_samples: int | None = Field(
        None, ge=1, description="static only: use at most this many calibration samples."
    )
    op_types: list[str] | None = Field(
        None,
        description="Operator types to quantize. Default is chosen per model: dynamic mode leaves Conv in "
        "float (ConvInteger is slow on CPU); static mode quantizes every supported type (see speed_check).",
    )
    exclude_op_types: list[str] = Field(default_factory=list, description="Operator types left in float.")
    exclude_nodes: list[str] = Field(default_factory=list, description="Names of nodes left in float.")
    reduce_range: bool = Field(False, description="Quantize weights to 7 bits (for old CPUs without VNNI).")
    preprocess: Literal["auto", "on", "off"] = Field(
        "auto",
        description="Run onnxruntime's quant_pre_process (shape inference, graph optimization) first. "
        "auto: try it and fall back to the model as is when it fails; skip it on a model past 2 GiB (it holds "
        "the model two or three more times).",
    )
    embedding_bits: Literal[8, 4] = Field(
        8,
        description="Bits of Gather (embedding table) weights. 4: weight-only blocks of 32 through onnxruntime's "
        "MatMulNBitsQuantizer (a GatherBlockQuantized node), halving the table that holds most of a small "
        "transformer encoder's weights; the other quantized nodes stay 8-bit.",
    )
    float_layer_weights: Literal["auto", "int8", "float"] = Field(
        "auto",
        description="How to store the weights of the Conv/MatMul/Gemm/LSTM/GRU/RNN layers that stay in float. "
        "int8: one int8 tensor and a scale per output channel, turned back into float by a Cast and a Mul that "
        "ONNX Runtime folds into a float weight when it loads the model: about 4x smaller files, the same speed. "
        "auto: int8 when op_types is left to the pass (for the layers it keeps in float: Conv in dynamic mode, "
        "layers the speed or fidelity check left out), else float. int8 also applies to excluded layers. float: "
        "leave them.",
    )
    speed_check: bool = Field(
        True,
        description="When op_types is left to the pass and the float model takes at least 0.5 ms a run: time "
        "the int8 model against it (one thread, interleaved) and, if int8 is slower, retry without depthwise "
        "Conv, then MatMul/Gemm only, and keep float if every try is slower. false: keep ONNX Runtime's result.",
    )
    fold_affine: bool = Field(
        True,
        description="static only: before quantizing, fold exactly what would sit in float between int8 layers: "
        "Mul/Add by constants after a Conv (into its weight and bias), a scalar Mul (and, before an unpadded Conv, "
        "Add) in front of Convs, and x * clip(x + 3, 0, 6) / 6 as x * HardSigmoid(x). On PP-OCRv4's recogniser "
        "it removed 149 of 277 element-wise nodes: static int8 with recovery went from 0.83-0.89x to 0.55-0.62x "
        "of fp32's CPU time.",
    )
    # Static int8 recovery (onnx_ops.passes.quantize.recovery): inside the scales ONNX Runtime chose.
    recovery: Literal["auto", "on", "off"] = Field(
        "auto",
        description="static only: recover accuracy (qdq format) inside ONNX Runtime's scales on the calibration "
        "data, layer by layer on the int8 model's own inputs: error-compensating (GPTQ) rounding of the "
        "Conv/MatMul/Gemm int8 weights and bias correction (depthwise Conv keeps ONNX Runtime's rounding); "
        "optionally the layers whose quantization hurts the outputs most are kept in float (max_float_layers). "
        "auto: on in static mode. On a PP-OCRv4 recogniser it took character accuracy on held-out words from "
        "92.2% to 96.6% (fp32 97.0%).",
    )
    rounding: Literal["gptq", "nearest"] = Field(
        "gptq",
        description="static only: recovery: gptq rounds each weight's inputs one by one and spreads the rounding error "
        "over those not yet rounded, weighted by the layer inputs' covariance; nearest keeps ONNX Runtime's "
        "round-to-nearest levels.",
    )
    bias_correction: bool = Field(
        True,
        description="static only: recovery: add the expected output shift of each layer's weight rounding error at "
        "its mean calibration input, (W - Q) E[x], to its bias.",
    )
    max_float_layers: float = Field(
        0.0,
        ge=0.0,
        le=1.0,
        description="static only: recovery: keep up to this fraction of the quantized weight layers in float, those "
        "whose quantization hurts the outputs most (each measured alone, then added while the outputs get "
        "closer), until output_cosine is reached. Float layers between int8 ones cost speed. 0: none.",
    )
    output_cosine: float = Field(
        0.995,
        gt=0.0,
        le=1.0,
        description="static only: recovery with max_float_layers: stop keeping layers in float once the worst "
        "output's mean cosine against the float model on the calibration samples reaches this.",
    )
    # Dynamic int8 with calibration data (onnx_ops.passes.quantize.smoothing, dynamic_rounding).
    smoothing: Literal["auto", "all", "off"] = Field(
        "auto",
        description="dynamic only: with calibration data, activation smoothing (SmoothQuant): each input channel of "
        "the constant-weight MatMuls is divided by a factor that moves its outliers into the weight rows, so the "
        "activations' run-time int8 grid gets finer. Each activation's strength (or none) is chosen from "
        "per-channel statistics of one run per calibration sample, by the int8 output error it would give; the "
        "model is then quantized once. The division is folded into "
        "attention's V weights, else a Mul before the MatMuls; auto adds such a Mul only where the activation has "
        "no more channels than the MatMuls reading it have outputs (not after an FFN's GELU), all everywhere. On "
        "paraphrase-MiniLM-L3-v2: held-out embedding cosine 0.9972 -> 0.9985 (auto, same CPU time) or 0.9993 "
        "(all, 4% more CPU time).",
    )
    dynamic_rounding: Literal["nearest", "gptq"] = Field(
        "nearest",
        description="dynamic only: with calibration data, gptq re-rounds the MatMul int8 weights inside the scales "
        "ONNX Runtime chose, compensating each rounding error on the inputs not yet rounded (kept only if the "
        "calibration outputs get closer); nearest keeps ONNX Runtime's rounding.",
    )

    @model_validator(mode="after")
    def _static_only_fields(self) -> QuantizeStep:
        if self.mode == "dynamic" and self.format == "qoperator":
            # Dynamic quantization always emits QOperator-style nodes; accept and ignore the field.
            return self
        if self.op_types is not None and not self.op_types:
            raise ValueError("op_types, when given, must name at least one operator type")
        return self


class DistillStep(BaseModel):
    """Label-free recovery of pruned MatMul/Gemm/Conv layers: refit the kept weights to the original model's outputs.

    The original model (before the plan) is the teacher and the calibration data is the training set: for
    every pruned layer, the weights that pruning kept (and the bias) are refit by ridge least squares so the
    layer's output matches the teacher's; zeros stay zero, so the sparsity pattern (unstructured or N:M)
    is unchanged. After structured pruning, every MatMul/Gemm/Conv whose weight lost channels is refit the
    same way on the output channels it kept, so the removed channels' contribution is re-expressed by the
    ones that stay (the ridge term is then chosen by cross-validation over the calibration feeds).
    """

    model_config = _FROZEN

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


class AutoStep(BaseModel):
    """Search for the compression that meets an accuracy budget, measuring every candidate with ONNX Runtime."""

    model_config = _FROZEN

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
        "own timeout still applies).",
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


Step = Annotated[
    OptimizeStep | PruneStep | SvdStep | DistillStep | QuantizeStep | Int4Step | Fp16Step | ClusterStep | AutoStep,
    Field(discriminator="kind"),
]


class EvaluationOptions(BaseModel):
    """How the before/after report is measured."""

    model_config = _FROZEN

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


class Plan(BaseModel):
    """An ordered list of compression steps plus how to measure the result."""

    model_config = _FROZEN

    steps: list[Step] = Field(min_length=1, max_length=16)
    input_shapes: dict[str, list[int]] = Field(
        default_factory=dict,
        description="Shape of one sample for inputs with symbolic dimensions, e.g. "
        '{"input_ids": [1, 128]}. A symbolic first (batch) dimension defaults to 1.',
    )
    evaluation: EvaluationOptions = Field(default_factory=EvaluationOptions)
    external_data: bool = Field(
        False,
        description="Write the compressed model's weights to a data file beside the .onnx (external data), as "
        "models past 2 GiB always are; the service then returns a .zip of both files.",
    )

    @model_validator(mode="after")
    def _check_order(self) -> Plan:
        kinds = [s.kind for s in self.steps]
        if "auto" in kinds and len(kinds) > 1:
            raise ValueError("auto chooses the prune, svd and quantize steps itself: it must be the only step")
        if kinds.count("quantize") > 1:
            raise ValueError("a plan can quantize only once")
        if "quantize" in kinds and kinds.index("quantize") != len(kinds) - 1:
            after = kinds[kinds.index("quantize") + 1]
            raise ValueError(
                f"quantize must be the last step: {after} after quantize would work on int8 weights "
                "that it cannot read; put prune and svd before quantize"
            )
        if "distill" in kinds and not {"prune", "svd"} & set(kinds[: kinds.index("distill")]):
            raise ValueError("distill recovers pruned or factorized layers: put a prune step before it, or an svd step")
        _check_teacher_order(kinds)
        final = [kind for kind in kinds if kind in FINAL_KINDS]
        if len(final) > 1:
            raise ValueError(
                f"a plan can end in only one of {', '.join(FINAL_KINDS)} (got {', '.join(final)}): each leaves "
                "weights in a format the others cannot read"
            )
        if final and kinds[-1] != final[0]:
            raise ValueError(
                f"{final[0]} must be the last step: {kinds[kinds.index(final[0]) + 1]} after {final[0]} would work "
                "on weights it cannot read; put prune and svd before it"
            )
        for name, shape in self.input_shapes.items():
            if any(d < 1 for d in shape):
                raise ValueError(f"input_shapes[{name!r}] must have positive dimensions, got {shape}")
        return self

    @property
    def needs_calibration(self) -> bool:
        """True when a step needs the user's calibration data."""
        return self.calibration_user is not None

    @property
    def calibration_user(self) -> str | None:
        """What in the plan needs calibration data, in words ("static quantization"), or None."""
        for s in self.steps:
            if isinstance(s, QuantizeStep) and s.mode == "static":
                return "static quantization"
            if isinstance(s, Int4Step) and s.method == "gptq":
                return "int4 with method gptq"
            if isinstance(s, DistillStep):
                return "distill"
            if isinstance(s, PruneStep) and s.criterion == "activation":
                return "activation-aware pruning"
            if isinstance(s, SvdStep) and s.activation_aware:
                return "svd with activation_aware"
        return None


def _check_teacher_order(kinds: Sequence[str]) -> None:
    """Refuse a lossless step between a lossy one and distill: the teacher could not mirror it (see teacher.py)."""
    if "distill" not in kinds:
        return
    last = len(kinds) - 1 - kinds[::-1].index("distill")
    lossy = next((i for i, kind in enumerate(kinds) if kind not in LOSSLESS_KINDS), len(kinds))
    late = [kind for kind in kinds[lossy:last] if kind in LOSSLESS_KINDS]
    if late:
        raise ValueError(
            f"{late[0]} must come before {kinds[lossy]} when the plan distills: distill's teacher is the model "
            f"after the plan's first lossless steps, and {late[0]} after {kinds[lossy]} renames the layers it "
            "compares; put optimize first"
        )


# The plan used when none is given: dynamic int8 quantization (about 4x smaller weights, needs no data).
DEFAULT_PLAN = '{"steps": [{"kind": "quantize", "mode": "dynamic"}]}'
