"""Activation capture for layer-wise reconstruction: teacher outputs against student inputs, streamed.

This is the one capture API of every data-aware pass (distill, activation-aware pruning masks,
activation-aware SVD, error-compensating int8 rounding). The teacher is the model before the plan and the
student the partly compressed one. Both run in ONNX Runtime on the same calibration feeds, with the tensors
of interest added as extra graph outputs of a copy of each model. Per layer, the student's input
activations X and the teacher's layer output Y are reduced on the fly to the sufficient statistics of
least squares, X^T X, X^T Y and the squares of Y, with a column of ones appended to X for the bias. No
activation is kept past the feed that produced it, so memory depends on the layers' widths, not on the
amount of data.

Row masks: a transformer's batch is padded, and the rows of its padding tokens (attention mask 0) never
reach the outputs the user reads, yet they would be most of the captured rows. When a feed holds a 0/1
integer input of shape [batch, seq] (``row_mask``: found among the feeds, or named by the caller), only the
rows where it is 1 are captured for every activation whose leading dimensions are exactly [batch, seq]; the
model-output error is measured on those positions too. Other activations (e.g. after pooling) keep all rows.

Rows of X and Y:

* MatMul/Gemm (``Layer.conv`` is None): every leading dimension flattened; X is [rows, k], Y [rows, n].
* Conv (``Layer.conv`` set, see ``onnx_ops.im2col``): at most ``positions`` output positions sampled per
  feed; X holds the input patches there (im2col, [rows, Cin/groups * prod(kernel)]) and Y the teacher's
  Conv output (bias included) at the same positions. ``k`` and ``n`` are per group. A grouped or
  depthwise Conv gets statistics per group: the arrays of its LayerStats have a leading group axis.

Usage::

    layers = [Layer("fc1", input="h0", output="y1", k=64, n=128),
              Layer("conv1", input="x", output="c1", k=3 * 9, n=16, conv=ConvGeometry.from_attributes(...))]
    stats, error = capture(teacher, student, layers, feeds)   # student X against teacher Y
    stats, _ = capture(model, None, layers, feeds)            # the model's own X and Y (one run per feed)
    stats["fc1"].xtx        # [k + 1, k + 1]: the Hessian of GPTQ, the covariance of activation-aware SVD
    stats["fc1"].input_norms()  # [k]: ||x_j|| over the rows, for |W| * ||x|| (Wanda) pruning masks
"""

from __future__ import annotations

import dataclasses
import os
import tempfile
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort

from onnx_ops.capture_masks import AUTO, _feed_mask, find_row_mask, rows_of
from onnx_ops.capture_ranges import ChannelRange, Runs, channel_ranges
from onnx_ops.feeds import Feed
from onnx_ops.im2col import ConvGeometry, outputs_at, patches, sample_positions
from onnx_ops.large import payload_bytes, save_model

__all__ = [
    "AUTO",
    "FILE_BYTES",
    "ChannelRange",
    "ConvGeometry",
    "Feed",
    "Layer",
    "LayerStats",
    "OutputError",
    "Runs",
    "Session",
    "capture",
    "capture_rows",
    "channel_ranges",
    "find_row_mask",
    "output_error",
    "rows_of",
    "sample_rows",
]

FILE_BYTES = 64 << 20  # a Session over a model proto with at least this much weight data builds from a file


@dataclasses.dataclass(frozen=True)
class Layer:
    """Where one linear layer reads and writes, by tensor name (the same in the teacher and the student).

    Attributes:
        name: The layer's name for reports.
        input: The activation the layer multiplies by its weight (X).
        output: The tensor compared with the teacher: the product, or the bias Add's output.
        k: Input features (X's last dimension; a Conv's Cin/groups * prod(kernel)).
        n: Output features (Y's last dimension; a Conv's Cout/groups).
        conv: The Conv's geometry, or None for MatMul/Gemm.
    """

    name: str
    input: str
    output: str
    k: int
    n: int
    conv: ConvGeometry | None = None

    @property
    def groups(self) -> int:
        """Independent groups with their own statistics (a grouped Conv's groups, else 1)."""
        return self.conv.groups if self.conv is not None else 1


