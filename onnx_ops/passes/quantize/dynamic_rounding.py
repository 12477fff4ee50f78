"""Dynamic int8 with calibration data: error-compensating rounding of the MatMul weights in ONNX Runtime's scales.

ONNX Runtime's dynamic quantizer rounds every constant MatMul weight to the nearest level of the grid it chose
(one scale per output column, or one per tensor) and quantizes the activations at run time. It needs no data,
so it cannot know which inputs matter. Given calibration feeds, this module keeps its graph, its scales and
zero points, and changes only the int8 levels of each ``MatMulInteger`` weight: GPTQ rounding (the static
path's solver, onnx_ops.passes.quantize.rounding) on the second moment X^T X of the layer's float input, which
the capture module collects on the int8 model itself, a few layers at a time in graph order, so each layer's
rounding compensates the error of the layers before it. The run time cannot change: the model computes the
same operators on tensors of the same types and shapes.

The model is kept only if the worst output's mean cosine against the float model on the calibration feeds
got closer; otherwise ONNX Runtime's rounding stays (and the step's summary says so).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
from onnx import numpy_helper

from onnx_ops.capture import Layer, Session, capture
from onnx_ops.passes._base import Feed, PassLog
from onnx_ops.passes.quantize import exclusions
from onnx_ops.passes.quantize.rounding import gptq_levels, layer_error, nearest_levels

__all__: list[str] = []  # package-private

_CHUNKS = 6  # sequential stages over the layers (each: one capture run per feed)


@dataclasses.dataclass(frozen=True)
class DynamicLayer:
    """One MatMulInteger of ONNX Runtime's dynamic int8 model whose weight is a constant (names in that model).

    Attributes:
        node: The MatMulInteger node's name.
        activation: The float tensor its DynamicQuantizeLinear quantizes (the same tensor in the float model).
        output: The float model's MatMul output it replaces (the capture module's target).
        weight: The int8 weight initializer [K, N]; scale and zero its scale and zero point ([N] or scalar).
        float_weight: The float model's weight initializer.
    """

    node: str
    activation: str
    output: str
    weight: str
    scale: str
    zero: str
    float_weight: str


@dataclasses.dataclass
class Outcome:
    """What the rounding changed and measured, for the step's summary."""

    layers: int = 0
    gptq_error: float = 0.0  # summed layer error trace(E H E^T) of GPTQ's rounding ...
    nearest_error: float = 0.0  # ... and of ONNX Runtime's round-to-nearest, on the same inputs
    cosine_before: float | None = None
    cosine_after: float | None = None
    kept: bool = False
    weights: list[str] = dataclasses.field(default_factory=list)  # the int8 weight initializers re-rounded

    def summary(self) -> dict[str, str]:
        """The step summary's entry."""
        ratio = self.gptq_error / self.nearest_error if self.nearest_error > 0 else 1.0
        found = f"gptq on {self.layers} MatMul weights: layer error {ratio:.3f}x round-to-nearest"
        if self.cosine_before is not None and self.cosine_after is not None:
            cosines = f"calibration cosine {self.cosine_before:.4f} -> {self.cosine_after:.4f}"
            found += f", {cosines}" if self.kept else f"; not kept ({cosines})"
        return {"dynamic_rounding": found}


def round_file(
    source: Path, target: Path, feeds: Sequence[Feed], log: PassLog, clean: Callable[[BaseException], str]
) -> None:
    """Re-round the weights of ONNX Runtime's dynamic int8 model file `target` against its float `source`.

    A failure is a warning: ONNX Runtime's own model stays usable.
    """
    if (found := _kept(source, onnx.load(target), feeds, log, clean)) is not None:
        onnx.save(found[0], target)


def round_model(
    source: Path, model: ir.Model, feeds: Sequence[Feed], log: PassLog, clean: Callable[[BaseException], str]
) -> None:
    """Re-round the weights of the pass's own dynamic int8 `model` (in place) against its float model file `source`.

    The pass's own quantizer writes ONNX Runtime's graph, so the same layers are found. The int8 model goes to
    ONNX Runtime as a proto (a quarter of the float size), the float one as a file. A failure is a warning.
    """
    if (found := _kept(source, ir.to_proto(model), feeds, log, clean)) is None:
        return
    proto, names = found
    for init in proto.graph.initializer:
        if init.name in names:
            model.graph.initializers[init.name].const_value = ir.tensor(numpy_helper.to_array(init), name=init.name)


def _kept(
    source: Path,
    student: onnx.ModelProto,
    feeds: Sequence[Feed],
    log: PassLog,
    clean: Callable[[BaseException], str],
) -> tuple[onnx.ModelProto, set[str]] | None:
    """The re-rounded model and the weights changed, if it got closer on the calibration feeds; logs the outcome."""
    try:
        proto, outcome = round_weights(onnx.load(source), student, feeds)
    except Exception as e:
        log.warnings.append(f"dynamic int8 rounding failed, round-to-nearest kept: {clean(e)}")
        return None
    if outcome.layers:
        log.summary.update(outcome.summary())
    return (proto, set(outcome.weights)) if outcome.kept else None


