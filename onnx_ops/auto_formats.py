"""The automatic search's candidates in the other weight formats: graph simplification, k-means, int4 and fp16.

Tried after the int8, pruning and SVD phases (see ``auto``), where they fit the goal, each measured like every
other candidate (budget per sample and output, CPU-time ratio with its 95% interval):

* optimize (every goal, when the graph has nodes ONNX Runtime's basic optimizer removes: BatchNormalization,
  Dropout, Identity): graph simplification put before the best plan found so far;
* cluster (balanced, smallest): k-means codebooks at 4 bits after the best plan's pruning or SVD, which ONNX
  Runtime decodes once at load, so the layers run as fast as in float; 3 bits next when 4 meets the budget
  (smallest), else one codebook per output channel at 4 bits (where those codebooks cost less than two more
  bits a value: wide channels, as a transformer's), then 6, then 8; when the best plan prunes, the same
  ladder without the pruning, at fewer bits than the pruned plan needed;
* int4 (balanced, smallest; models whose MatMul, Gemm and embedding weights of 4096 values or more hold at least
  half of the float weights, as transformers do and CNNs do not):
  weight-only 4-bit blocks of 32 (round to nearest), blocks of 128 next when that meets the budget (smallest),
  GPTQ on the calibration data when it misses; on CPU encoders run it slower than float, so the speed rule of
  the goal usually decides;
* fp16 (balanced, smallest; when no candidate within budget is at most half the original's size yet): a near
  lossless halving, slower on CPU, where ONNX Runtime computes most operators in float32.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import onnx_ir as ir
from pydantic import TypeAdapter

from onnx_ops.passes._channel_codebook import output_axis
from onnx_ops.plan import (
    FINAL_KINDS,
    AutoStep,
    ClusterStep,
    Fp16Step,
    Int4Step,
    OptimizeStep,
    Step,
)
from onnx_ops.report import AutoCandidate

__all__ = ["FAMILIES", "FormatSearch"]

FAMILIES = ("optimize", "cluster", "int4", "fp16")
_SIMPLIFIED = frozenset({"BatchNormalization", "Dropout", "Identity"})  # what optimize surely removes
_INT4_OPS = frozenset({"MatMul", "Gemm", "Gather"})  # what Int4Step stores by default
_INT4_MIN = 4096  # Int4Step's default min_elements
_CLUSTER_OPS = frozenset({"MatMul", "Gemm", "Conv", "Gather"})
_CLUSTER_INPUTS = {"MatMul": (0, 1), "Gemm": (0, 1), "Conv": (1,), "Gather": (0,)}  # where ClusterStep finds weights
_CLUSTER_MIN = 4096  # ClusterStep's default min_elements
_HALF = 0.5
_STEPS: TypeAdapter[list[Step]] = TypeAdapter(list[Step])


@dataclasses.dataclass
class FormatSearch:
    """The format candidates of one search.

    Attributes:
        step: The auto step (goal, families).
        model: The original model as the passes see it (weights as initializers).
        calibration: Whether the user gave calibration data.
        attempt: Measures one candidate (label, steps) and returns it (the search's own ``_try``).
        best: The best candidate within budget so far, by the goal's order, or None.
        out_of_time: True once the search's time budget is spent.
    """

    step: AutoStep
    model: ir.Model
    calibration: bool
    attempt: Callable[[str, list[Step]], AutoCandidate]
    best: Callable[[], AutoCandidate | None]
    out_of_time: Callable[[], bool]

    def run(self) -> None:
        """Try the candidates of each format family the step allows, in the order of the module docstring."""
        families = set(self.step.families)
        if "optimize" in families and any(node.op_type in _SIMPLIFIED for node in self.model.graph.all_nodes()):
            self._optimize()
        if self.step.goal == "fastest":
            return  # clustered weights run as fast as float, int4 and fp16 slower on CPU: none is a speed-up
        if "cluster" in families and self._share(_CLUSTER_OPS, _CLUSTER_MIN) > 0:
            self._cluster()
        if "int4" in families and self._share(_INT4_OPS, _INT4_MIN) >= _HALF:
            self._int4()
        if "fp16" in families and not self.out_of_time():
            best = self.best()
            if best is None or (best.size_ratio or 1.0) > _HALF:
                self.attempt("fp16", [Fp16Step()])

    def _optimize(self) -> None:
        best = self.best()
        base = self._steps(best)
        if not self.out_of_time() and not any(isinstance(s, OptimizeStep) for s in base):
            label = "graph simplification" + (f" + {best.label}" if best is not None else "")
            self.attempt(label, [OptimizeStep(), *base])

    def _cluster(self) -> None:
        """The bits ladder after the best plan's non-final steps, then plain k-means where it can be smaller.

        When the best plan prunes, plain k-means (no pruning, so more accurate) is tried below the fewest bits at
        which the pruned one met the budget: at the same bits it stores at least as many indices.
        """
        best = self.best()
        base = [s for s in self._steps(best) if s.kind not in FINAL_KINDS]
        after = "" if not base or best is None else f" after {' + '.join(s.kind for s in base)}"
        met = self._ladder(base, after, None)
        if base and not self.out_of_time():
            self._ladder([], "", met)

    def _ladder(self, base: list[Step], after: str, below: int | None) -> int | None:
        """4 bits; then 3 (smallest, when 4 fits) or 6 and 8 (when it misses); only bits below `below`.

        Returns the fewest bits that met the budget, or None.
        """
        if below is not None and below <= 4:  # only 3 bits can be smaller, and only goal smallest goes there
            found = self._bits(3, base, after, below) if self.step.goal == "smallest" else None
            return 3 if found is not None and found.meets_budget else None
        tried = self._bits(4, base, after, below)
        if tried is None:
            return None
        if tried.meets_budget:
            found = self._bits(3, base, after, below) if self.step.goal == "smallest" else None
            return 3 if found is not None and found.meets_budget else 4
        if self._channels_pay() and not self.out_of_time():
            label = f"k-means 4 bits per channel{after}"
            if self.attempt(label, [*base, ClusterStep(bits=4, codebook="channel")]).meets_budget:
                return 4
        for bits in (6, 8):
            found = self._bits(bits, base, after, below)
            if found is None:
                return None
            if found.meets_budget:
                return bits
        return None

    def _channels_pay(self) -> bool:
        """Per-channel codebooks at 4 bits cost fewer bytes than 2 more bits a value (6 bits) on the eligible weights.

        Each output channel stores 16 float centroids and an int32 offset: cheap for wide channels (a transformer's
        MatMul columns), more than the weight itself for a mobile CNN's small ones.
        """
        codebooks = values = 0
        for node in self.model.graph:
            for index in _CLUSTER_INPUTS.get(node.op_type, ()):
                value = node.inputs[index] if index < len(node.inputs) else None
                tensor = None if value is None else value.const_value
                if tensor is None or tensor.dtype != ir.DataType.FLOAT or tensor.size < _CLUSTER_MIN:
                    continue
                shape = tuple(int(d) for d in tensor.shape.numpy())
                codebooks += shape[output_axis(node, index, len(shape))] * (16 * 4 + 4)
                values += tensor.size
        return 0 < codebooks < values * 2 // 8

    def _bits(self, bits: int, base: list[Step], after: str, below: int | None) -> AutoCandidate | None:
        if self.out_of_time() or (below is not None and bits >= below):
            return None
        return self.attempt(f"k-means {bits} bits{after}", [*base, ClusterStep(bits=bits)])

    def _int4(self) -> None:
        if self.out_of_time():
            return
        first = self.attempt("int4 rtn, blocks of 32", [Int4Step()])
        if first.meets_budget and self.step.goal == "smallest" and not self.out_of_time():
            self.attempt("int4 rtn, blocks of 128", [Int4Step(block_size=128)])
        elif not first.meets_budget and self.calibration and not self.out_of_time():
            self.attempt("int4 gptq, blocks of 32", [Int4Step(method="gptq", calibration_samples=128)])

    def _share(self, ops: frozenset[str], least: int) -> float:
        """The share of the model's float weight values held by weights of `ops` nodes with `least` values or more."""
        total = sum(
            v.const_value.size
            for v in self.model.graph.initializers.values()
            if v.const_value is not None and v.const_value.dtype == ir.DataType.FLOAT
        )
        eligible = {
            value.name: value.const_value.size
            for node in self.model.graph
            if node.op_type in ops
            for value in node.inputs
            if value is not None
            and value.const_value is not None
            and value.const_value.dtype == ir.DataType.FLOAT
            and value.const_value.size >= least
        }
        return sum(eligible.values()) / total if total else 0.0

    @staticmethod
    def _steps(candidate: AutoCandidate | None) -> Sequence[Step]:
        return [] if candidate is None else _STEPS.validate_python(candidate.steps)
