"""Low-rank factorization of constant MatMul/Gemm weights: W[K,N] ~ A[K,r] @ B[r,N].

``MatMul(x, W)`` becomes ``MatMul(MatMul(x, A), B)``, ``MatMul(W, x)`` becomes ``MatMul(A, MatMul(B, x))``, and
``Gemm`` becomes MatMuls plus an optional Transpose (transA) and Add (bias), with transB and alpha folded into the
factors. The singular values are split evenly (sqrt) between A and B so both factors have a similar range, which
keeps later int8 quantization accurate.

The rank comes from the step: ``rank``, ``rank_ratio``, or the smallest rank holding ``energy`` of ||W||_F^2. Large
matrices get a randomized truncated SVD (``auto``), the rest LAPACK's gesdd. Matrices are factorized one per core,
each with one BLAS thread, when threadpoolctl is installed (otherwise serially with BLAS's own threads).
Only the main graph is rewritten; weights inside If/Loop bodies are left alone.
"""

from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import dataclasses
import logging
import math
import os
from collections.abc import Callable

import numpy as np
import onnx_ir as ir

from onnx_ops.errors import PlanError
from onnx_ops.passes._base import PassContext, PassLog, constant_array, is_constant_weight, non_finite_reason
from onnx_ops.plan import SvdStep
from onnx_ops.report import LayerChange

__all__ = ["SvdFactorizePass"]

logger = logging.getLogger(__name__)

_FLOAT_TYPES = (ir.DataType.FLOAT, ir.DataType.DOUBLE, ir.DataType.FLOAT16)
_RECURRENT = ("LSTM", "GRU", "RNN")
# auto: below this min(K, N) an exact SVD takes milliseconds, so randomized buys nothing.
_AUTO_MIN_DIM = 512
# auto: randomized only when the rank is at most this fraction of min(K, N); beyond it, exact is as fast.
_AUTO_MAX_FRACTION = 0.25
_OVERSAMPLE = 10
_POWER_ITERATIONS = 2


class SvdFactorizePass(ir.passes.InPlacePass):
    """Replace large constant MatMul/Gemm weights by two low-rank factors where that saves parameters."""

    def __init__(self, step: SvdStep, context: PassContext) -> None:
        super().__init__()
        self.step = step
        self.context = context
        self.log = PassLog()

    def precheck(self, model: ir.Model) -> None:
        """Raise PlanError when no node of the main graph has a weight this step could factorize."""
        others: collections.Counter[str] = collections.Counter()
        reasons = []
        for node in model.graph:
            found = _candidate(node, self.step)
            if isinstance(found, _Candidate):
                return
            if isinstance(found, str):
                reasons.append(f"{_label(node)}: {found}")
            elif any(is_constant_weight(v) and len(v.const_value.shape) >= 2 for v in node.inputs if v):  # type: ignore[union-attr]
                others[node.op_type] += 1
        seen = [f"{op} x{n}" for op, n in sorted(others.items())] + reasons[:3]
        raise PlanError(
            f"svd: no {' or '.join(self.step.op_types)} with a constant 2-D weight of at least "
            f"{self.step.min_elements} elements (found: {'; '.join(seen) or 'no constant weights'})"
        )

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        """Factorize every eligible weight of the main graph; log each change and each skip."""
        graph = model.graph
        groups: dict[ir.Value, list[_Candidate]] = {}
        for node in list(graph):
            found = _candidate(node, self.step)
            if isinstance(found, str):
                self.log.skip(_label(node), found)
            elif found is not None:
                groups.setdefault(found.weight, []).append(found)
        jobs = list(groups.items())
        limits, workers = _blas_threads()
        with limits, concurrent.futures.ThreadPoolExecutor(workers) as pool:
            results = list(pool.map(self._solve, jobs))
        names = _Names(graph)
        for (weight, candidates), result in zip(jobs, results, strict=True):
            if isinstance(result, str):
                for c in candidates:
                    self.log.skip(_label(c.node), result)
            else:
                self.log.layers.append(self._apply(graph, weight, candidates, result, names))
        self._summarize()
        return ir.passes.PassResult(model, modified=bool(self.log.layers))

    def _solve(self, job: tuple[ir.Value, list[_Candidate]]) -> _Factors | str:
        weight, candidates = job
        return _sharing_problem(weight, candidates) or _factorize(candidates[0].matrix(), self.step)

    def _apply(
        self, graph: ir.Graph, weight: ir.Value, candidates: list[_Candidate], result: _Factors, names: _Names
    ) -> LayerChange:
        """Add the factors once, rewrite every node that uses the weight, and describe the change."""
        dtype = weight.const_value.dtype  # type: ignore[union-attr]
        a_val = _initializer(graph, names.fresh(f"{weight.name}_svd_a"), result.a, dtype)
        b_val = _initializer(graph, names.fresh(f"{weight.name}_svd_b"), result.b, dtype)
        for c in candidates:
            _rewrite(graph, c, a_val, b_val, names)
        (k, r), n, label = result.a.shape, result.b.shape[1], _label(candidates[0].node)
        note = f"energy kept {result.energy:.3f} ({result.algorithm})"
        if len(candidates) > 1:
            note += f"; factors shared by {len(candidates)} nodes"
        logger.debug("svd: %s %dx%d -> rank %d, rel error %.4g", label, k, n, r, result.rel_error)
        return LayerChange(
            name=label, op_type=candidates[0].node.op_type, weight=weight.name or "",
            shape_before=[k, n], shape_after=[k, r, r, n], params_before=k * n, params_after=r * (k + n),
            rank=r, rel_error=result.rel_error, note=note,
        )  # fmt: skip

    def _summarize(self) -> None:
        before = sum(c.params_before for c in self.log.layers)
        after = sum(c.params_after for c in self.log.layers)
        self.log.summary.update(
            matrices_factorized=len(self.log.layers), matrices_skipped=len(self.log.skipped),
            params_before=before, params_after=after, params_saved=before - after,
            worst_rel_error=max((c.rel_error or 0.0 for c in self.log.layers), default=0.0),
        )  # fmt: skip
        logger.info("svd: factorized %d matrices, skipped %d, saved %d parameters",
                    len(self.log.layers), len(self.log.skipped), before - after)  # fmt: skip