@dataclasses.dataclass
class LayerStats:
    """Sufficient statistics of least squares for one layer, in float64.

    A layer with groups > 1 (grouped Conv) has a leading [groups] axis on every array; ``group(i)``
    gives one group's 2-D statistics.

    Attributes:
        xtx: [k + 1, k + 1] X^T X of the student's inputs with a trailing column of ones.
        xty: [k + 1, n] X^T Y against the teacher's outputs.
        yty: [n] Sum of squares of each teacher output column.
        rows: Rows (tokens, samples or sampled positions) seen.
        folds: The same statistics per fold of the calibration feeds (empty unless capture was asked for folds).
    """

    xtx: np.ndarray
    xty: np.ndarray
    yty: np.ndarray
    rows: int = 0
    folds: list[LayerStats] = dataclasses.field(default_factory=list)

    @classmethod
    def merged(cls, parts: Sequence[LayerStats]) -> LayerStats:
        """The statistics of all parts together; with several parts, they are its ``folds``."""
        if len(parts) == 1:
            return parts[0]
        whole = cls(
            np.sum([p.xtx for p in parts], axis=0),
            np.sum([p.xty for p in parts], axis=0),
            np.sum([p.yty for p in parts], axis=0),
            sum(p.rows for p in parts),
        )
        whole.folds = list(parts)
        return whole

    @classmethod
    def empty(cls, k: int, n: int, groups: int = 1) -> LayerStats:
        """Zero statistics for a layer with k inputs and n outputs (per group when groups > 1)."""
        lead = (groups,) if groups > 1 else ()
        return cls(np.zeros((*lead, k + 1, k + 1)), np.zeros((*lead, k + 1, n)), np.zeros((*lead, n)))

    @property
    def groups(self) -> int:
        """Groups with their own statistics (1 for an ungrouped layer)."""
        return int(self.xtx.shape[0]) if self.xtx.ndim == 3 else 1

    def group(self, index: int) -> LayerStats:
        """One group's statistics as 2-D arrays (views; the layer itself when it has no groups)."""
        if self.xtx.ndim == 2:
            return self
        one = LayerStats(self.xtx[index], self.xty[index], self.yty[index], self.rows)
        one.folds = [fold.group(index) for fold in self.folds]
        return one

    def add(self, x: np.ndarray, y: np.ndarray) -> None:
        """Accumulate one batch: x [rows, k] student inputs, y [rows, n] teacher outputs ([rows, groups, .])."""
        if not x.shape[0]:
            return
        grouped = self.xtx.ndim == 3
        xg = x.reshape(x.shape[0], -1, x.shape[-1]).transpose(1, 0, 2)  # [groups, rows, k]
        yg = y.reshape(y.shape[0], -1, y.shape[-1]).transpose(1, 0, 2).astype(np.float64)
        x1 = np.empty((xg.shape[0], xg.shape[1], xg.shape[2] + 1))
        x1[..., :-1] = xg
        x1[..., -1] = 1.0
        x1t = x1.transpose(0, 2, 1)
        xtx, xty, yty = x1t @ x1, x1t @ yg, np.einsum("gij,gij->gj", yg, yg)
        self.xtx += xtx if grouped else xtx[0]
        self.xty += xty if grouped else xty[0]
        self.yty += yty if grouped else yty[0]
        self.rows += x.shape[0]

    def squared_error(self, weight: np.ndarray) -> float:
        """Sum of squared errors of X @ weight against Y, where weight is [k + 1, n] (last row: the bias).

        A grouped layer takes [groups, k + 1, n] and sums over its groups.
        """
        return float(np.sum(weight * (self.xtx @ weight)) - 2.0 * np.sum(weight * self.xty) + self.yty.sum())

    def input_norms(self) -> np.ndarray:
        """[k] (or [groups, k]) L2 norm of each input feature over all rows: sqrt(diag(X^T X))."""
        diagonal = np.diagonal(self.xtx, axis1=-2, axis2=-1)[..., :-1]
        norms: np.ndarray = np.sqrt(np.maximum(diagonal, 0.0))
        return norms


@dataclasses.dataclass(frozen=True)
class OutputError:
    """Relative squared error of the student's float outputs against the teacher's: sum (s - t)^2 / sum t^2."""

    squared_error: float
    reference: float

    @property
    def relative(self) -> float:
        """The relative squared error (0 when the teacher's outputs are all zero and match)."""
        return self.squared_error / self.reference if self.reference > 0 else float(self.squared_error > 0)


