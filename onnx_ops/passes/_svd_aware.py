"""Activation-aware low-rank factorization: whiten by the layer inputs' covariance, truncate, refit.

For a layer ``Y = X W + b`` with calibration inputs X (the student's) and targets Y (the teacher's layer
outputs), the factors minimise the output error, not the weight error. With centred statistics
``Sxx = Xc^T Xc``, ``Sxy = Xc^T Yc`` (no centring when the layer has no bias to refit) and the ridge
``lambda`` pulling towards the current weight W:

* ``W_ls = (Sxx + lambda I)^-1 (Sxy + lambda W)`` is the best full-rank weight, and ``Sxx + lambda I = L L^T``;
* for any W', ``||Xc W' - Yc||^2 + lambda ||W' - W||^2 = J(W_ls) + ||L^T (W_ls - W')||^2``, so the best rank-r W'
  is ``L^-T [L^T W_ls]_r``: the truncated SVD of the whitened weight, mapped back. The error it adds is the sum
  of the dropped whitened squared singular values (exactly the output error on the calibration inputs when
  lambda = 0);
* the second factor so obtained is the ridge least-squares fit to the teacher's outputs given the first, and
  the bias is refit as the mean output minus the mean input's product.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import tempfile
from collections.abc import Iterator, Sequence
from concurrent.futures import Executor
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import scipy.linalg

from onnx_ops.capture import Layer, LayerStats, Session
from onnx_ops.capture_files import ModelFile, write_proto
from onnx_ops.capture_targets import Targets
from onnx_ops.job_files import save_sharing
from onnx_ops.memory import release_memory
from onnx_ops.passes._base import Feed, constant_array, is_constant_weight, set_constant
from onnx_ops.passes._svd_graph import Candidate, attr, label
from onnx_ops.passes._svd_math import Spectrum, balance, decompose

__all__ = ["AwareLayer", "Fitter", "Whitened", "aware_layer", "levels", "shared_folder", "teacher_file", "whiten"]


@dataclasses.dataclass
class AwareLayer:
    """A layer activation-aware SVD can fit: the candidate, what to capture, and the bias refit with it.

    Attributes:
        candidate: The node and its weight.
        layer: Its input and output tensors for capture (the output after the bias, when there is one).
        bias: The constant bias vector refit with the factors (Gemm's C, or the Add's constant), or None.
        level: 1 + the deepest candidate upstream (sequential mode fits level by level).
    """

    candidate: Candidate
    layer: Layer
    bias: ir.Value | None
    level: int = 0


def aware_layer(c: Candidate) -> AwareLayer | str:
    """The layer to capture for candidate c, or why activation-aware SVD cannot handle it."""
    node = c.node
    if c.left:
        return "activation_aware handles MatMul(x, W), not a weight on the left"
    if node.op_type == "Gemm" and attr(node, "transA", 0):
        return "activation_aware does not handle Gemm with transA=1"
    x = node.inputs[0]
    if x is None or not x.name:
        return "the layer's input has no name to capture"
    k, n = c.matrix().shape
    bias, output = None, node.outputs[0]
    if node.op_type == "Gemm" and len(node.inputs) > 2 and node.inputs[2] is not None:
        bias = node.inputs[2] if attr(node, "beta", 1.0) != 0.0 else None
        if bias is not None and not _vector(bias, n):
            return "activation_aware needs Gemm's C to be a constant vector used only by this node"
    elif node.op_type == "MatMul":
        bias, output = _add_after(node, n)
    name = output.name or ""
    return AwareLayer(c, Layer(name=label(node), input=x.name, output=name, k=int(k), n=int(n)), bias)


def levels(graph: ir.Graph, targets: Sequence[AwareLayer]) -> None:
    """Set each target's level: 1 + the deepest target upstream of it."""
    by_node = {t.candidate.node: t for t in targets}
    depth: dict[ir.Value, int] = {}
    for node in graph:
        level = max((depth.get(v, 0) for v in node.inputs if v is not None), default=0)
        if node in by_node:
            level = by_node[node].level = level + 1
        for value in node.outputs:
            depth[value] = level