@dataclasses.dataclass
class _Candidate:
    """A node whose constant weight may be factorized; ``left`` means MatMul(W, x)."""

    node: ir.Node
    weight: ir.Value
    left: bool = False

    @property
    def key(self) -> tuple[bool, float, int]:
        """What the effective matrix depends on besides the weight (shared weights must agree on it)."""
        return self.left, _attr(self.node, "alpha", 1.0), int(_attr(self.node, "transB", 0))

    def matrix(self) -> np.ndarray:
        """The matrix to factorize, with Gemm's transB and alpha folded in, in a float type LAPACK takes."""
        w = constant_array(self.weight)
        w = w.astype(np.float64 if w.dtype == np.float64 else np.float32)
        _, alpha, trans_b = self.key
        w = w.T if trans_b else w
        return np.ascontiguousarray(w * np.asarray(alpha, w.dtype) if alpha != 1.0 else w)


@dataclasses.dataclass
class _Factors:
    a: np.ndarray
    b: np.ndarray
    energy: float
    rel_error: float
    algorithm: str


class _Names:
    """Fresh value/node names that clash with nothing already in the graph."""

    def __init__(self, graph: ir.Graph) -> None:
        self._used = {v.name for v in graph.inputs} | set(graph.initializers)
        self._used |= {n.name for n in graph} | {v.name for n in graph for v in n.outputs}

    def fresh(self, base: str) -> str:
        name, i = base, 1
        while name in self._used:
            name, i = f"{base}_{i}", i + 1
        self._used.add(name)
        return name


def _blas_threads() -> tuple[contextlib.AbstractContextManager[object], int]:
    """One BLAS thread per matrix and one matrix per core, when threadpoolctl can set the BLAS thread count.

    Measured on 2 shared cores: OpenBLAS's own threads make these mid-sized LAPACK calls up to 4x slower
    (synchronization, oversubscription), while one SVD per core is about 2x faster than serial work.
    """
    try:
        import threadpoolctl  # optional: without it BLAS keeps its own threads
    except ImportError:
        return contextlib.nullcontext(), 1
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return threadpoolctl.threadpool_limits(limits=1, user_api="blas"), cores


def _label(node: ir.Node) -> str:
    return node.name or (node.outputs[0].name or node.op_type)


def _attr(node: ir.Node, name: str, default: float) -> float:
    attr = node.attributes.get(name)
    return default if attr is None else attr.value


def _candidate(node: ir.Node, step: SvdStep) -> _Candidate | str | None:
    """A candidate, or the reason a weighted node is skipped, or None when the node holds no weight."""
    if node.op_type in _RECURRENT and node.domain == "":
        return "recurrent (LSTM/GRU/RNN) weights are not factorized by svd"
    if node.op_type not in step.op_types or node.domain != "" or len(node.inputs) < 2:
        return None
    x, w = node.inputs[0], node.inputs[1]
    if not is_constant_weight(w) and not is_constant_weight(x):
        return None  # e.g. attention's Q @ K^T: no weight
    if not is_constant_weight(w) and node.op_type == "Gemm":
        return "Gemm with a constant A and a variable B is not handled"
    c = _Candidate(node, w) if is_constant_weight(w) else _Candidate(node, x, left=True)  # type: ignore[arg-type]
    tensor, name = c.weight.const_value, c.weight.name
    assert tensor is not None
    if _label(node) in step.exclude_nodes:
        return "excluded by exclude_nodes"
    if len(tensor.shape) != 2:
        return f"weight '{name}' is {len(tensor.shape)}-D; only 2-D weights are factorized"
    if tensor.dtype not in _FLOAT_TYPES:
        return f"weight '{name}' is {tensor.dtype.name}, not float"
    if tensor.size < step.min_elements:
        return f"weight '{name}' has {tensor.size} elements < min_elements {step.min_elements}"
    return non_finite_reason(c.weight) or c