class Session:
    """An ONNX Runtime session over a copy of a model that also outputs the named intermediate tensors.

    With ``only_extra`` the copy outputs just those tensors and keeps only the nodes they depend on, so a
    tensor early in the graph costs only the part of the model before it (``model_outputs`` is then empty).
    A model given as a Path (a file with its weights in data files beside it, as ``onnx_ops.capture_files``
    writes them) is read without its weights: ONNX Runtime maps them from the data files instead of a copy. A
    model (proto or IR) with FILE_BYTES of weights or more is written to such a file first (then removed).
    """

    def __init__(
        self,
        model: onnx.ModelProto | ir.Model | Path,
        extra: Iterable[str],
        threads: int = 0,
        only_extra: bool = False,
    ) -> None:
        if isinstance(model, Path):
            self._open(model, extra, threads, only_extra)
        elif _weight_bytes(model) < FILE_BYTES:
            self._open(ir.to_proto(model) if isinstance(model, ir.Model) else model, extra, threads, only_extra)
        else:
            # A large model goes through a file (weights in an aligned data file, written a tensor at a time): a
            # copy, its serialized bytes and ONNX Runtime's copy of the weights would each take the model's size.
            with tempfile.TemporaryDirectory(prefix="onnx-session-") as folder:
                path = Path(folder) / "model.onnx"
                if isinstance(model, ir.Model):
                    ir.save(model, path, external_data="model.onnx.data", size_threshold_bytes=1024, alignment=1 << 16)
                else:
                    save_model(model, path, external_data=True)
                self._open(path, extra, threads, only_extra)
            # what ONNX Runtime mapped stays valid once the files are gone

    def _open(self, model: onnx.ModelProto | Path, extra: Iterable[str], threads: int, only_extra: bool) -> None:
        if isinstance(model, Path):  # a file whose weights ONNX Runtime maps from its data file: no copy of them
            copy = onnx.load(model, load_external_data=False)
        else:
            copy = onnx.ModelProto()
            copy.CopyFrom(model)
        wanted = list(dict.fromkeys(extra))
        if only_extra:
            _keep_ancestors(copy.graph, wanted)
        outputs = {o.name for o in copy.graph.output}
        self.model_outputs = [o.name for o in copy.graph.output]
        for name in wanted:
            if name not in outputs:
                copy.graph.output.append(onnx.ValueInfoProto(name=name))
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.log_severity_level = 3
        if isinstance(model, Path):
            self.session = _file_session(copy, model, options)
        else:
            data = copy.SerializeToString()
            del copy
            self.session = ort.InferenceSession(data, options, providers=["CPUExecutionProvider"])
        self.names = [o.name for o in self.session.get_outputs()]

    def run(self, feed: Feed) -> dict[str, np.ndarray]:
        """Run on one feed (inputs the model does not have are left out); every output by name."""
        inputs = {i.name for i in self.session.get_inputs()}
        values = self.session.run(None, {k: v for k, v in feed.items() if k in inputs})
        return dict(zip(self.names, values, strict=True))


def _weight_bytes(model: onnx.ModelProto | ir.Model) -> int:
    """The bytes of a model's weights (main graph's initializers for IR; every tensor for a proto)."""
    if isinstance(model, onnx.ModelProto):
        return payload_bytes(model)
    return sum(v.const_value.nbytes for v in model.graph.initializers.values() if v.const_value is not None)


def _file_session(graph: onnx.ModelProto, path: Path, options: ort.SessionOptions) -> ort.InferenceSession:
    """A session over a weightless `graph` whose weights are in the data files beside `path` (written there)."""
    handle, name = tempfile.mkstemp(suffix=".onnx", prefix=".session-", dir=path.parent)
    try:
        with os.fdopen(handle, "wb") as f:
            f.write(graph.SerializeToString())
        return ort.InferenceSession(name, options, providers=["CPUExecutionProvider"])
    finally:
        os.unlink(name)


def _keep_ancestors(graph: onnx.GraphProto, wanted: list[str]) -> None:
    """Make the wanted tensors the graph's only outputs and drop every node they do not depend on."""
    needed = set(wanted)
    kept = []
    for node in reversed(graph.node):
        if needed.intersection(node.output):
            kept.append(node)
            needed.update(_node_inputs(node))
    del graph.output[:]
    kept.reverse()
    del graph.node[:]
    graph.node.extend(kept)


