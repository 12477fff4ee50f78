"""Static int8 recovery inside the scales ONNX Runtime's quantizer chose: rounding, bias correction, float layers.

Given the float model the quantizer read (the teacher) and the QDQ model it wrote (the student), on the
calibration feeds:

1. Layers are visited in graph order, in a few chunks, so each chunk sees the inputs the student produces
   with every earlier chunk already recovered (errors do not pile up). Per chunk, the capture module
   (onnx_ops.capture, Conv as sampled im2col patches) gives each layer's input second moment X^T X on the
   student's own dequantized inputs, and GPTQ rounds the float weight on ONNX Runtime's per-channel grids
   (onnx_ops.passes.quantize.rounding); the int8 levels are written back into the weight initializer.
2. Bias correction: the expected output shift of the weight's rounding error at the layer's mean input,
   (W - Q) E[x] per output channel with E[x] from the same captured statistics, is added to the bias (its
   int32 values, on the bias scale ONNX Runtime chose). A measured shift (teacher minus student outputs) would
   also count the upstream layers' shift, which their own correction removes: chained layers in one chunk
   would correct it twice (measured: worse outputs on a DBNet detector).
3. Float layers (onnx_ops.passes.quantize.exclusions), when the budget allows any: while the worst output's
   mean cosine on the calibration feeds is below the target, the layers whose quantization hurts the outputs
   most, measured one at a time, are put back in float.

Depthwise Conv (one input channel per output channel, 9 inputs for a 3x3 kernel) is recovered with the others,
then by default undone when the calibration outputs are closer without it (see _depthwise_helps).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import onnx

from onnx_ops.capture import LayerStats, Session, capture
from onnx_ops.passes._base import Feed, PassLog
from onnx_ops.passes.quantize import aimed, closer, exclusions, stages
from onnx_ops.passes.quantize.outcome import Outcome
from onnx_ops.passes.quantize.qdq import QdqLayer, QdqModel, as_matrix, channel_params, dequantize, from_matrix
from onnx_ops.passes.quantize.rounding import gptq_levels, layer_error, nearest_levels
from onnx_ops.plan import QuantizeStep

__all__: list[str] = []  # package-private

_CHUNKS = 8  # sequential stages over the layers (each: one capture run and one bias run per feed)
_POSITIONS = 512  # Conv output positions sampled per feed for X^T X


@dataclasses.dataclass(frozen=True)
class Settings:
    """What recovery does (from the quantize step)."""

    rounding: str = "gptq"
    bias_correction: bool = True
    max_float_layers: float = 0.1
    output_cosine: float = 0.995
    threads: int = 1
    depthwise: str = "auto"  # depthwise Conv: "on", "off", or "auto": kept only if the calibration outputs improve
    aim: str = "float_weights"  # the quantize step's recovery_target: "float_outputs" refits to the float outputs first
    only_closer: bool = False  # recovery "auto": a stage of layers whose recovery moves the outputs away is undone


def recover_file(
    source: Path,
    target: Path,
    step: QuantizeStep,
    feeds: Sequence[Feed],
    log: PassLog,
    clean: Callable[[BaseException], str],
) -> None:
    """Recover ONNX Runtime's QDQ model file `target` against the float model file `source` it quantized.

    The step's recovery fields say what to do; the outcome goes into the log's summary. A failure is a
    warning: ONNX Runtime's own model stays usable without recovery.
    """
    settings = Settings(
        step.rounding,
        step.bias_correction,
        step.max_float_layers,
        step.output_cosine,
        aim=step.recovery_target,
        only_closer=step.recovery == "auto",
    )
    try:
        proto, outcome = recover(onnx.load(source), onnx.load(target), feeds, settings)
    except Exception as e:
        log.warnings.append(f"static int8 recovery failed, ONNX Runtime's rounding kept: {clean(e)}")
        return
    onnx.save(proto, target)
    log.summary.update(outcome.summary())


def recover(
    teacher: onnx.ModelProto, student: onnx.ModelProto, feeds: Sequence[Feed], settings: Settings
) -> tuple[onnx.ModelProto, Outcome]:
    """Recover the QDQ model `student` (changed in place and returned) against its float source `teacher`."""
    model = QdqModel(student)
    layers = model.layers()
    outcome = Outcome(layers=len(layers))
    if not layers or not feeds:
        return student, outcome
    floats = {init.name: init for init in teacher.graph.initializer}
    known = {name for node in teacher.graph.node for name in node.output}
    for layer in layers:  # the name the float model gives the layer's output
        if layer.output not in known and model.requantized(layer.output) in known:
            layer.output = model.requantized(layer.output)
    layers = [layer for layer in layers if layer.output in known]
    if settings.aim == "float_outputs":
        aimed.before_activations(teacher, layers)
    weights = {layer.node: _float_weight(model, layer, floats) for layer in layers}
    biases = {layer.node: _float_bias(model, layer, floats) for layer in layers}
    session = Session(teacher, [layer.output for layer in layers], settings.threads)
    judge = exclusions.Exclusions(session, feeds, settings.output_cosine, settings.threads)
    outcome.cosine_before = judge.cosine(model.proto)
    local: dict[str, float] = {}
    depthwise = [layer for layer in layers if layer.depthwise]
    original = {name: model.array(name) for layer in depthwise for name in (layer.weight, layer.bias) if name}
    if settings.depthwise == "off":
        layers = [layer for layer in layers if not layer.depthwise]
    # Aimed at the teacher, the output heads keep GPTQ of their float weights: their least-squares fit weighs
    # every output alike (a detector's thousands of background logits), not what the task reads from them.
    last = stages.last_layers(model.proto.graph, layers) if settings.aim == "float_outputs" else set()
    closest = outcome.cosine_before
    for chunk in _chunks(model, layers, settings.aim):
        kept = closer.kept(model, chunk) if settings.only_closer else None
        local |= _recover_chunk(model, chunk, (weights, biases), session, feeds, settings, outcome, last)
        if kept is not None:
            closest = closer.keep_if_closer(model, chunk, kept, judge, closest, outcome)
    if depthwise and settings.depthwise == "auto" and not _depthwise_helps(model, original, judge, outcome):
        layers = [layer for layer in layers if not layer.depthwise]
        for layer in depthwise:
            outcome.undo(layer.node)
    budget = int(np.floor(settings.max_float_layers * len(layers)))
    if budget > 0:
        _, outcome.cosine_after, outcome.float_layers = judge.choose(model, layers, local, weights, biases, budget)
    else:
        outcome.cosine_after = judge.cosine(model.proto)
    return model.proto, outcome


def _chunks(model: QdqModel, layers: list[QdqLayer], aim: str) -> list[list[QdqLayer]]:
    """The layers in the order recovery visits them, one capture run per chunk.

    Aimed at the teacher, a layer's fit absorbs the error of the inputs it was captured on: each layer must be
    captured after every layer it reads is final (stages). GPTQ alone does not compensate upstream error, so
    a few chunks in graph order do.
    """
    if aim == "float_outputs":
        return stages.stages(model.proto.graph, layers)
    size = -(-len(layers) // min(_CHUNKS, len(layers))) if layers else 1
    return [layers[start : start + size] for start in range(0, len(layers), size)]


def _depthwise_helps(
    model: QdqModel, original: dict[str, np.ndarray], judge: exclusions.Exclusions, outcome: Outcome
) -> bool:
    """Keep the depthwise Convs' recovery only if the calibration outputs are closer with it; else undo it.

    Measured on PP-OCRv4 (outside the pass): recovering them with the other layers took the recogniser's
    character accuracy on held-out words from 95.4% to 96.6%, and the detector's text-map agreement with fp32
    from 97.5% to 96.4% (its first depthwise Conv alone moved the output cosine from 0.98 to 0.97). The
    calibration cosine ranked the detector's case right; on the recogniser it said "without" in the pass's
    own run (0.9194 against 0.8973), so there the depthwise Convs keep ONNX Runtime's rounding.
    """
    recovered = {name: model.array(name) for name in original}
    with_them = judge.cosine(model.proto)
    for name, value in original.items():
        model.set_array(name, value)
    without = judge.cosine(model.proto)
    note = f"calibration cosine {without:.4f} without, {with_them:.4f} with"
    if with_them > without:
        for name, value in recovered.items():
            model.set_array(name, value)
        outcome.depthwise = f"recovered ({note})"
        return True
    outcome.depthwise = f"left as rounded by ONNX Runtime ({note})"
    return False


def _float_weight(model: QdqModel, layer: QdqLayer, floats: dict[str, onnx.TensorProto]) -> np.ndarray:
    """The layer's float weight from the teacher (its dequantized int8 weight when the teacher's is not found)."""
    found = floats.get(layer.float_weight)
    shape = tuple(model.inits[layer.weight].dims)
    if found is not None and tuple(found.dims) == shape and found.data_type == onnx.TensorProto.FLOAT:
        return np.asarray(onnx.numpy_helper.to_array(found), np.float64)
    return dequantize(model, layer)


def _float_bias(model: QdqModel, layer: QdqLayer, floats: dict[str, onnx.TensorProto]) -> np.ndarray | None:
    """The layer's float bias from the teacher (its dequantized int32 bias when not found), or None."""
    if not layer.bias:
        return None
    found = floats.get(layer.float_bias)
    if found is not None and found.data_type == onnx.TensorProto.FLOAT:
        return np.asarray(onnx.numpy_helper.to_array(found), np.float32)
    return np.asarray(model.array(layer.bias) * model.array(layer.bias_scale), np.float32)


