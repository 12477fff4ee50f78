"""Activation smoothing before dynamic int8 (SmoothQuant, Xiao et al., 2023): outlier channels moved into weights.

Dynamic int8 quantizes each MatMul input at run time on one grid for the whole tensor, from its range. Transformer
activations have a few channels far larger than the rest, so the grid is coarse for every other channel: on
paraphrase-MiniLM-L3-v2 this cost more than the weights' rounding did. With calibration data, each channel j of an
activation x read by constant-weight MatMul/Gemm nodes gets a factor ``s_j = max|x_j|^alpha / max|W_j,:|^(1 -
alpha)``; the nodes then read ``x / s`` and their weight rows are multiplied by s. In float the model computes the
same function; the int8 model's activation grid gets finer and the weight's per-column grids absorb the outliers.

The strength is chosen per activation, without quantizing anything: from per-channel statistics captured once on
the float model (range and mean square, ``onnx_ops.capture.channel_ranges``), the expected squared error of the
int8 layer outputs is estimated for each strength (and for no smoothing): uniform rounding noise of the run-time
activation grid (step = each calibration run's range of x / s over 255) through the scaled weights, plus that of
each weight column's grid (step = its largest magnitude over 127) through the activations' mean squares. The
mildest strength within TOLERANCE of the lowest estimate is applied, where it beats no smoothing. One session
run per calibration feed, no trial quantization: the quantizer runs once. The division goes into the node
producing x where one takes it for free (attention's context: V's weights, see smoothing_folds), else into one
Mul inserted before the readers, shared by them; by default only where x has no more channels than those nodes
have outputs together, so the Mul costs little.

The model is an onnx_ir model changed in place, weight by weight: each scaled weight replaces its (maybe mapped)
float original, and the quantizer that follows reads it from memory.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort

from onnx_ops.capture import ChannelRange, channel_ranges
from onnx_ops.job_files import save_sharing
from onnx_ops.passes._base import Feed
from onnx_ops.passes.quantize import smoothing_folds

__all__: list[str] = []  # package-private

ALPHAS = tuple(np.round(np.arange(0.3, 1.0, 0.05), 2))  # strengths weighed per activation
# The mildest strength whose estimate is within this share of the lowest is applied. On MiniLM's held-out
# sentences (cosine, smoothing auto / all): 0 -> 0.99840 / 0.99925, 0.05 -> 0.99847 / 0.99931, 0.1 -> 0.99845 /
# 0.99915, 0.2 -> 0.99843 (chosen on those same sentences: read these as one model's figures, not a validation).
TOLERANCE = 0.05
_FLOOR = 1e-5
_CHUNK_ELEMENTS = 1 << 22  # weight elements scaled at a time while weighing strengths


@dataclasses.dataclass
class Outcome:
    """What smoothing did, for the step's summary."""

    alphas: dict[str, float] = dataclasses.field(default_factory=dict)  # activation -> strength applied
    folded: list[str] = dataclasses.field(default_factory=list)
    ratios: list[float] = dataclasses.field(default_factory=list)  # estimated int8 error, smoothed / unsmoothed

    def summary(self) -> dict[str, str]:
        """The step summary's entries."""
        if not self.alphas:
            return {"smoothing": "none kept: no activation's estimated int8 error got smaller"}
        values = sorted(self.alphas.values())
        span = f"{values[0]}" if values[0] == values[-1] else f"{values[0]}-{values[-1]}"
        return {
            "smoothing": f"{len(values)} activations, alpha {span} chosen per activation "
            f"({len(self.folded)} folded into their producer)",
            "smoothing_estimate": f"estimated int8 error of their layers {float(np.mean(self.ratios)):.3f}x unsmoothed "
            "on average",
        }


@dataclasses.dataclass(frozen=True)
class Grid:
    """How the quantizer that follows rounds the weights (levels on each side of zero, per column or not)."""

    levels: float = 127.0
    per_channel: bool = True