@dataclasses.dataclass
class Whitened:
    """One layer's whitened problem: the spectrum to truncate and what maps its factors back and refits them.

    Attributes:
        spectrum: The SVD of L^T W_ls (its tail from rank r on is the output error rank r adds).
        reference: ||Y||^2, the teacher's layer outputs' sum of squares on the calibration data.
        base: The undamped output error of W_ls (what even a full-rank fit leaves, e.g. upstream error).
    """

    spectrum: Spectrum
    reference: float
    base: float
    chol: np.ndarray
    sxx: np.ndarray
    sxy: np.ndarray
    syy: float
    means: tuple[np.ndarray, np.ndarray] | None  # (mean x, mean y) when the bias is refit
    source: tuple[LayerStats, np.ndarray, bool, float, str] | None = None  # whiten's arguments, for cross-validation

    def error(self, w: np.ndarray) -> float:
        """Squared output error on the calibration data of weight w [k, n] (with the best bias, if any)."""
        return max(float(np.sum(w * (self.sxx @ w)) - 2.0 * np.sum(w * self.sxy) + self.syy), 0.0)

    def factors(self, r: int, validate: bool = True) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """Balanced rank-r factors A [k, r], B [r, n] and the refit bias (None when the layer has none).

        B is already the (ridge) least-squares fit to the teacher's outputs given A: refitting it without the
        ridge fit the calibration rows better but held-out inputs worse (on ddddocr's 1024 x 8210 classifier,
        1 - cosine 0.0046 against 0.00012). With `validate` False, the damping is the spectrum's, not the
        cross-validated one.
        """
        damping = self.cross_validated(r) if validate else None
        if damping is not None and self.source is not None and damping != self.source[3]:
            stats, w, intercept, _, algorithm = self.source
            return whiten(stats, w, intercept, damping, algorithm, folds=False).factors(r)
        a_white, b = self.spectrum.factors(r)
        a = scipy.linalg.solve_triangular(self.chol, a_white, trans="T", lower=True)  # L^T A = A_white
        a, b = balance(a, b)
        bias = None if self.means is None else self.means[1] - (self.means[0] @ a) @ b
        return a, b, bias

    def cross_validated(self, r: int) -> float | None:
        """The damping whose rank-r fit on one fold of the feeds best predicts the other, or None without folds.

        The grid is ``damping * 10^j``, j = -1..2, and the folds are the even and odd calibration feeds. With
        few calibration rows for a wide layer, the inputs' covariance is poorly known in most directions and a
        lightly damped whitening keeps the directions that matter on the calibration data only.
        """
        if self.source is None or len(self.source[0].folds) != 2:
            return None
        stats, w, intercept, damping, algorithm = self.source
        grid = [damping * 10.0**j for j in range(-1, 3)] if damping > 0 else [0.0]
        scores = []
        for lam in grid:
            score = 0.0
            for train, test in zip(stats.folds, stats.folds[::-1], strict=True):
                a, b, bias = whiten(train, w, intercept, lam, algorithm, folds=False).factors(r)
                score += test.squared_error(np.vstack([a @ b, np.zeros((1, b.shape[1])) if bias is None else bias]))
            scores.append(score)
        return grid[int(np.argmin(scores))]


def whiten(
    stats: LayerStats, w: np.ndarray, intercept: bool, damping: float, algorithm: str = "gram", folds: bool = True
) -> Whitened:
    """The whitened problem of a layer with current weight w [k, n] from its captured statistics.

    Args:
        stats: X^T X, X^T Y, Y^T Y with a trailing ones column on X (see onnx_ops.capture).
        w: The current weight (alpha and transB folded in), what the ridge pulls towards.
        intercept: Whether the layer has a bias to refit (then the statistics are centred).
        damping: Ridge relative to the mean of diag(Sxx).
        algorithm: How the whitened matrix is decomposed (see _svd_math.decompose).
        folds: When the statistics have two folds, choose the damping of each rank's factors by
            cross-validation (Whitened.cross_validated); the spectrum stays the one at ``damping``.
    """
    k, rows = w.shape[0], max(stats.rows, 1)
    sxx, sxy, syy = stats.xtx[:k, :k], stats.xty[:k], float(stats.yty.sum())
    means = None
    if intercept:
        mx, my = stats.xtx[-1, :k] / rows, stats.xty[-1] / rows
        sxx, sxy, syy = sxx - rows * np.outer(mx, mx), sxy - rows * np.outer(mx, my), syy - rows * float(my @ my)
        means = (mx, my)
    sxx = (sxx + sxx.T) / 2
    scale = max(float(np.mean(np.diag(sxx))), 1e-300)
    w64 = np.asarray(w, np.float64)
    chol, w_ls = _ridge(sxx, sxy, w64, damping * scale, scale)
    spectrum = decompose(chol.T @ w_ls, algorithm)
    result = Whitened(spectrum, float(stats.yty.sum()), 0.0, chol, sxx, sxy, syy, means)
    result.base = result.error(w_ls)
    if folds and len(stats.folds) == 2:
        result.source = (stats, w64, intercept, damping, algorithm)
    return result


