"""The automatic search's int8 phases: quantization settings, per-layer sensitivity, exclusions and int8 storage.

* settings through ``QuantizePass``: the default plan first (a candidate it beats on both size and accuracy is
  never chosen), dynamic per-channel and per-tensor; with calibration data, static QDQ and QOperator,
  per-channel and per-tensor, uint8 activations and int8 weights; signedness variants last;
* per-layer quantization sensitivity (see ``auto_sensitivity``), its proxy checked by real one-layer
  quantization of the two most and two least sensitive layers;
* for the most promising settings that miss the budget: for static settings percentile calibration and weight
  layers only (other op types left in float), then the same settings with the 1, 2, 4, ... most sensitive
  layers left in float;
* 4-bit embedding tables (``embedding_bits: 4``, ONNX Runtime's GatherBlockQuantized): on the best setting right
  after the settings when Gather tables of 4096 values or more hold a quarter of the float weights or more (a
  transformer's vocabulary), and at the end on the two best int8 plans (after pruning, distill, exclusions);
* last, the two best plans that leave weight layers in float, with those layers' weights stored as int8.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING

import onnx
import onnx_ir as ir
from onnxruntime.quantization.registry import IntegerOpsRegistry, QDQRegistry, QLinearOpsRegistry

from onnx_ops import auto_budget as budget
from onnx_ops import auto_sensitivity as sens
from onnx_ops.auto_clock import candidate_kind
from onnx_ops.auto_ranking import steps_of
from onnx_ops.errors import CompressionError
from onnx_ops.passes.quantize import STORABLE_OPS
from onnx_ops.plan import QuantizeStep
from onnx_ops.report import AutoCandidate, LayerSensitivity

if TYPE_CHECKING:
    from onnx_ops.auto import Search

__all__ = ["QuantizeSearch", "embedding_share", "four_bit_embeddings", "repairable"]

logger = logging.getLogger(__name__)

_PROBE_SHARE = 0.8  # of the sensitivity phase's time, at most, for the one-layer probes (the rest: proxy check)
_CALIBRATION_CAP = 128
# What ONNX Runtime's quantizers handle; dynamic mode leaves Conv in float (ConvInteger is slow on x86 CPUs).
_DYNAMIC_OPS = (frozenset(IntegerOpsRegistry) | {"Gemm"}) - {"Conv"}
_STATIC_OPS = frozenset(QLinearOpsRegistry) | frozenset(QDQRegistry)
_WEIGHT_OPS = frozenset({"Conv", "MatMul", "Gemm"})
_EMBEDDING_MIN = 4096  # values of a Gather table worth 4-bit blocks
_EMBEDDING_SHARE = 0.25  # of the float weights in such tables: 4-bit embeddings are tried early, not only at the end


class QuantizeSearch:
    """The int8 candidates of one search (see the module docstring)."""

    def __init__(self, search: Search, model: ir.Model) -> None:
        self.search, self.model = search, model
        self.present = {node.op_type for node in model.graph}
        self.embeddings = embedding_share(model)

    def settings(self) -> None:
        """The default plan and the quantization settings (4-bit embeddings on the best when tables dominate)."""
        search = self.search
        search.report("quantization settings", phase=0)
        search.ranking.default = search.attempt(budget.DEFAULT_LABEL, [budget.default_step()])
        for label, step in self._settings():
            search.attempt(label, [step])
        if self.embeddings >= _EMBEDDING_SHARE:
            self._embeddings(1)

    def sensitivity(self) -> None:
        """The quantization sensitivity of each layer, its proxy checked on a few layers."""
        self._sensitivity()

    def exclusions(self) -> None:
        """The best settings that miss the budget, repaired (see `_exclusions`)."""
        self._exclusions()

    def storage(self) -> None:
        """The two best int8 plans with 4-bit embeddings, then int8 storage of the layers they leave in float.

        The two best plans that leave weight layers in float are tried with those layers' weights stored as int8:
        same latency (ONNX Runtime folds the Cast and Mul back at load), smaller files, and a little more
        weight rounding, which is measured against the budget like every other candidate's.
        """
        search = self.search
        search.report("int8: 4-bit embeddings and int8 storage of the layers left in float")
        if self.embeddings > 0:
            self._embeddings(2)
        weight_ops = self.present & STORABLE_OPS
        for base in sorted(search.ranking.feasible(), key=search.ranking.score)[:2]:
            steps = steps_of(base)
            last = steps[-1]
            if search.out_of_time() or not isinstance(last, QuantizeStep) or last.float_layer_weights == "int8":
                continue
            if (weight_ops <= set(last.op_types or ()) and not last.exclude_nodes) or last.op_types is None:
                continue  # every weight layer is quantized already, or the pass stores them int8 itself (auto)
            stored = last.model_copy(update={"float_layer_weights": "int8"})
            search.attempt(f"{base.label}, int8 storage of float layers", [*steps[:-1], stored])

    def _embeddings(self, count: int) -> None:
        """The `count` best int8 plans that quantize the embedding tables, with the tables in 4-bit blocks."""
        search, ranking = self.search, self.search.ranking
        bases = [c for c in sorted(ranking.feasible(), key=ranking.score) if c.steps[-1].get("kind") == "quantize"]
        for base in bases[:count]:
            steps = steps_of(base)
            last = steps[-1]
            variant = four_bit_embeddings(last) if isinstance(last, QuantizeStep) else None
            if variant is not None and not search.out_of_time():
                search.attempt(f"{base.label}, 4-bit embeddings", [*steps[:-1], variant])

    def _settings(self) -> list[tuple[str, QuantizeStep]]:
        # op_types are always explicit, so a candidate means the same whatever QuantizeStep's defaults become.
        dynamic_ops = sorted(self.present & _DYNAMIC_OPS)
        dynamic = [
            (
                f"dynamic {pc}",
                QuantizeStep(
                    mode="dynamic",
                    per_channel=pc == "per-channel",
                    weight_type="int8",
                    op_types=dynamic_ops,
                    speed_check=False,
                ),
            )
            for pc in ("per-channel", "per-tensor")
            if dynamic_ops
        ]
        calibration = self.search.inputs.context.calibration
        static_ops = sorted(self.present & _STATIC_OPS)
        # Signedness last: unsigned weights and signed activations are the slow choices on x86 (see the CPU
        # note), but they are measured like the rest in case this CPU differs.
        unsigned = [
            (f"{label}, uint8 weights", step.model_copy(update={"weight_type": "uint8"})) for label, step in dynamic[:1]
        ]
        if not calibration or not static_ops:
            return [*dynamic, *unsigned]
        samples = min(len(calibration), _CALIBRATION_CAP)
        static = [
            (
                f"static {fmt} {'per-channel' if pc else 'per-tensor'} minmax",
                QuantizeStep(
                    mode="static",
                    format=fmt,
                    per_channel=pc,
                    weight_type="int8",
                    activation_type="uint8",
                    calibration_method="minmax",
                    calibration_samples=samples,
                    op_types=static_ops,
                    speed_check=False,
                ),
            )
            for fmt, pc in (("qdq", True), ("qdq", False), ("qoperator", True), ("qoperator", False))
        ]
        signed = [
            ("static qdq per-channel int8 activations", static[0][1].model_copy(update={"activation_type": "int8"}))
        ]
        return [*dynamic[:1], static[0], *dynamic[1:], *static[1:], *unsigned, *signed]

    def _sensitivity(self) -> None:
        search, model = self.search, self.model
        layers = sens.quantizable_layers(model)
        if not layers or search.out_of_time():
            return
        search.report(f"quantization sensitivity of {len(layers)} layers", phase=1)
        scorer = search.scorer()
        static = bool(search.inputs.context.calibration)  # static QDQ also rounds each node's output

        def one(layer: sens.Layer) -> onnx.ModelProto:
            return sens.fake_quantized(model, layer.name, True, static)

        # Most of the phase's time for the probes, the rest for the proxy check.
        found = sens.measure(layers, "quantize", one, scorer, search.time.work("probe quantize", _PROBE_SHARE))
        search.sensitivity += found
        self._check_proxy(layers, found, scorer)

    def _check_proxy(self, layers: Sequence[sens.Layer], found: list[LayerSensitivity], scorer: sens.Scorer) -> None:
        """Real one-layer quantization of the 2 most and 2 least sensitive layers, to validate the proxy."""
        search = self.search
        ranked = sorted(found, key=lambda s: s.loss, reverse=True)
        picks = ranked[:2] + ranked[-2:] if len(ranked) >= 4 else ranked
        static = bool(search.inputs.context.calibration)
        for i, item in enumerate(picks):
            others = [x.name for x in layers if x.op_type == item.op_type and x.name != item.name]
            step = QuantizeStep(
                mode="static" if static else "dynamic", per_channel=True, op_types=[item.op_type],
                exclude_nodes=others, calibration_samples=_CALIBRATION_CAP if static else None, speed_check=False,
            )  # fmt: skip
            # A real quantization: the first one costs what a candidate of the same mode did.
            work = search.time.work("probe proxy check", like=candidate_kind([step]))
            if not work.fits():
                work.skipped(len(picks) - i - 1)
                search.stopped_early = True
                return
            try:
                with work:
                    real, _ = scorer.loss(search.inputs.build(search.plan([step])))
            except CompressionError as e:
                logger.info("proxy check of %s failed: %s", item.name, e)
                continue
            search.proxy_check.append({"name": item.name, "proxy_loss": item.loss, "real_loss": real})

    def _exclusions(self) -> None:
        """Repair the best settings that miss the budget: other calibration, fewer op types, sensitive layers."""
        search = self.search
        ranked = sorted((s for s in search.sensitivity if s.family == "quantize"), key=lambda s: s.loss, reverse=True)
        search.report("int8 exclusions: other calibration, weight layers only, sensitive layers in float", phase=2)
        for base in search.ranking.promising(repairable):
            step, tried = _quantize_step(base), [base]
            if step.mode == "static":
                weights = sorted(set(step.op_types or ()) & _WEIGHT_OPS)
                variants = [
                    ("percentile", step.model_copy(update={"calibration_method": "percentile"})),
                    # Activation x activation MatMuls (attention) stay in float too: only weights are quantized.
                    (
                        "weight layers only",
                        step.model_copy(
                            update={
                                "op_types": weights,
                                "exclude_nodes": sorted({*step.exclude_nodes, *search.activation_matmuls}),
                            }
                        ),
                    ),
                ]
                for name, variant in variants:
                    if variant.op_types and not search.out_of_time():
                        tried.append(search.attempt(f"{base.label}, {name}", [variant]))
                if any(c.meets_budget for c in tried):
                    continue
            closest = max((c for c in tried if c.status == "measured"), key=search.ranking.closeness, default=base)
            self._exclude_sensitive(closest, ranked)

    def _exclude_sensitive(self, base: AutoCandidate, ranked: list[LayerSensitivity]) -> None:
        """The same settings with the 1, 2, 4, ... most sensitive layers left in float, until one fits."""
        search = self.search
        step = _quantize_step(base)
        usable = [s.name for s in ranked if step.mode == "static" or s.op_type != "Conv"]
        k = 1
        while k <= max(1, len(usable) // 2) and not search.out_of_time():
            excluded = sorted({*step.exclude_nodes, *usable[:k]})
            label = f"{base.label}, {k} most sensitive layer(s) in float"
            if search.attempt(label, [step.model_copy(update={"exclude_nodes": excluded})]).meets_budget:
                break
            k *= 2


def repairable(candidate: AutoCandidate) -> bool:
    """Whether leaving layers in float may bring `candidate` within budget (not what 4-bit embedding tables lose)."""
    return candidate.steps[-1].get("embedding_bits") != 4


def four_bit_embeddings(step: QuantizeStep) -> QuantizeStep | None:
    """`step` with its embedding tables in 4-bit blocks; None when it leaves Gather alone or has 4 bits already."""
    if step.embedding_bits == 4 or "Gather" in step.exclude_op_types:
        return None
    if step.op_types is not None and "Gather" not in step.op_types:
        return None
    return step.model_copy(update={"embedding_bits": 4})


def embedding_share(model: ir.Model) -> float:
    """The share of the float weight values held by constant Gather tables of 4096 values or more."""
    floats = {
        name: value.const_value.size
        for name, value in model.graph.initializers.items()
        if value.const_value is not None and value.const_value.dtype == ir.DataType.FLOAT
    }
    tables = {
        node.inputs[0].name: floats.get(node.inputs[0].name or "", 0)
        for node in model.graph
        if node.op_type == "Gather" and node.inputs and node.inputs[0] is not None
    }
    total = sum(floats.values())
    return sum(size for size in tables.values() if size >= _EMBEDDING_MIN) / total if total else 0.0


def _quantize_step(candidate: AutoCandidate) -> QuantizeStep:
    return QuantizeStep.model_validate(candidate.steps[-1])