def groups(model: ir.Model, exclude: Iterable[str] = ()) -> dict[str, list[ir.Node]]:
    """Float activations -> the MatMul/Gemm nodes reading them with a private constant 2-D float weight."""
    skip = set(exclude)
    found: dict[str, list[ir.Node]] = {}
    for node in model.graph:
        plain = node.op_type == "MatMul" and len(node.inputs) == 2
        gemm = node.op_type == "Gemm" and not node.attributes.get_int("transA", 0)
        if not (plain or gemm) or node.name in skip or node.domain not in ("", "ai.onnx"):
            continue
        data, weight = node.inputs[0], node.inputs[1]
        if data is None or weight is None or data.is_initializer() or not data.name:
            continue
        tensor = weight.const_value
        if tensor is None or not weight.is_initializer() or weight.is_graph_input() or len(weight.uses()) != 1:
            continue
        if tensor.dtype != ir.DataType.FLOAT or len(tensor.shape) != 2:
            continue
        found.setdefault(data.name, []).append(node)
    widths = {name: {_weight_shape(n)[0] for n in nodes} for name, nodes in found.items()}
    return {name: nodes for name, nodes in found.items() if len(widths[name]) == 1}


def statistics(
    model: ir.Model, names: Sequence[str], feeds: Sequence[Feed], folder: Path, *, share: bool = False
) -> dict[str, ChannelRange]:
    """Per-channel ranges of the named tensors over the feeds, from one ONNX Runtime session of the float model.

    The model is written to `folder` tensor by tensor with its weights in a data file, which ONNX Runtime maps
    (no serialized copy in memory); the files are removed afterwards. With `share` (no pass has changed a
    weight in place: the plan's first step) the weights mapped from a data file in `folder`, the job's own,
    are referred to there (onnx_ops.job_files.save_sharing): only the graph and the other weights are written.
    """
    path, graph_file = folder / "smoothing_float.onnx", folder / "smoothing_graph.onnx"
    data = folder / "smoothing_float.onnx.data"
    try:
        if share:
            save_sharing(model, path)
        else:
            ir.save(model, path, external_data=data.name, size_threshold_bytes=1024)
        proto = onnx.load(path, load_external_data=False)
        known = {o.name for o in proto.graph.output}
        proto.graph.output.extend(onnx.ValueInfoProto(name=name) for name in names if name not in known)
        onnx.save(proto, graph_file)
        del proto
        options = ort.SessionOptions()
        options.intra_op_num_threads, options.log_severity_level = 1, 3
        session = ort.InferenceSession(str(graph_file), options, providers=["CPUExecutionProvider"])
        return channel_ranges(_Runner(session), names, feeds)
    finally:
        for file in (path, graph_file, data):
            file.unlink(missing_ok=True)


class _Runner:
    """ONNX Runtime's session as the capture module runs one: feed in, outputs by name."""

    def __init__(self, session: ort.InferenceSession) -> None:
        self.session = session
        self.inputs = {i.name for i in session.get_inputs()}
        self.names = [o.name for o in session.get_outputs()]

    def run(self, feed: Feed) -> dict[str, np.ndarray]:
        values = self.session.run(None, {k: v for k, v in feed.items() if k in self.inputs})
        return dict(zip(self.names, values, strict=True))


def smooth(
    model: ir.Model,
    found: Mapping[str, list[ir.Node]],
    stats: Mapping[str, ChannelRange],
    *,
    grid: Grid = Grid(),
    wide: bool = False,
    alpha: float | None = None,
) -> Outcome:
    """Smooth the inputs of the grouped nodes of `model` in place (see the module's docstring).

    Args:
        model: The float model.
        found: Activation name -> the nodes reading it (``groups``).
        stats: Each activation's per-channel statistics (``statistics``).
        grid: The weights' int8 grids in the quantizer that follows.
        wide: Also smooth an activation with more channels than its nodes have outputs together, where the
            factors cannot be folded: the Mul over it then costs time (an FFN's GELU output on MiniLM: its
            three Muls took the int8 model's CPU time up 4%, and the held-out cosine from 0.9984 to 0.9992).
        alpha: One strength for every activation instead of the estimate's choice (always applied).
    """
    outcome = Outcome()
    for name, nodes in found.items():
        stat = stats.get(name)
        activation = nodes[0].inputs[0]
        weights = [_weight_kn(node) for node in nodes]
        if stat is None or activation is None or not stat.finite() or stat.high.shape[1] != weights[0].shape[0]:
            continue
        weight_peak = np.max([np.abs(w).max(axis=1) for w in weights], axis=0).astype(np.float64)
        peak = np.maximum(np.abs(stat.low), np.abs(stat.high)).max(axis=0)
        usable = (peak > 0) & (weight_peak > 0)
        peak, weight_peak = np.maximum(peak, _FLOOR), np.maximum(weight_peak, _FLOOR)

        def factor(strength: float) -> np.ndarray:
            return np.where(usable, peak**strength / weight_peak ** (1 - strength), 1.0)  # noqa: B023

        before = _estimate(stat, weights, np.ones_like(peak), grid)
        if alpha is None:
            scored = [(_estimate(stat, weights, factor(a), grid), float(a)) for a in ALPHAS]
            lowest = min(error for error, _ in scored)
            # The mildest strength within TOLERANCE of the lowest estimate: the estimate is flat near its minimum.
            best, strength = next((e, a) for e, a in scored if e <= lowest * (1 + TOLERANCE))
            if not best < before:
                continue
        else:
            strength, best = alpha, _estimate(stat, weights, factor(alpha), grid)
        scale = factor(strength)
        if smoothing_folds.fold(activation, 1.0 / scale, nodes):
            outcome.folded.append(name)
        elif wide or scale.shape[0] <= sum(w.shape[1] for w in weights):
            _insert_mul(model.graph, activation, 1.0 / scale, nodes)
        else:
            continue
        outcome.ratios.append(best / before if before > 0 else 1.0)
        for node, weight in zip(nodes, weights, strict=True):
            scaled = weight * scale[:, None].astype(np.float32)
            _set_weight(node, scaled)
        outcome.alphas[name] = strength
    return outcome


