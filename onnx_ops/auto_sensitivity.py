"""Per-layer sensitivity for the automatic search: compress one layer at a time and measure the output.

* quantize: a proxy that runs in ONNX Runtime without calling the quantizer once per layer. Only the
  chosen layer's weight is rounded to int8 (symmetric, per channel or per tensor) and its input activation
  goes through ``DynamicQuantizeLinear -> DequantizeLinear`` (uint8, as ONNX Runtime's int8 kernels see it).
  ``proxy_check`` compares the proxy with real one-layer quantization by ``QuantizePass`` on a few layers.
* prune, svd: the real ``MagnitudePrunePass`` (structured, ``only_nodes``) or ``SvdFactorizePass`` (every
  other eligible node excluded) applied to that layer alone.

The loss of a layer is ``1 - worst float output cosine`` over the sensitivity samples (0 is harmless), and with
labels also the task accuracy drop.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Sequence
from typing import Literal

import numpy as np
import onnx
import onnx_ir as ir
from onnx_ir.passes import common

from onnx_ops.agreement import accuracy, measure_agreement
from onnx_ops.auto_clock import Work
from onnx_ops.data import Dataset
from onnx_ops.errors import CompressionError
from onnx_ops.evaluate import Runner
from onnx_ops.passes._base import is_constant_weight, non_finite_reason, set_constant
from onnx_ops.report import LayerSensitivity

__all__ = [
    "Layer",
    "Scorer",
    "activation_matmuls",
    "fake_quantized",
    "measure",
    "prepared",
    "quantizable_layers",
    "svd_layers",
]

logger = logging.getLogger(__name__)

_WEIGHT_OPS = ("MatMul", "Gemm", "Conv")
_SVD_MIN_ELEMENTS = 4096  # SvdStep's default: smaller matrices are not worth factorizing


@dataclasses.dataclass(frozen=True)
class Layer:
    """A named node with a constant float weight at input 1."""

    name: str
    op_type: str
    parameters: int


def prepared(original: onnx.ModelProto) -> ir.Model:
    """The model as the passes see it: Constant weights lifted to initializers, no initializer inputs."""
    model = ir.from_proto(original)
    common.LiftConstantsToInitializersPass(lift_all_constants=True, size_limit=0)(model)
    common.RemoveInitializersFromInputsPass()(model)
    return model


def quantizable_layers(model: ir.Model) -> list[Layer]:
    """Named top-level MatMul/Gemm/Conv nodes with a constant float weight, in graph order."""
    layers = []
    for node in model.graph:
        if node.op_type not in _WEIGHT_OPS or node.domain not in ("", "ai.onnx") or not node.name:
            continue
        weight = node.inputs[1] if len(node.inputs) > 1 else None
        if weight is None or not is_constant_weight(weight) or weight.dtype != ir.DataType.FLOAT:
            continue
        if non_finite_reason(weight):  # rounding infinities gives NaN; the passes leave such weights alone
            continue
        assert weight.const_value is not None
        layers.append(Layer(node.name, node.op_type, weight.const_value.size))
    return layers


def activation_matmuls(model: ir.Model) -> list[str]:
    """Named top-level MatMul nodes with no constant input (attention scores and the like)."""
    return [
        node.name
        for node in model.graph
        if node.op_type == "MatMul" and node.name and not any(is_constant_weight(v) for v in node.inputs)
    ]


def svd_layers(model: ir.Model) -> list[Layer]:
    """Quantizable MatMul/Gemm layers with 2-D weights large enough for SvdStep."""
    out = []
    nodes = {node.name: node for node in model.graph}
    for layer in quantizable_layers(model):
        weight = nodes[layer.name].inputs[1]
        assert weight is not None and weight.const_value is not None
        matrix = layer.op_type in ("MatMul", "Gemm") and len(weight.const_value.shape) == 2
        if matrix and layer.parameters >= _SVD_MIN_ELEMENTS:
            out.append(layer)
    return out


def fake_quantized(model: ir.Model, name: str, per_channel: bool, output: bool) -> onnx.ModelProto:
    """A copy of model in which only node `name` sees int8 rounding of its weight and input activation.

    Args:
        model: The prepared model (left unchanged).
        name: The node to quantize.
        per_channel: One weight scale per output channel (else one per tensor).
        output: Also round the node's output (static QDQ quantizes outputs too; dynamic mode does not).
    """
    work = model.clone()
    node = next(n for n in work.graph if n.name == name)
    weight = node.inputs[1]
    assert weight is not None and weight.const_value is not None
    set_constant(weight, _round_trip(weight.const_value.numpy(), _channel_axis(node) if per_channel else None))
    x = node.inputs[0]
    if x is not None and x.const_value is None and x.dtype == ir.DataType.FLOAT:
        node.replace_input_with(0, _uint8_round_trip(work.graph, node, x, before=True))
    y = node.outputs[0]
    if output and y.dtype in (ir.DataType.FLOAT, None) and not y.is_graph_output():
        rounded = _uint8_round_trip(work.graph, node, y, before=False)
        for user, index in list(y.uses()):
            if user.name != f"{name}__proxy_q_out":
                user.replace_input_with(index, rounded)
    if work.opset_imports.get("", 0) < 11:
        work.opset_imports[""] = 11  # DynamicQuantizeLinear
    return ir.to_proto(work)


def _uint8_round_trip(graph: ir.Graph, node: ir.Node, value: ir.Value, *, before: bool) -> ir.Value:
    """Insert DynamicQuantizeLinear -> DequantizeLinear on value next to node; returns the rounded value."""
    tag = "in" if before else "out"
    quant = ir.node("DynamicQuantizeLinear", [value], num_outputs=3, name=f"{node.name}__proxy_q_{tag}")
    dequant = ir.node("DequantizeLinear", list(quant.outputs), name=f"{node.name}__proxy_dq_{tag}")
    if before:
        graph.insert_before(node, [quant, dequant])
    else:
        graph.insert_after(node, [quant, dequant])
    return dequant.outputs[0]


def _channel_axis(node: ir.Node) -> int:
    if node.op_type == "Gemm":
        attr = node.attributes.get("transB")
        return 0 if attr is not None and attr.as_int() else 1
    return 0 if node.op_type == "Conv" else -1


def _round_trip(w: np.ndarray, axis: int | None) -> np.ndarray:
    """Symmetric int8 quantize-dequantize, one scale per channel along axis (or one per tensor)."""
    if axis is None:
        peak = np.max(np.abs(w))
    else:
        reduce = tuple(i for i in range(w.ndim) if i != axis % w.ndim)
        peak = np.max(np.abs(w), axis=reduce, keepdims=True)
    scale = np.where(peak > 0, peak / 127.0, 1.0).astype(np.float32)
    return (np.clip(np.round(w / scale), -127, 127) * scale).astype(w.dtype)


class Scorer:
    """Runs a candidate model on the sensitivity samples and scores it against the original's outputs."""

    def __init__(self, reference: Runner, dataset: Dataset, threads: int) -> None:
        self.dataset = dataset
        self.threads = threads
        self.names = reference.output_names
        self.ref_out = [reference.run(feed) for feed in dataset.feeds]

    def loss(self, proto: onnx.ModelProto) -> tuple[float, float | None]:
        """(1 - worst output cosine, accuracy drop in points or None); raises CompressionError on failure."""
        runner = Runner(proto, threads=self.threads, what="compressed model")
        out = [runner.run(feed) for feed in self.dataset.feeds]
        meter = measure_agreement(self.names, self.ref_out, out)
        # Rank by float outputs when there are any: the exact agreement of an integer label output moves in
        # steps of one flipped label, which says little about how close a layer is to flipping one.
        floats = [o.cosine for o in meter.floating()] or [x.exact_agreement for x in meter.exact()]
        cosine = min(floats, default=1.0)
        labels = self.dataset.labels
        acc = accuracy(self.names, labels, self.ref_out, out) if labels is not None else None
        return max(0.0, 1.0 - cosine), None if acc is None else acc.drop_points


def measure(
    layers: Sequence[Layer],
    family: Literal["quantize", "prune", "svd"],
    build: Callable[[Layer], onnx.ModelProto],
    scorer: Scorer,
    work: Work,
) -> list[LayerSensitivity]:
    """Loss of each layer compressed alone, while the next probe's estimated time fits (the rest are left out)."""
    results = []
    for i, layer in enumerate(layers):
        if not work.fits():
            work.skipped(len(layers) - i - 1)  # and the rest
            break
        try:
            with work:
                loss, drop = scorer.loss(build(layer))
        except (CompressionError, ValueError, RuntimeError) as e:
            logger.info("sensitivity of %s (%s) not measured: %s", layer.name, family, e)
            continue
        results.append(
            LayerSensitivity(
                name=layer.name,
                op_type=layer.op_type,
                family=family,
                parameters=layer.parameters,
                loss=loss,
                accuracy_drop=drop,
            )
        )
    return results
