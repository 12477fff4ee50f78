"""Low-rank factorization of constant MatMul/Gemm weights: W[K,N] ~ A[K,r] @ B[r,N].

Each eligible node is rewritten through two factors (see _svd_graph). The singular values are split evenly
(sqrt) between A and B so both factors have a similar range, which keeps later int8 quantization accurate.

Two ways to factorize:

* by weight (default): the truncated SVD of W. The rank comes from ``rank``, ``rank_ratio``, the smallest rank
  holding ``energy`` of ||W||_F^2, or ``param_ratio`` (one parameter target over all matrices): see _svd_ranks.
  Spectra come from the eigen-decomposition of the smaller Gram matrix in float64 (``auto``), LAPACK's SVD
  or a randomized SVD (see _svd_math). Matrices are factorized one per core, each with one BLAS thread, when
  threadpoolctl is installed (otherwise serially with BLAS's own threads).
* ``activation_aware``: for the layer's outputs on the calibration data (see _svd_aware): whitened by the
  inputs' covariance, truncated, the second factor and the bias refit to the original model's layer outputs.
  Ranks come from ``max_output_error`` (the relative output error each layer may add, exact on the
  calibration inputs), ``param_ratio``, or the rank rules above applied to the whitened spectrum.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import logging
import math

import numpy as np
import onnx
import onnx_ir as ir

from onnx_ops.errors import PlanError
from onnx_ops.passes import _svd_aware as aware
from onnx_ops.passes import _svd_graph as graph_ops
from onnx_ops.passes import _svd_math as svd_math
from onnx_ops.passes import _svd_ranks as svd_ranks
from onnx_ops.passes import _svd_sensitivity as sensitivity
from onnx_ops.passes._base import PassContext, PassLog, is_constant_weight, release_proto
from onnx_ops.passes._blockwise_lowrank import refine_blocks
from onnx_ops.passes._svd_graph import Candidate, label
from onnx_ops.plan import SvdStep
from onnx_ops.report import LayerChange

__all__ = ["SvdFactorizePass"]

logger = logging.getLogger(__name__)

Job = tuple[ir.Value, list[Candidate]]


@dataclasses.dataclass
class _Factors:
    a: np.ndarray
    b: np.ndarray
    rel_error: float
    note: str
    bias: np.ndarray | None = None


class SvdFactorizePass(ir.passes.InPlacePass):
    """Replace large constant MatMul/Gemm weights by two low-rank factors where that saves parameters."""

    def __init__(self, step: SvdStep, context: PassContext) -> None:
        super().__init__()
        self.step = step
        self.context = context
        self.log = PassLog()

    def precheck(self, model: ir.Model) -> None:
        """Raise PlanError when calibration data is missing for activation_aware, or no weight qualifies."""
        if self.step.activation_aware and not self.context.calibration:
            raise PlanError("svd with activation_aware needs calibration data: give a .npz with one array per input")
        others: collections.Counter[str] = collections.Counter()
        reasons = []
        for node in model.graph:
            found = graph_ops.candidate(node, self.step)
            if isinstance(found, Candidate):
                return
            if isinstance(found, str):
                reasons.append(f"{label(node)}: {found}")
            elif any(is_constant_weight(v) and len(v.const_value.shape) >= 2 for v in node.inputs if v):  # type: ignore[union-attr]
                others[node.op_type] += 1
        seen = [f"{op} x{n}" for op, n in sorted(others.items())] + reasons[:3]
        raise PlanError(
            f"svd: no {' or '.join(self.step.op_types)} with a constant 2-D weight of at least "
            f"{self.step.min_elements} elements (found: {'; '.join(seen) or 'no constant weights'})"
        )

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        """Factorize every eligible weight of the main graph; log each change and each skip."""
        groups: dict[ir.Value, list[Candidate]] = {}
        for node in list(model.graph):
            found = graph_ops.candidate(node, self.step)
            if isinstance(found, str):
                self.log.skip(label(node), found)
            elif found is not None:
                groups.setdefault(found.weight, []).append(found)
        jobs: list[Job] = []
        for weight, candidates in groups.items():
            problem = graph_ops.sharing_problem(weight, candidates)
            if problem:
                self._skip(candidates, problem)
            else:
                jobs.append((weight, candidates))
        self.log.summary["params_eligible"] = 0
        if self.step.activation_aware:
            self._call_aware(model, jobs)
        else:
            self._call_weights(model.graph, jobs)
        release_proto(model)  # the replaced weights' protobuf arena goes with the last weight read from it
        self._summarize()
        return ir.passes.PassResult(model, modified=bool(self.log.layers))

    def _call_weights(self, graph: ir.Graph, jobs: list[Job]) -> None:
        """Factorize weight by weight: each matrix's spectrum and factors exist only while it is worked on.

        A param_ratio budget is shared by every matrix: their singular values come first (the spectra kept
        without their vectors), the decompositions are made again for the factors.
        """
        limits, workers = svd_math.blas_threads()
        shapes = [c[0].matrix_shape() for _, c in jobs]
        self.log.summary["params_eligible"] = sum(k * n for k, n in shapes)
        names = graph_ops.Names(graph)
        with limits, concurrent.futures.ThreadPoolExecutor(workers) as pool:
            ranks: list[int | str | None] = [None] * len(jobs)
            if self.step.param_ratio is not None:
                spectra = list(pool.map(lambda job: _light(self._spectrum(job)), jobs))
                totals = [s.total if isinstance(s, svd_math.Spectrum) else 0.0 for s in spectra]
                ranks = list(svd_ranks.ranks(self.step, spectra, totals, shapes))
            work = zip(jobs, ranks, shapes, strict=True)
            results = pool.map(lambda item: self._factorize(*item), work)
            for (weight, candidates), result in zip(jobs, results, strict=True):
                self._apply(graph, weight, candidates, result, names)

    def _factorize(self, job: Job, rank: int | str | None, shape: tuple[int, int]) -> _Factors | str:
        spectrum = self._spectrum(job)
        if rank is None:
            total = spectrum.total if isinstance(spectrum, svd_math.Spectrum) else 0.0
            rank = svd_ranks.ranks(self.step, [spectrum], [total], [shape])[0]
        return self._weight_factors(job, spectrum, rank)

    def _spectrum(self, job: Job) -> svd_math.Spectrum | str:
        w = job[1][0].matrix()
        if not np.all(np.isfinite(w)):
            return "weight has non-finite values"
        if not np.any(w):
            return "weight is all zeros"
        algorithm = "gram" if self.step.algorithm == "auto" else self.step.algorithm
        sketch = svd_ranks.fixed_rank(self.step, min(w.shape)) or svd_math.break_even(*w.shape)
        try:
            return svd_math.decompose(w, algorithm, sketch)
        except np.linalg.LinAlgError:  # LAPACK's SVD very rarely fails to converge
            return "the SVD did not converge for this weight"

    def _weight_factors(self, job: Job, spectrum: svd_math.Spectrum | str, rank: int | str) -> _Factors | str:
        if isinstance(spectrum, str) or isinstance(rank, str):
            return spectrum if isinstance(spectrum, str) else str(rank)
        w = job[1][0].matrix()
        a, b = spectrum.factors(rank)
        rel_error = math.sqrt(svd_math.residual(w, a, b) / spectrum.total)
        del w
        if self.step.max_rel_error is not None and rel_error > self.step.max_rel_error:
            return f"relative error {rel_error:.3g} at rank {rank} exceeds max_rel_error {self.step.max_rel_error:g}"
        kept = 1.0 - spectrum.tail(rank) / spectrum.total
        return _Factors(a, b, rel_error, f"energy kept {kept:.3f} ({spectrum.algorithm})")

    def _call_aware(self, model: ir.Model, jobs: list[Job]) -> None:
        targets: list[aware.AwareLayer] = []
        for _, candidates in jobs:
            found = aware.aware_layer(candidates[0]) if len(candidates) == 1 else "activation_aware: shared weight"
            if isinstance(found, str):
                self._skip(candidates, found)
            else:
                targets.append(found)
        if not targets:
            return
        teacher, feeds = self.context.teacher, list(self.context.calibration or [])
        if teacher is not None and not _has_tensors(teacher, [t.layer.output for t in targets]):
            # A step before this one renamed the layers' outputs: fit to this step's input model instead.
            self.log.warnings.append("svd: layer outputs not found in the original model; fit to svd's input")
            teacher = None
        aware.levels(model.graph, targets)
        levels = sorted({t.level for t in targets})
        # Factorized together, or level by level (each level fit on what its factorized upstream levels produce).
        order = [[t for t in targets if t.level == level] for level in levels] if self.step.sequential else [targets]
        groups = [targets, *order[1:]]  # the capture runs: every target's spectrum first (the ranks), then levels
        limits, workers = svd_math.blas_threads()
        # With no teacher given, it is the model before this pass (the job's file itself when svd is the first
        # step): sessions map its weights, and the student's, instead of copying protos of the model.
        share = aware.shared_folder(self.context.source, self.context.workdir)
        with aware.teacher_file(model, teacher, share, self.context.workdir) as (path, folder):
            with limits, concurrent.futures.ThreadPoolExecutor(workers) as pool:
                self._fit_aware(model, order, aware.Fitter(path, groups, feeds, folder, pool, share))
            if self.step.block_steps:
                self.log.summary["blocks"] = refine_blocks(model, path, feeds, self.step.block_steps)
        self.log.summary["calibration_feeds"] = len(feeds)

    def _fit_aware(self, model: ir.Model, order: list[list[aware.AwareLayer]], fitter: aware.Fitter) -> None:
        """Factorize the targets group by group; capture run 0 has them all, run i > 0 the group order[i]."""
        algorithm = "gram" if self.step.algorithm == "auto" else self.step.algorithm
        targets = fitter.groups[0]  # every target, in the order of the jobs
        problems = dict(
            zip(map(id, fitter.groups[0]), fitter.whiten(model, 0, self.step.damping, algorithm), strict=True)
        )
        shapes = [(t.layer.k, t.layer.n) for t in targets]
        self.log.summary["params_eligible"] = sum(k * n for k, n in shapes)
        spectra = [problems[id(t)].spectrum for t in targets]
        ranks = None
        if self.step.param_ratio is not None and len(targets) > 1:  # weighed by their measured effect on the outputs
            ranks = sensitivity.measured_ranks(model, targets, [problems[id(t)] for t in targets],
                                               self.step.param_ratio, fitter.feeds,
                                               lambda w: svd_ranks.ranks(self.step, spectra, w, shapes))  # fmt: skip
            self.log.summary["allocation"] = "measured sensitivity" if ranks is not None else "output energy"
        if ranks is None:  # each layer's error relative to its outputs' energy
            ranks = svd_ranks.ranks(self.step, spectra, [problems[id(t)].reference for t in targets], shapes)
        rank_of = dict(zip(map(id, targets), ranks, strict=True))
        names = graph_ops.Names(model.graph)
        for number, group in enumerate(order):
            if number > 0:  # upstream levels are factorized: fit this level on the inputs they now produce
                problems.update(
                    zip(map(id, group), fitter.whiten(model, number, self.step.damping, algorithm), strict=True)
                )
            for t in group:
                result = self._aware_factors(problems[id(t)], rank_of[id(t)])
                self._apply(model.graph, t.candidate.weight, [t.candidate], result, names, t)

    def _aware_factors(self, problem: aware.Whitened, rank: int | str) -> _Factors | str:
        if isinstance(rank, str):
            return rank
        a, b, bias = problem.factors(rank)
        error = problem.error(a @ b)
        rel_error = svd_math.relative(error, problem.reference)
        predicted = svd_math.relative(problem.base + problem.spectrum.tail(rank), problem.reference)
        if self.step.max_rel_error is not None and rel_error > self.step.max_rel_error:
            return f"output error {rel_error:.3g} at rank {rank} exceeds max_rel_error {self.step.max_rel_error:g}"
        note = f"output error {rel_error:.4f} on calibration data (whitened spectrum: {predicted:.4f}; full rank: "
        note += f"{svd_math.relative(problem.base, problem.reference):.4f})"
        return _Factors(a, b, rel_error, note, bias)

    def _apply(
        self,
        graph: ir.Graph,
        weight: ir.Value,
        candidates: list[Candidate],
        result: _Factors | str,
        names: graph_ops.Names,
        target: aware.AwareLayer | None = None,
    ) -> None:
        """Add the factors once, rewrite every node that uses the weight, and log the change (or the skip)."""
        if isinstance(result, str):
            self._skip(candidates, result)
            return
        dtype = weight.const_value.dtype  # type: ignore[union-attr]
        a_val = graph_ops.add_initializer(graph, names.fresh(f"{weight.name}_svd_a"), result.a, dtype)
        b_val = graph_ops.add_initializer(graph, names.fresh(f"{weight.name}_svd_b"), result.b, dtype)
        bias = None
        if target is not None and result.bias is not None:
            bias = aware.set_bias(graph, target, result.bias, dtype)
        for c in candidates:
            graph_ops.rewrite(graph, c, a_val, b_val, names, bias)
        (k, r), n, name = result.a.shape, result.b.shape[1], label(candidates[0].node)
        note = result.note + (f"; factors shared by {len(candidates)} nodes" if len(candidates) > 1 else "")
        logger.debug("svd: %s %dx%d -> rank %d, rel error %.4g", name, k, n, r, result.rel_error)
        self.log.layers.append(LayerChange(
            name=name, op_type=candidates[0].node.op_type, weight=weight.name or "",
            shape_before=[k, n], shape_after=[k, r, r, n], params_before=k * n, params_after=r * (k + n),
            rank=r, rel_error=result.rel_error, note=note,
        ))  # fmt: skip

    def _skip(self, candidates: list[Candidate], reason: str) -> None:
        for c in candidates:
            self.log.skip(label(c.node), reason)

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


def _light(spectrum: svd_math.Spectrum | str) -> svd_math.Spectrum | str:
    return spectrum.light() if isinstance(spectrum, svd_math.Spectrum) else spectrum


def _has_tensors(model: onnx.ModelProto, names: list[str]) -> bool:
    graph = model.graph
    known = {o for node in graph.node for o in node.output} | {i.name for i in graph.input}
    return all(name in known for name in names)