def _estimate(stat: ChannelRange, weights: list[np.ndarray], factor: np.ndarray, grid: Grid) -> float:
    """Expected squared error per row of the layers' int8 outputs with the activation divided by `factor`."""
    # The run-time grid covers each run's range (with zero): its squared step averaged over the feeds.
    high = np.maximum((stat.high / factor).max(axis=1), 0.0)
    low = np.minimum((stat.low / factor).min(axis=1), 0.0)
    activation_step_sq = float(np.mean(((high - low) / 255.0) ** 2))
    squares = factor**2
    error = 0.0
    for weight in weights:
        rows, columns = _row_squares_and_column_peaks(weight, factor)
        error += activation_step_sq / 12.0 * float(rows @ squares)
        steps = columns / grid.levels if grid.per_channel else np.full_like(columns, columns.max() / grid.levels)
        error += float(np.sum(steps**2)) / 12.0 * float(np.sum(stat.mean_square / squares))
    return error


def _row_squares_and_column_peaks(weight: np.ndarray, factor: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Sum of squares of each row of the unscaled [K, N] weight, and each column's peak once scaled by rows."""
    rows = np.einsum("kn,kn->k", weight, weight, dtype=np.float64)
    peaks = np.zeros(weight.shape[1], np.float64)
    step = max(1, _CHUNK_ELEMENTS // max(1, weight.shape[1]))
    for start in range(0, weight.shape[0], step):
        part = np.abs(weight[start : start + step]) * factor[start : start + step, None]
        np.maximum(peaks, part.max(axis=0), out=peaks)
    return rows, peaks


def _weight_shape(node: ir.Node) -> tuple[int, int]:
    """The weight's [K, N] shape (input channels first)."""
    weight = node.inputs[1]
    assert weight is not None and weight.const_value is not None
    k, n = weight.const_value.shape.numpy()
    return (n, k) if _transposed(node) else (k, n)


def _transposed(node: ir.Node) -> bool:
    return node.op_type == "Gemm" and bool(node.attributes.get_int("transB", 0))


def _weight_kn(node: ir.Node) -> np.ndarray:
    weight = node.inputs[1]
    assert weight is not None and weight.const_value is not None
    array = weight.const_value.numpy()
    return array.T if _transposed(node) else array


def _set_weight(node: ir.Node, kn: np.ndarray) -> None:
    weight = node.inputs[1]
    assert weight is not None
    array = np.ascontiguousarray(kn.T if _transposed(node) else kn, np.float32)
    weight.const_value = ir.tensor(array, name=weight.name)


def _insert_mul(graph: ir.Graph, activation: ir.Value, inverse: np.ndarray, readers: list[ir.Node]) -> None:
    """One Mul by `inverse` before the first reader; every reader reads its output instead of `activation`."""
    name = activation.name or ""
    constant = ir.Value(
        name=f"{name}_smoothing", type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape([inverse.size]),
        const_value=ir.tensor(inverse.astype(np.float32), name=f"{name}_smoothing"),
    )  # fmt: skip
    graph.register_initializer(constant)
    mul = ir.node("Mul", [activation, constant], name=f"{name}_smoothed")
    mul.outputs[0].name = f"{name}_smoothed"
    mul.outputs[0].type, mul.outputs[0].shape = activation.type, activation.shape
    graph.insert_before(readers[0], mul)
    for node in readers:
        node.replace_input_with(0, mul.outputs[0])
