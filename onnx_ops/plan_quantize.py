"""The quantize step: int8 through onnxruntime.quantization, dynamic or static (see passes/quantize/)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field, SerializerFunctionWrapHandler, model_serializer, model_validator

from onnx_ops._plan_config import FROZEN

__all__ = ["IGNORED_IN", "QuantizeStep"]

# Fields the pass reads in one mode only (the form shows each with that mode only: its "<mode> only:" description).
# Set to other than its default with the other mode, the step is refused rather than run without them.
_STATIC_ONLY = (
    "format",
    "activation_type",
    "calibration_method",
    "fold_affine",
    "recovery",
    "rounding",
    "bias_correction",
    "max_float_layers",
    "output_cosine",
    "recovery_target",
)
_DYNAMIC_ONLY = ("smoothing", "dynamic_rounding")
IGNORED_IN: dict[str, tuple[str, ...]] = {"dynamic": _STATIC_ONLY, "static": _DYNAMIC_ONLY}


class QuantizeStep(BaseModel):
    """Int8 quantization through onnxruntime.quantization (dynamic, or static with calibration data)."""

    model_config = FROZEN

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
        "auto: on in static mode, judged stage by stage (about 8 stages of layers in graph order): a stage whose "
        "recovery moves the calibration outputs away from the float model's is undone (on ddddocr's captcha detector "
        "GPTQ of the first stage took the output cosine from 0.971 to 0.947); on: every layer is recovered. "
        "On a PP-OCRv4 recogniser it took character accuracy on held-out words from "
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
    recovery_target: Literal["float_weights", "float_outputs"] = Field(
        "float_weights",
        description="static only: recovery: what each int8 layer is rounded towards. float_weights: GPTQ keeps it "
        "close to its own float weight on the int8 model's inputs. float_outputs: each Conv is first refit so that, "
        "from the int8 model's own inputs, it reproduces the float model's output of that layer (ridge least "
        "squares, cross-validated), then rounded by GPTQ; layers are visited one dependency stage at a time and "
        "the output heads keep float_weights. Off by default: on a captcha detector it brought the outputs closer "
        "(worst cosine 0.990 -> 0.998) at 4-12x the build time; its box F1 was compared only on undecoded boxes.",
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
    def _check_fields(self) -> QuantizeStep:
        if self.op_types is not None and not self.op_types:
            raise ValueError("op_types, when given, must name at least one operator type")
        if ignored := [name for name in IGNORED_IN[self.mode] if self._set_to_matter(name)]:
            other = "static" if self.mode == "dynamic" else "dynamic"
            verb, them = ("applies", "it") if len(ignored) == 1 else ("apply", "them")
            raise ValueError(
                f"{', '.join(ignored)} {verb} to {other} quantization only; remove {them} or set mode to {other}"
            )
        return self

    def _set_to_matter(self, name: str) -> bool:
        """Whether a field of the other mode was set to something that would change what that mode does.

        Its default, written out (as in a full dump of the step that an earlier version stored for a queued job),
        changes nothing; nor does format "qoperator" in dynamic mode, whose nodes are QOperator-style anyway.
        """
        value = getattr(self, name)
        if name not in self.model_fields_set or value == type(self).model_fields[name].default:
            return False
        return not (self.mode == "dynamic" and name == "format" and value == "qoperator")

    @model_serializer(mode="wrap")
    def _without_ignored(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        """The step's fields without those its mode ignores, so that a dumped step validates again."""
        data: dict[str, Any] = handler(self)
        for name in IGNORED_IN[self.mode]:
            data.pop(name, None)
        return data