def _node_inputs(node: onnx.NodeProto) -> set[str]:
    """A node's inputs, with every name its subgraphs (If, Loop, Scan) read from the enclosing scope."""
    names = set(node.input)
    for attribute in node.attribute:
        for sub in [attribute.g] if attribute.HasField("g") else list(attribute.graphs):
            for inner in sub.node:
                names |= _node_inputs(inner)
    return names


def capture(
    teacher: onnx.ModelProto | ir.Model | Session,
    student: onnx.ModelProto | ir.Model | None,
    layers: Sequence[Layer],
    feeds: Sequence[Feed],
    *,
    threads: int = 0,
    positions: int = 256,
    seed: int = 0,
    model_error: bool = True,
    row_mask: str | None = AUTO,
    folds: int = 1,
) -> tuple[dict[str, LayerStats], OutputError]:
    """Run teacher and student on every feed and reduce each layer's activations to LayerStats.

    Args:
        teacher: The model whose layer outputs are the targets, or a Session over it that outputs them
            (built once, it serves every call; with student None it must also output the layer inputs).
        student: The model whose layer inputs are the regressors (same tensor names as the teacher; an IR
            model is not converted to a proto when it is large, see Session), or None to take the inputs from
            the teacher too (one run per feed).
        layers: The layers to capture.
        feeds: Calibration feeds, one dict per run; both models see the same feed, so rows align.
        threads: ONNX Runtime intra-op threads (0: its default).
        positions: Conv layers: output positions sampled per feed (all of them when there are fewer).
        seed: Seed of the sampled positions (the same feeds and seed sample the same positions).
        model_error: Also measure the student's model outputs; False runs only the part of each model the
            layers need (faster for layers early in the graph) and returns a zero OutputError.
        row_mask: The feeds' input whose 1s mark the rows to capture (an attention mask), AUTO to find it
            with find_row_mask, or None to capture every row.
        folds: With more than 1, each layer's statistics are also kept per fold of the feeds (feed i in
            fold i % folds), for cross-validation: see LayerStats.folds.

    Returns:
        Statistics per layer name, and the error of the student's model outputs on these feeds (zero
        when student is None).
    """
    wanted = [la.output for la in layers] + ([la.input for la in layers] if student is None else [])
    only = not model_error or student is None
    teacher_run = teacher if isinstance(teacher, Session) else Session(teacher, wanted, threads, only)
    student_run = None
    if student is not None:
        student_run = Session(student, (layer.input for layer in layers), threads, not model_error)
    parts = {la.name: [LayerStats.empty(la.k, la.n, la.groups) for _ in range(folds)] for la in layers}
    error = [0.0, 0.0]
    mask_name = find_row_mask(feeds) if row_mask == AUTO else row_mask
    for index, feed in enumerate(feeds):
        target = teacher_run.run(feed)
        current = student_run.run(feed) if student_run is not None else target
        rng = np.random.default_rng([seed, index])
        mask = _feed_mask(feed, mask_name)
        for layer in layers:
            x, y = _rows(layer, current[layer.input], target[layer.output], positions, rng, mask)
            parts[layer.name][index % folds].add(x, y)
        if student_run is not None and model_error:
            _add_output_error(error, teacher_run.model_outputs, target, current, mask)
    stats = {name: LayerStats.merged(fold) for name, fold in parts.items()}
    return stats, OutputError(error[0], error[1])