def _grid(model: QdqModel, layer: QdqLayer) -> tuple[int, int]:
    """The levels the weight may use: ONNX Runtime's symmetric int8 keeps -127..127."""
    if model.inits[layer.weight].data_type == onnx.TensorProto.UINT8:
        return 0, 255
    return (-127, 127) if not np.any(model.array(layer.weight_zero)) else (-128, 127)


def _recover_chunk(
    model: QdqModel,
    chunk: list[QdqLayer],
    floats: tuple[dict[str, np.ndarray], dict[str, np.ndarray | None]],
    session: Session,
    feeds: Sequence[Feed],
    settings: Settings,
    outcome: Outcome,
    last: set[str],
) -> dict[str, float]:
    """Round and bias-correct each layer of the chunk on the student's current inputs (in place).

    `floats` holds the float weights and biases by layer node; `last` the layers not aimed at the teacher
    even when settings say so (see recover). Returns each layer's relative output error against the teacher
    afterwards (on the captured rows).
    """
    weights, biases = floats
    outputs_aimed = settings.aim == "float_outputs"  # the chunk is captured for refits to the float outputs
    described = [layer.capture_layer(weights[layer.node]) for layer in chunk]
    stats, _ = capture(
        session, model.proto, described, feeds, threads=settings.threads, positions=_POSITIONS,
        model_error=not outputs_aimed, folds=2 if outputs_aimed and len(feeds) > 1 else 1,
    )  # fmt: skip
    errors = {}
    for layer in chunk:
        start = outcome.counts()
        layer_aimed = outputs_aimed and layer.node not in last  # this layer is refit to the float outputs
        weight, found = weights[layer.node], stats[layer.node]
        groups = layer.conv.groups if layer.conv else 1
        matrix = as_matrix(layer, weight, groups)
        scale, zero = channel_params(model, layer, matrix.shape[0] * matrix.shape[1])
        scale, zero = scale.reshape(groups, -1), zero.reshape(groups, -1)
        grid = _grid(model, layer)
        levels, fitted = np.empty_like(matrix), np.zeros(matrix.shape[:2])
        bias = biases[layer.node]
        for g in range(groups):
            one = found.group(g)
            h = one.xtx[:-1, :-1]
            aimed_at = matrix[g]
            if layer_aimed and groups == 1:
                aimed_at, _, damping = aimed.refit(one, matrix[g], None if bias is None else bias.astype(np.float64))
                outcome.refit += damping >= 0
            nearest = nearest_levels(matrix[g], scale[g], zero[g], grid)
            levels[g] = gptq_levels(aimed_at, h, scale[g], zero[g], grid) if settings.rounding == "gptq" else nearest
            outcome.gptq_error += layer_error(matrix[g] - (levels[g] - zero[g][:, None]) * scale[g][:, None], h)
            outcome.nearest_error += layer_error(matrix[g] - (nearest - zero[g][:, None]) * scale[g][:, None], h)
            if layer_aimed and one.rows:
                fitted[g] = aimed.least_squares_bias(one, (levels[g] - zero[g][:, None]) * scale[g][:, None])
        dtype = onnx.helper.tensor_dtype_to_np_dtype(model.inits[layer.weight].data_type)
        model.set_array(layer.weight, from_matrix(layer, levels, weight.shape).astype(dtype))
        outcome.rounded += settings.rounding == "gptq"
        quantized = (levels - zero[..., None]) * scale[..., None]  # [groups, rows, k]
        if settings.bias_correction and layer.bias and found.rows:
            bias_scale = model.array(layer.bias_scale).astype(np.float64)
            if layer_aimed:  # the least-squares bias for the rounded weight, on the student's inputs
                new_bias = fitted.ravel()
            else:  # the expected output shift of the weight's rounding error at the mean input: (W - Q) E[x]
                means = found.xtx[..., -1, :-1].reshape(groups, -1) / found.rows  # sum of x over the rows
                shift = np.einsum("grk,gk->gr", matrix - quantized, means).ravel()
                new_bias = model.array(layer.bias).astype(np.float64) * bias_scale + shift
            limit = np.iinfo(np.int32)
            model.set_array(layer.bias, np.clip(np.round(new_bias / bias_scale), limit.min, limit.max).astype(np.int32))
            outcome.corrected += 1
        errors[layer.node] = _relative_error(model, layer, found, quantized)
        outcome.deltas[layer.node] = [a - b for a, b in zip(outcome.counts(), start, strict=True)]
    return errors


def _relative_error(model: QdqModel, layer: QdqLayer, found: LayerStats, quantized: np.ndarray) -> float:
    """The layer's relative squared output error against the teacher on the captured rows (its bias as stored)."""
    groups, rows = quantized.shape[0], quantized.shape[1]
    bias_now = model.array(layer.bias) * model.array(layer.bias_scale) if layer.bias else 0.0
    combined = np.concatenate(
        [quantized.transpose(0, 2, 1), np.broadcast_to(bias_now, (groups * rows,)).reshape(groups, 1, -1)], axis=1
    )
    reference = float(found.yty.sum())
    squared = found.squared_error(combined if groups > 1 else combined[0])
    return max(squared, 0.0) / reference if reference > 0 else 0.0