def _sharing_problem(weight: ir.Value, candidates: list[_Candidate]) -> str | None:
    # A weight that something else still reads would stay in the model next to its factors: more parameters.
    if len(weight.uses()) != len(candidates) or weight.is_graph_output():
        users = sorted({u.node.op_type for u in weight.uses()})
        return f"weight '{weight.name}' is also used by {', '.join(users)} nodes; factors would add parameters"
    if len({c.key for c in candidates}) > 1:
        return f"weight '{weight.name}' is shared by nodes with different side/alpha/transB"
    return None


def _factorize(w: np.ndarray, step: SvdStep) -> _Factors | str:
    """Balanced rank-r factors of w by the step's rank rule, or the reason w is left alone."""
    k, n = w.shape
    total = float(np.sum(np.square(w, dtype=np.float64)))  # ||W||_F^2: the energy of the full spectrum
    if not math.isfinite(total):
        return "weight has non-finite values"
    if total == 0.0:
        return "weight is all zeros"
    break_even = (k * n - 1) // (k + n)  # largest r with r * (K + N) < K * N
    target = _target_rank(step, min(k, n))
    if break_even < 1 or (target is not None and target > break_even):
        target = target or 1
        return f"rank {target} saves nothing for {k}x{n}"
    energy = step.effective_energy
    try:
        u, s, vt, algorithm = _decompose(w, target, energy, total, step.algorithm, break_even)
    except np.linalg.LinAlgError:  # LAPACK's SVD very rarely fails to converge
        return "the SVD did not converge for this weight"
    r = _pick_rank(s, target, energy, total)
    if r > break_even:
        needed = f"rank {r}" if r <= len(s) else f"rank > {len(s)}"
        return f"energy {energy:g} needs {needed}; rank {r} saves nothing for {k}x{n}"
    root = np.sqrt(s[:r])
    a, b = u[:, :r] * root, root[:, None] * vt[:r]
    rel_error = float(np.linalg.norm(w - a @ b) / math.sqrt(total))
    if step.max_rel_error is not None and rel_error > step.max_rel_error:
        return f"relative error {rel_error:.3g} at rank {r} exceeds max_rel_error {step.max_rel_error:g}"
    kept = float(np.sum(np.square(s[:r], dtype=np.float64)) / total)
    return _Factors(np.ascontiguousarray(a), np.ascontiguousarray(b), kept, rel_error, algorithm)


def _target_rank(step: SvdStep, full: int) -> int | None:
    if step.rank_ratio is not None:
        return min(full, math.ceil(step.rank_ratio * full))
    return None if step.rank is None else min(step.rank, full)


def _pick_rank(s: np.ndarray, target: int | None, energy: float | None, total: float) -> int:
    """Target rank, or the smallest rank holding the energy (len(s) + 1 when s does not reach it)."""
    if target is not None:
        return min(target, len(s))
    assert energy is not None
    kept = np.cumsum(np.square(s, dtype=np.float64))
    r = int(np.searchsorted(kept, energy * total)) + 1
    if r > len(s) and kept[-1] >= total * (1 - 1e-6):  # an exact spectrum misses ||W||_F^2 only by rounding
        r = len(s)
    return r