def round_weights(
    teacher: onnx.ModelProto, student: onnx.ModelProto, feeds: Sequence[Feed], *, threads: int = 1
) -> tuple[onnx.ModelProto, Outcome]:
    """GPTQ-round the MatMulInteger weights of `student` (a copy is changed) against its float source `teacher`."""
    model = onnx.ModelProto()
    model.CopyFrom(student)
    layers = dynamic_layers(teacher, model)
    outcome = Outcome(layers=len(layers))
    if not layers or not feeds:
        return model, outcome
    inits = {init.name: init for init in model.graph.initializer}
    floats = {init.name: init for init in teacher.graph.initializer}
    session = Session(teacher, [layer.output for layer in layers], threads)
    judge = exclusions.Exclusions(session, feeds, 1.0, threads)
    outcome.cosine_before = judge.cosine(model)
    size = -(-len(layers) // min(_CHUNKS, len(layers)))
    for start in range(0, len(layers), size):
        chunk = layers[start : start + size]
        described = [_described(layer, inits) for layer in chunk]
        stats, _ = capture(session, model, described, feeds, threads=threads, model_error=False)
        for layer in chunk:
            weight = np.asarray(numpy_helper.to_array(floats[layer.float_weight]), np.float64).T  # [N, K]
            levels = _rounded(layer, weight, stats[layer.node].xtx[:-1, :-1], inits, outcome)
            dtype = numpy_helper.to_array(inits[layer.weight]).dtype
            inits[layer.weight].CopyFrom(numpy_helper.from_array(levels.T.astype(dtype), layer.weight))
            outcome.weights.append(layer.weight)
    outcome.cosine_after = judge.cosine(model)
    outcome.kept = outcome.cosine_after > outcome.cosine_before
    return model, outcome


def dynamic_layers(teacher: onnx.ModelProto, student: onnx.ModelProto) -> list[DynamicLayer]:
    """The MatMulInteger nodes of `student` that quantize a constant float MatMul weight of `teacher`, in order."""
    inits = {init.name: init for init in student.graph.initializer}
    floats = {init.name for init in teacher.graph.initializer}
    matmuls = {node.input[1]: node for node in teacher.graph.node if node.op_type == "MatMul" and len(node.input) == 2}
    quantizers = {
        out: node for node in student.graph.node if node.op_type == "DynamicQuantizeLinear" for out in node.output[:1]
    }
    found = []
    for node in student.graph.node:
        if node.op_type != "MatMulInteger" or len(node.input) < 4 or node.input[1] not in inits:
            continue
        source = node.input[1].removesuffix("_quantized")
        quantizer, matmul = quantizers.get(node.input[0]), matmuls.get(source)
        scale = source + "_scale"
        if quantizer is None or matmul is None or source not in floats or scale not in inits:
            continue
        if quantizer.input[0] != matmul.input[0] or node.input[3] not in inits:
            continue
        found.append(DynamicLayer(node.name, matmul.input[0], matmul.output[0], node.input[1], scale, node.input[3],
                                  source))  # fmt: skip
    return found


def _described(layer: DynamicLayer, inits: dict[str, onnx.TensorProto]) -> Layer:
    k, n = inits[layer.weight].dims
    return Layer(layer.node, layer.activation, layer.output, k=int(k), n=int(n))


def _rounded(
    layer: DynamicLayer,
    weight: np.ndarray,
    hessian: np.ndarray,
    inits: dict[str, onnx.TensorProto],
    outcome: Outcome,
) -> np.ndarray:
    """GPTQ levels [N, K] of the float weight [N, K] on the layer's grids; adds both layer errors to outcome."""
    rows = weight.shape[0]
    scale = np.broadcast_to(np.asarray(numpy_helper.to_array(inits[layer.scale]), np.float64), (rows,))
    zero_array = numpy_helper.to_array(inits[layer.zero])
    zero = np.broadcast_to(np.asarray(zero_array, np.float64), (rows,))
    grid = _grid(zero_array)
    levels = gptq_levels(weight, hessian, scale, zero, grid)
    nearest = nearest_levels(weight, scale, zero, grid)
    outcome.gptq_error += layer_error(weight - (levels - zero[:, None]) * scale[:, None], hessian)
    outcome.nearest_error += layer_error(weight - (nearest - zero[:, None]) * scale[:, None], hessian)
    return levels


def _grid(zero: np.ndarray) -> tuple[int, int]:
    """The levels the weight may use: ONNX Runtime's symmetric int8 keeps -127..127."""
    if zero.dtype == np.uint8:
        return 0, 255
    return (-127, 127) if not np.any(zero) else (-128, 127)
