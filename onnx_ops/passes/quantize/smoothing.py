"""Activation smoothing before dynamic int8 (SmoothQuant, Xiao et al., 2023): outlier channels moved into weights.

Dynamic int8 quantizes each MatMul input at run time on one grid for the whole tensor, from its largest
magnitude. Transformer activations have a few channels far larger than the rest, so the grid is coarse for
every other channel: on paraphrase-MiniLM-L3-v2 this cost more than the weights' rounding did. With calibration
data, each channel j of an activation x read by constant-weight MatMuls gets a factor
``s_j = max|x_j|^alpha / max|W_j,:|^(1 - alpha)``; the MatMuls then read ``x / s`` and their weight rows are
multiplied by s. In float the model computes the same function; the int8 model's activation grid gets finer
and the weight's per-column grids absorb the outliers. The division goes into the node producing x where one
takes it for free (attention's context: V's weights, see smoothing_folds), else into one Mul inserted after x,
shared by every MatMul reading it; by default only where x has no more channels than those MatMuls have
outputs together, so the Mul costs little next to them.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np
import onnx
from onnx import helper, numpy_helper

from onnx_ops.capture import Session
from onnx_ops.passes._base import Feed
from onnx_ops.passes.quantize import smoothing_folds

__all__: list[str] = []  # package-private

ALPHA = 0.5  # migration strength: 0 leaves the activations, 1 moves all of their range into the weights
_FLOOR = 1e-5


def smooth(
    proto: onnx.ModelProto,
    feeds: Sequence[Feed],
    exclude: Iterable[str] = (),
    *,
    alpha: float = ALPHA,
    fold: bool = True,
    wide: bool = False,
) -> list[str]:
    """Smooth the inputs of the constant-weight MatMul/Gemm nodes of `proto` (in place).

    Args:
        proto: The float model.
        feeds: Calibration feeds (each channel's largest magnitude over them).
        exclude: Names of MatMul nodes to leave reading their original input (they stay in float).
        alpha: Migration strength.
        fold: Fold the factors into the activations' producers where one takes them (see smoothing_folds);
            kept only if the float model's outputs on the first feed stay the same, else Muls everywhere.
        wide: Also smooth an activation with more channels than its MatMuls have outputs together, where the
            factors cannot be folded: the Mul over it then costs time (an FFN's GELU output on MiniLM: its
            three Muls took the int8 model's CPU time up 4%, and the held-out cosine from 0.9984 to 0.9992).

    Returns:
        The activations smoothed.
    """
    groups = _groups(proto, set(exclude))
    if not groups or not feeds:
        return []
    original = onnx.ModelProto()
    if fold:
        original.CopyFrom(proto)
    folder = smoothing_folds.Folder(proto) if fold else None
    session = Session(proto, groups, threads=1, only_extra=True)
    peaks: dict[str, np.ndarray] = {}
    for feed in feeds:
        for name, value in session.run(feed).items():
            if name in groups:
                peak = np.abs(np.asarray(value, np.float64)).reshape(-1, value.shape[-1]).max(axis=0)
                peaks[name] = np.maximum(peaks.get(name, peak), peak)
    inits = {init.name: init for init in proto.graph.initializer}
    done: list[str] = []
    folded: list[str] = []
    for activation, nodes in groups.items():
        peak = peaks.get(activation)
        weights = [np.asarray(numpy_helper.to_array(inits[node.input[1]]), np.float64) for node in nodes]
        weights = [w.T if _rows(node) else w for node, w in zip(nodes, weights, strict=True)]  # [K, N]
        if peak is None or not np.all(np.isfinite(peak)) or peak.shape[0] != weights[0].shape[0]:
            continue
        weight_peak = np.max([np.abs(w).max(axis=1) for w in weights], axis=0)
        factor = np.where(
            (peak > 0) & (weight_peak > 0),
            np.maximum(peak, _FLOOR) ** alpha / np.maximum(weight_peak, _FLOOR) ** (1 - alpha),
            1.0,
        )
        if folder is not None and folder.fold(activation, 1.0 / factor, nodes):
            folded.append(activation)
        elif wide or peak.shape[0] <= sum(w.shape[1] for w in weights):
            name, inverse = f"{activation}_smoothed", f"{activation}_smoothing"
            proto.graph.initializer.append(numpy_helper.from_array((1.0 / factor).astype(np.float32), inverse))
            for node in nodes:
                node.input[0] = name
            _insert_after(proto.graph, activation, helper.make_node("Mul", [activation, inverse], [name], name=name))
        else:
            continue
        for node, weight in zip(nodes, weights, strict=True):
            scaled = weight * factor[:, None]
            inits[node.input[1]].CopyFrom(
                numpy_helper.from_array((scaled.T if _rows(node) else scaled).astype(np.float32), node.input[1])
            )
        done.append(activation)
    if folded and not _same_outputs(original, proto, feeds[0]):
        proto.CopyFrom(original)
        return smooth(proto, feeds, exclude, alpha=alpha, fold=False, wide=wide)
    return done


def _same_outputs(before: onnx.ModelProto, after: onnx.ModelProto, feed: Feed) -> bool:
    """True if both float models give the same outputs on the feed (up to float rounding)."""
    want, got = Session(before, ()).run(feed), Session(after, ()).run(feed)
    for name, value in want.items():
        if np.issubdtype(value.dtype, np.floating):
            scale = float(np.max(np.abs(value[np.isfinite(value)]), initial=0.0))
            if got[name].shape != value.shape or not np.allclose(got[name], value, rtol=1e-3, atol=1e-4 * scale):
                return False
    return True


def _groups(proto: onnx.ModelProto, exclude: set[str]) -> dict[str, list[onnx.NodeProto]]:
    """Float activations -> the MatMul/Gemm nodes reading them with a private constant 2-D float weight."""
    graph = proto.graph
    inits = {init.name: init for init in graph.initializer}
    uses: dict[str, int] = {}
    for node in graph.node:
        for name in node.input:
            uses[name] = uses.get(name, 0) + 1
    groups: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        plain = node.op_type == "MatMul" and len(node.input) == 2
        if not (plain or (node.op_type == "Gemm" and not _attribute(node, "transA"))) or node.name in exclude:
            continue
        weight = inits.get(node.input[1])
        if weight is None or len(weight.dims) != 2 or weight.data_type != onnx.TensorProto.FLOAT:
            continue
        if uses[weight.name] == 1 and node.input[0] not in inits:
            groups.setdefault(node.input[0], []).append(node)
    widths = {name: {int(inits[n.input[1]].dims[_rows(n)]) for n in nodes} for name, nodes in groups.items()}
    return {name: nodes for name, nodes in groups.items() if len(widths[name]) == 1}


def _attribute(node: onnx.NodeProto, name: str) -> int:
    return next((a.i for a in node.attribute if a.name == name), 0)


def _rows(node: onnx.NodeProto) -> int:
    """The axis of the weight's input channels: 1 for a Gemm with transB, else 0."""
    return 1 if node.op_type == "Gemm" and _attribute(node, "transB") else 0


def _insert_after(graph: onnx.GraphProto, tensor: str, node: onnx.NodeProto) -> None:
    """Insert node right after the producer of tensor (first when a graph input or initializer produces it)."""
    position = next((i + 1 for i, n in enumerate(graph.node) if tensor in n.output), 0)
    graph.node.insert(position, node)
