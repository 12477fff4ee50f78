"""Activation capture for layer-wise reconstruction: teacher outputs against student inputs, streamed.

This is the one capture API of every data-aware pass (distill, activation-aware pruning masks,
activation-aware SVD, error-compensating int8 rounding). The teacher is the model before the plan and the
student the partly compressed one. Both run in ONNX Runtime on the same calibration feeds, with the tensors
of interest added as extra graph outputs of a copy of each model. Per layer, the student's input
activations X and the teacher's layer output Y are reduced on the fly to the sufficient statistics of
least squares, X^T X, X^T Y and the squares of Y, with a column of ones appended to X for the bias. No
activation is kept past the feed that produced it, so memory depends on the layers' widths, not on the
amount of data. The records are in ``capture_stats`` (Layer, LayerStats, OutputError), the row masks in
``capture_masks``; this module re-exports them.

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

import os
import tempfile
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort

from onnx_ops.capture_graph import keep_ancestors
from onnx_ops.capture_masks import AUTO, _feed_mask, find_row_mask, rows_of
from onnx_ops.capture_ranges import ChannelRange, Runs, channel_ranges
from onnx_ops.capture_sample import sample_rows
from onnx_ops.capture_stats import Layer, LayerStats, OutputError
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
            keep_ancestors(copy.graph, wanted)
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