def _rows(
    layer: Layer,
    x: np.ndarray,
    y: np.ndarray,
    positions: int,
    rng: np.random.Generator,
    mask: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """A layer's regressor and target rows from one feed's activations ([rows, k], or [rows, groups, k])."""
    if layer.conv is None:
        if mask is not None and x.shape[:-1] == mask.shape and y.shape[:-1] == mask.shape:
            return x[mask].reshape(-1, layer.k), y[mask].reshape(-1, layer.n)
        return x.reshape(-1, layer.k), y.reshape(-1, layer.n)
    expected = layer.conv.output_shape(tuple(x.shape[2:]))
    if tuple(y.shape[2:]) != expected or x.shape[0] != y.shape[0]:
        raise ValueError(f"Conv {layer.name!r}: output shape {y.shape} does not match input {x.shape}")
    sampled = sample_positions(y.shape[0], expected, positions, rng)
    return patches(x, layer.conv, sampled), outputs_at(y, sampled, layer.conv.groups)


def output_error(
    teacher: onnx.ModelProto | ir.Model | Session,
    student: onnx.ModelProto | ir.Model,
    feeds: Sequence[Feed],
    *,
    threads: int = 0,
    row_mask: str | None = AUTO,
) -> OutputError:
    """Relative squared error of the student's float outputs against the teacher's on these feeds.

    Outputs of shape [batch, seq, ...] count only the positions the row mask keeps (see capture).
    """
    return capture(teacher, student, [], feeds, threads=threads, row_mask=row_mask)[1]


def _add_output_error(
    total: list[float], names: list[str], target: Feed, current: Feed, mask: np.ndarray | None
) -> None:
    for name in names:
        t, s = target[name], current[name]
        if not np.issubdtype(t.dtype, np.floating) or t.shape != s.shape:
            continue
        if mask is not None and t.shape[: mask.ndim] == mask.shape:
            t, s = t[mask], s[mask]
        t64 = t.astype(np.float64)
        finite = np.isfinite(t64)
        total[0] += float(np.sum((s.astype(np.float64)[finite] - t64[finite]) ** 2))
        total[1] += float(np.sum(t64[finite] ** 2))


def capture_rows(
    teacher: Session,
    student: onnx.ModelProto | ir.Model,
    student_names: Sequence[str],
    teacher_names: Sequence[str],
    feeds: Sequence[Feed],
    *,
    max_rows: int = 16384,
    seed: int = 0,
    row_mask: str | None = AUTO,
) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """The rows themselves (not their statistics) of some student and teacher tensors, for block-wise fits.

    Every tensor must have the same leading dimensions in a feed (e.g. [batch, seq, features]); the row mask
    applies as in capture. At most ``max_rows`` rows are kept, spread evenly over the feeds (a random sample
    of each feed's rows), so memory is bounded whatever the data.

    Returns:
        float32 [rows, features] per tensor name (a name in both lists is the teacher's under ``teacher:``
        + name), and the feed index of every row (for folds).
    """
    student_run = Session(student, student_names, only_extra=True)
    mask_name = find_row_mask(feeds) if row_mask == AUTO else row_mask

    def rows(index: int, feed: Feed) -> dict[str, np.ndarray]:
        current, target = student_run.run(feed), teacher.run(feed)
        mask = _feed_mask(feed, mask_name)
        found = {name: rows_of(current[name], mask) for name in student_names}
        return found | {f"teacher:{name}": rows_of(target[name], mask) for name in teacher_names}

    return sample_rows(rows, feeds, max_rows=max_rows, seed=seed)


def sample_rows(
    rows: Callable[[int, Feed], dict[str, np.ndarray]], feeds: Sequence[Feed], *, max_rows: int = 16384, seed: int = 0
) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """At most ``max_rows`` aligned rows of some tensors, spread evenly over the feeds (see capture_rows).

    Args:
        rows: Feed index and feed -> [rows, features] per tensor name, the same row count for every name.
        feeds: The feeds.
        max_rows: The cap.
        seed: Seed of each feed's random sample of rows.
    """
    per_feed = max(1, -(-max_rows // max(len(feeds), 1)))
    pieces: dict[str, list[np.ndarray]] = {}
    origin: list[np.ndarray] = []
    for index, feed in enumerate(feeds):
        found = rows(index, feed)
        counts = {len(part) for part in found.values()}
        if len(counts) != 1:
            raise ValueError(f"the tensors' rows do not align: {sorted(counts)} rows in one feed")
        count = counts.pop()
        keep = np.random.default_rng([seed, index]).permutation(count)[:per_feed]
        keep.sort()
        for name, part in found.items():
            pieces.setdefault(name, []).append(part[keep].astype(np.float32))
        origin.append(np.full(len(keep), index))
    arrays = {name: np.concatenate(parts) for name, parts in pieces.items()}
    return arrays, np.concatenate(origin) if origin else np.zeros(0, dtype=int)