class Fitter:
    """Captures the statistics of activation-aware layers: the teacher's outputs against the student's inputs.

    The teacher runs once, when the Fitter is made: its layer outputs for every capture run to come (``groups``,
    in the order ``whiten`` is called) are written beside ``folder/targets.bin`` (onnx_ops.capture_targets).
    Each capture run then runs only the student, from the IR model as it is (no proto copy of it). With `share`
    (the job's folder, whose data file holds the model's weights unchanged: svd is the plan's first step), the
    student is written there referring to those weights: only the graph and the new factors are written.
    """

    def __init__(
        self,
        teacher: Path,
        groups: Sequence[Sequence[AwareLayer]],
        feeds: Sequence[Feed],
        folder: Path,
        pool: Executor | None = None,
        share: Path | None = None,
    ) -> None:
        self.feeds = list(feeds)
        self.share = None if share is None else share / f"{folder.name}-student.onnx"
        self.groups = [list(group) for group in groups]
        self.pool = pool
        layers = [[t.layer for t in group] for group in self.groups]
        # The whole teacher, as capture ran it: a graph cut after the layers may be optimized differently by ONNX
        # Runtime (its outputs then differ by round-off).
        session = Session(teacher, [la.output for group in layers for la in group])
        self.recorded = Targets.record(session, layers, self.feeds, folder / "targets.bin")
        del session
        release_memory()

    def whiten(self, model: ir.Model, group: int, damping: float, algorithm: str) -> list[Whitened]:
        """One capture run of the student `model` and the whitened problem of every target in groups[group]."""
        targets, folds = self.groups[group], 2 if len(self.feeds) >= 4 else 1
        inputs = [t.layer.input for t in targets]
        if self.share is None:
            session = Session(model, inputs, only_extra=True)
        else:
            try:
                session = Session(save_sharing(model, self.share), inputs, only_extra=True)
            finally:
                _remove(self.share)
        stats, _ = self.recorded.capture(session, group, self.feeds, folds=folds)
        del session
        self.recorded.drop(group)

        def one(t: AwareLayer) -> Whitened:
            return whiten(stats[t.layer.name], t.candidate.matrix(), t.bias is not None, damping, algorithm)

        return list(self.pool.map(one, targets)) if self.pool else [one(t) for t in targets]


@contextlib.contextmanager
def teacher_file(
    model: ir.Model, teacher: onnx.ModelProto | None, share: Path | None, workdir: Path
) -> Iterator[tuple[Path, Path]]:
    """The teacher as a file whose weights ONNX Runtime maps, and a scratch folder, both removed on exit.

    The teacher is `teacher` when given, else `model` as it is now (before the pass changes it). With `share`
    (see shared_folder), the file refers to the weights where they are: only the graph is written. Otherwise
    the weights are written once.
    """
    with tempfile.TemporaryDirectory(prefix="svd-", dir=workdir) as name:
        folder = Path(name)
        if teacher is not None:
            yield write_proto(teacher, folder / "teacher.onnx"), folder
        elif share is not None:
            path = share / f"{folder.name}-teacher.onnx"  # beside the job's data file, which it refers to
            try:
                yield save_sharing(model, path), folder
            finally:
                _remove(path)
        else:
            yield ModelFile(model, folder, "teacher.onnx").path, folder


def shared_folder(source: Path | None, workdir: Path) -> Path | None:
    """`workdir` when the model's weights are mapped, unchanged, from the job's file `source` there, else None."""
    return workdir if source is not None and source.resolve().parent == workdir.resolve() else None


def _remove(path: Path) -> None:
    """Remove a model file written by save_sharing and its data file."""
    path.unlink(missing_ok=True)
    path.with_name(f"{path.name}.data").unlink(missing_ok=True)


def set_bias(graph: ir.Graph, target: AwareLayer, bias: np.ndarray, dtype: ir.DataType) -> ir.Value | None:
    """Store the refit bias: into the Add's constant (returns None), or as Gemm's new C value (returned)."""
    assert target.bias is not None
    shape = tuple(constant_array(target.bias).shape)
    array = bias.astype(dtype.numpy()).reshape(shape)
    if target.candidate.node.op_type != "Gemm":
        set_constant(target.bias, array)
        return None
    name = f"{target.bias.name}_svd"
    value = ir.val(name, dtype, array.shape, const_value=ir.tensor(array, name=name))
    graph.register_initializer(value)
    return value


def _ridge(
    sxx: np.ndarray, sxy: np.ndarray, w: np.ndarray, ridge: float, scale: float
) -> tuple[np.ndarray, np.ndarray]:
    """Cholesky factor L of Sxx + ridge I and W_ls; a tiny extra ridge when Sxx is singular and ridge is 0."""
    k = sxx.shape[0]
    for extra in (0.0, 1e-10, 1e-7, 1e-4):
        gram = sxx + (ridge + extra * scale) * np.eye(k)
        try:
            chol = np.linalg.cholesky(gram)
        except np.linalg.LinAlgError:
            continue
        w_ls = scipy.linalg.cho_solve((chol, True), sxy + (ridge + extra * scale) * w)
        return chol, w_ls
    raise np.linalg.LinAlgError("the inputs' covariance is not positive definite")


def _vector(value: ir.Value, n: int) -> bool:
    """A constant float tensor holding n values along its last axis, used by one node."""
    if not is_constant_weight(value) or value.const_value is None or len(value.uses()) != 1:
        return False
    shape = constant_array(value).shape
    return bool(shape) and shape[-1] == n and math.prod(shape) == n and value.const_value.dtype.is_floating_point()


def _add_after(node: ir.Node, n: int) -> tuple[ir.Value | None, ir.Value]:
    """The constant bias of an Add that alone reads the MatMul's output, and that Add's output."""
    out = node.outputs[0]
    uses = list(out.uses())
    if len(uses) != 1 or out.is_graph_output():
        return None, out
    add = uses[0].node
    if add.op_type != "Add" or add.domain != "" or len(add.inputs) != 2:
        return None, out
    other = add.inputs[1 - uses[0].idx]
    if other is None or not _vector(other, n):
        return None, out
    return other, add.outputs[0]