def _decompose(
    w: np.ndarray, target: int | None, energy: float | None, total: float, algorithm: str, break_even: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, str]:
    """SVD of w, exact or randomized (truncated), as U, s, Vt and the algorithm used."""
    full = min(w.shape)
    randomized = algorithm == "randomized" or (algorithm == "auto" and full >= _AUTO_MIN_DIM)
    if target is not None and randomized and (algorithm == "randomized" or target <= _AUTO_MAX_FRACTION * full):
        return (*_randomized(w, target), "randomized")
    if target is not None or not randomized:
        return (*_exact(w), "exact")
    assert energy is not None
    # The rank is unknown: grow a sketch until it holds the energy. Its captured energy is exact (the factors
    # are an orthogonal projection of W), so reaching the threshold is a guarantee, not an estimate. auto tries
    # one small sketch only: past it an exact SVD is about as fast and also settles flat spectra.
    size = min(break_even, max(32, full // 8))
    while True:
        u, s, vt = _randomized(w, size)
        if np.sum(np.square(s, dtype=np.float64)) >= energy * total:
            return u, s, vt, "randomized"
        if algorithm == "auto" or size >= break_even:
            break
        size = min(break_even, 2 * size)
    if algorithm == "randomized":
        return u, s, vt, "randomized"
    # auto, flatter spectrum: the singular values alone cost half a full SVD and settle the common flat case.
    s = np.linalg.svd(w if w.shape[0] >= w.shape[1] else w.T, compute_uv=False)
    if _pick_rank(s, None, energy, total) > break_even:
        return np.empty((w.shape[0], 0), w.dtype), s, np.empty((0, w.shape[1]), w.dtype), "exact"
    return (*_exact(w), "exact")


def _exact(w: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    if w.shape[0] < w.shape[1]:  # gesdd is about 1.5x faster on the tall orientation
        u, s, vt = _exact(w.T)
        return vt.T, s, u.T
    return np.linalg.svd(w, full_matrices=False)  # LAPACK gesdd; a failure to converge skips the matrix


def _randomized(w: np.ndarray, rank: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Truncated SVD by a Gaussian range finder with power iterations (Halko et al. 2011), rank + oversampling."""
    size = min(rank + _OVERSAMPLE, min(w.shape))
    rng = np.random.default_rng(0)  # fixed seed: the same model always gets the same factors
    y = w @ rng.standard_normal((w.shape[1], size), dtype=w.dtype)
    for _ in range(_POWER_ITERATIONS):
        # Power iterations sharpen the spectrum; re-orthonormalizing keeps the columns from collapsing onto
        # the top singular vector.
        y = w @ np.linalg.qr(w.T @ np.linalg.qr(y)[0])[0]
    q = np.linalg.qr(y)[0]
    u_small, s, vt = np.linalg.svd(q.T @ w, full_matrices=False)
    return q @ u_small, s, vt


def _initializer(graph: ir.Graph, name: str, array: np.ndarray, dtype: ir.DataType) -> ir.Value:
    array = array.astype(dtype.numpy(), copy=False)
    value = ir.val(name, dtype, array.shape, const_value=ir.tensor(array, name=name))
    graph.register_initializer(value)
    return value


def _rewrite(graph: ir.Graph, c: _Candidate, a: ir.Value, b: ir.Value, names: _Names) -> None:
    """Swap c.node for MatMuls through the factors, keeping its output value name (it may be a graph output)."""
    node, dtype = c.node, a.dtype
    base = _label(node)

    def op(op_type: str, inputs: list[ir.Value | None], **attributes: object) -> ir.Node:
        output = ir.val(names.fresh(f"{base}_svd_{op_type.lower()}"), dtype)
        return ir.node(op_type, inputs, attributes, outputs=[output], name=names.fresh(f"{base}_svd_{op_type}"))  # type: ignore[arg-type]

    x = node.inputs[1] if c.left else node.inputs[0]
    new: list[ir.Node] = []
    if node.op_type == "Gemm" and _attr(node, "transA", 0):
        new.append(op("Transpose", [x], perm=[1, 0]))  # Gemm inputs are 2-D, so this is the transpose
        x = new[-1].outputs[0]
    if c.left:
        new.append(op("MatMul", [b, x]))
        new.append(op("MatMul", [a, new[-1].outputs[0]]))
    else:
        new.append(op("MatMul", [x, a]))
        new.append(op("MatMul", [new[-1].outputs[0], b]))
    product = new[-1].outputs[0]
    bias = _bias(graph, node, names, op, new)
    if bias is not None:
        new.append(op("Add", [product, bias]))
    old_inputs = list(node.inputs)
    ir.convenience.replace_nodes_and_values(graph, node, [node], new, node.outputs, [new[-1].outputs[0]])
    for value in old_inputs:
        if value is not None and value.is_initializer() and not value.uses() and not value.is_graph_output():
            graph.initializers.pop(value.name)  # type: ignore[arg-type]


def _bias(
    graph: ir.Graph, node: ir.Node, names: _Names, op: Callable[..., ir.Node], new: list[ir.Node]
) -> ir.Value | None:
    """Gemm's beta * C as a value (folded into a new initializer when C is constant), or None."""
    bias = node.inputs[2] if node.op_type == "Gemm" and len(node.inputs) > 2 else None
    beta = _attr(node, "beta", 1.0)
    if bias is None or beta == 0.0 or beta == 1.0:
        return None if beta == 0.0 else bias
    dtype = bias.dtype or ir.DataType.FLOAT
    if is_constant_weight(bias):
        name = names.fresh(f"{bias.name}_beta")
        return _initializer(graph, name, constant_array(bias) * np.asarray(beta, dtype.numpy()), dtype)
    scale = _initializer(graph, names.fresh(f"{_label(node)}_beta"), np.asarray(beta), dtype)
    new.append(op("Mul", [bias, scale]))
    return new[-1].outputs[0]
