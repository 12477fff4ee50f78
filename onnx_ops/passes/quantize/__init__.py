"""Int8 quantization through onnxruntime.quantization, with defaults chosen for x86 CPUs.

The pass quantizes no operator itself. It prepares a private copy of the model (Constant weights lifted
to initializers, the opset raised where ONNX Runtime's output needs it, optionally ``quant_pre_process``),
calls ``quantize_dynamic`` or ``quantize_static`` in the context's work directory and loads the result
fully into memory. Defaults avoid slow paths measured on x86: dynamic mode leaves Conv in float
(ConvInteger ran 1.2-6x slower than float Conv) and static activations default to uint8. Weights get one
scale per output channel unless the step says otherwise. When the step leaves op_types to the pass, the
int8 model is timed against the float one (interleaved pairs, one thread, the calling thread's CPU time: see
selection); if it is measurably slower, the pass quantizes again without depthwise Conv, then with MatMul/Gemm
only, and keeps the model in float when every try is measurably slower (static QDQ made small MobileNet-style
CNNs 1.3-2.9x slower); a tie within noise keeps int8. The parts: ort (the calls into ONNX Runtime), selection
(speed and fidelity checks, fallbacks), storage (int8 storage of float layers). In static mode, with op_types left to
the pass, each int8 model is also run on calibration samples: one whose worst float output cosine against
the float model falls below 0.9 is not used either. Weight layers only (other op types left in float) is
tried next, and the model stays float when no variant comes close (per-tensor uint8 activations flattened
the wide-range STFT power of Silero VAD: cosine 0.73 on its recurrent state, 0.53 on its speech
probabilities of synthetic speech). The weights of the Conv/MatMul/Gemm/LSTM/GRU/RNN layers the pass keeps in
float are then stored as int8 behind a Cast and a Mul, which ONNX Runtime folds back at load time: the file
shrinks, the run time does not change (float_layer_weights; a DequantizeLinear there ran 1.3-2.5x slower).
"""

from __future__ import annotations

import collections
import logging

import onnx
import onnx_ir as ir
from onnx_ir.passes import common

from onnx_ops.errors import PlanError
from onnx_ops.large import save_model
from onnx_ops.passes._base import PassContext, PassLog, non_finite_reason
from onnx_ops.passes.quantize import folding
from onnx_ops.passes.quantize.inplace import _adopt, _OwnDynamic
from onnx_ops.passes.quantize.ort import (
    _DYNAMIC_OPS,
    _STATIC_OPS,
    _check_calibration,
    _flatten_gemm_bias,
    _layer_changes,
    _load_in_memory,
    _ort_selection,
    _quantized_parts,
)
from onnx_ops.passes.quantize.selection import _Fidelity
from onnx_ops.passes.quantize.storage import STORABLE_OPS, _has_weight, _store_int8, _unfolded
from onnx_ops.plan import QuantizeStep

__all__ = ["STORABLE_OPS", "QuantizePass"]

logger = logging.getLogger(__name__)

_CONV_REASON = "dynamic mode leaves Conv in float: ConvInteger is slower than float on CPU"


class QuantizePass(_OwnDynamic, ir.passes.InPlacePass):
    """Quantize weights (and, in static mode, activations) to 8 bits with ONNX Runtime's quantizer."""

    def __init__(self, step: QuantizeStep, context: PassContext) -> None:
        super().__init__()
        self.step = step
        self.context = context
        self.log = PassLog()
        self._static = step.mode == "static"
        self._supported = _STATIC_OPS if self._static else _DYNAMIC_OPS
        default = self._supported if self._static else self._supported - {"Conv"}
        self._wanted = set(step.op_types or default) - set(step.exclude_op_types)
        self._embeddings_4bit = step.embedding_bits == 4 and "Gather" in self._wanted
        if self._embeddings_4bit:
            self._wanted.discard("Gather")  # quantized to 4 bits after the int8 pass
        self._per_channel = step.per_channel
        self._left_float: dict[str, str] = {}  # node name -> why the speed or fidelity check left it in float
        self._fidelity: _Fidelity | None = None  # set up by _checked, reused for int8 storage
        self._non_finite: dict[str, str] = {}  # node name -> the constant holding infinities it reads

    def precheck(self, model: ir.Model) -> None:
        """Raise PlanError when the step cannot work on this model or this data."""
        step = self.step
        if found := _quantized_parts(model):
            raise PlanError(f"the model is already quantized (it has {found}); give its float original")
        if self._static:
            _check_calibration(model, self.context.calibration)
            if step.activation_type == "int8" and step.weight_type == "uint8":
                raise PlanError("ONNX Runtime does not support int8 activations with uint8 weights")
        if unknown := sorted(set(step.op_types or ()) - self._supported):
            raise PlanError(
                f"op_types names types ONNX Runtime cannot quantize in {step.mode} mode: {', '.join(unknown)} "
                f"(supported: {', '.join(sorted(self._supported))})"
            )
        if missing := sorted(set(step.exclude_nodes) - {node.name or "" for node in model.graph}):
            raise PlanError(f"exclude_nodes names nodes the model does not have: {', '.join(missing)}")
        if not self._quantizable(model) and not any(self._stores(node) and _has_weight(node) for node in model.graph):
            hint = "" if self._static else " (dynamic mode leaves Conv in float unless op_types names it)"
            raise PlanError(f"no node is left to quantize with these op_types and exclusions{hint}")

    def _leave_non_finite(self, work: ir.Model) -> None:
        """Keep in float every node that reads a constant holding infinities (its scale would make NaN).

        In static mode also the nodes reading their outputs: an additive -inf mask makes its Add's output
        infinite, and calibrating the range of that activation for the next node gives an infinite scale.
        """
        for node in work.graph:
            reason = next(filter(None, map(non_finite_reason, node.inputs)), None)
            if not reason:
                continue
            self._non_finite[node.name or ""] = f"left in float: {reason}"
            for user in (use.node for output in node.outputs for use in output.uses()) if self._static else ():
                self._non_finite.setdefault(user.name or "", f"left in float: its input may be infinite ({reason})")
        if self._non_finite:
            self.step = self.step.model_copy(update={"exclude_nodes": [*self.step.exclude_nodes, *self._non_finite]})

    def _quantizable(self, model: ir.Model) -> bool:
        """True if some node is left for ONNX Runtime's quantizer by op_types and the exclusions."""
        # Dynamic mode quantizes weights only (ORT's MatMulConstBOnly), so a node needs a constant weight.
        return any(
            node.op_type in self._wanted
            and node.name not in self.step.exclude_nodes
            and (self._static or _has_weight(node))
            for node in model.graph
        )

    def _stores(self, node: ir.Node) -> bool:
        """True if int8 storage (float_layer_weights) applies to this node when it stays in float."""
        step, wanted = self.step, self.step.float_layer_weights
        if wanted == "float" or (wanted == "auto" and step.op_types is not None):
            return False
        return node.op_type in STORABLE_OPS and (
            wanted == "int8" or (node.name not in step.exclude_nodes and node.op_type not in step.exclude_op_types)
        )

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        """Quantize model in place (its float weights go as their int8 versions arrive)."""
        if self._static:  # also when precheck was not called: ORT's error for this is obscure
            _check_calibration(model, self.context.calibration)
        # ORT raises (dynamic) or keeps float (static) on weights held in Constant nodes.
        common.LiftConstantsToInitializersPass(lift_all_constants=True, size_limit=0)(model)
        common.NameFixPass()(model)
        if self._embeddings_4bit:
            self._raise_for_4bit(model)
        self._leave_non_finite(model)
        self._warn_slow_paths(model)
        if not self._static and self.step.smoothing != "off" and self.context.calibration:
            self._smooth(model)
        if not self._quantizable(model):  # e.g. dynamic mode on a CNN: only int8 storage of the Conv weights
            return _adopted(model, self._float_compute(model))
        if (found := self._own_plan(model)) is not None:
            kept = self._dynamic_own(model, found)
            if kept is None:
                return _adopted(model, self._float_compute(model))
            return _adopted(model, self._finish(model, _adopt(model, kept)))
        return _adopted(model, self._with_ort(model))

    def _with_ort(self, work: ir.Model) -> ir.passes.PassResult:
        """Quantize through ONNX Runtime's quantize_dynamic or quantize_static (a new model; `work` unchanged)."""
        self._stage("preparing the model for ONNX Runtime's quantizer", 0.0)
        source, output = self.context.workdir / "quantize_input.onnx", self.context.workdir / "quantize_output.onnx"
        source_proto = self._upgrade_opset(ir.to_proto(work))
        if self._static and self.step.fold_affine and (folded := folding.fold(source_proto)):
            self.log.summary["folded"] = ", ".join(f"{rule} x{count}" for rule, count in sorted(folded.items()))
        self._large = save_model(source_proto, source)  # external data past 2 GiB
        del source_proto
        prepared = self._preprocess(source, self.context.workdir / "quantize_prepared.onnx")
        prepared_proto = onnx.load(prepared)
        if _flatten_gemm_bias(prepared_proto):
            prepared = self.context.workdir / "quantize_prepared_bias.onnx"
            save_model(prepared_proto, prepared)
        for initializer in prepared_proto.graph.initializer:  # only its graph is read from here on
            initializer.ClearField("raw_data")
        self._stage("calibrating" if self._static else "quantizing the weights", 0.05)
        self._quantize(prepared, output, *_ort_selection(work, prepared_proto, self._wanted, self.step))
        result = _load_in_memory(output)
        if self.step.op_types is None and (self.step.speed_check or self._static):
            self._stage("checking speed and fidelity of the int8 model", 0.8)

            def requantize(wanted: set[str], excluded: list[str], index: int) -> ir.Model:
                step = self.step.model_copy(update={"exclude_nodes": [*self.step.exclude_nodes, *excluded]})
                output = self.context.workdir / f"quantize_fallback_{index}.onnx"
                self._quantize(prepared, output, *_ort_selection(work, prepared_proto, wanted, step))
                return _load_in_memory(output)

            kept, reason = self._checked(work, requantize, result, float_file=source)
            if kept is None:
                self._left_float = {node.name or "": reason for node in work.graph}
                return self._float_compute(work)
            result = kept
        self.log.layers = _layer_changes(work, prepared_proto, result)
        return self._finish(work, result)

    def _finish(self, work: ir.Model, result: ir.Model) -> ir.passes.PassResult:
        """4-bit embeddings, int8 storage of the layers left in float, the summary."""
        if self._embeddings_4bit:
            result = self._gather_4bit(result)
        self._stage("int8 storage of the layers left in float", 0.95)
        result = self._int8_storage(work, result)
        self._record_skipped(work)
        self._summarize(result)
        common.RemoveUnusedOpsetsPass()(result)
        quantizers = {"QuantizeLinear", "DynamicQuantizeLinear"}
        modified = bool(self.log.layers) or any(node.op_type in quantizers for node in result.graph)
        return ir.passes.PassResult(result, modified=modified)

    def _float_compute(self, work: ir.Model) -> ir.passes.PassResult:
        """The result when nothing is quantized: the model, with int8 storage of its float layers if it applies."""
        stored = self._int8_storage(work, work)
        self._record_skipped(work)
        if stored is work:
            return ir.passes.PassResult(work, modified=False)
        self._summarize(stored)
        return ir.passes.PassResult(stored, modified=True)

    def _int8_storage(self, work: ir.Model, result: ir.Model) -> ir.Model:
        """Store the weights of weight layers the pass left in float as int8 (see float_layer_weights).

        Returns `result` itself when nothing was stored, when ONNX Runtime would not fold the storage back into
        float weights, or when the fidelity check (static mode) finds the outputs far off.
        """
        done = {change.name for change in self.log.layers}
        notes = {
            node.name: f"int8 storage, float compute ({self._skip_reason(node)})"
            for node in work.graph
            if node.name and node.name not in done and self._stores(node)
        }
        if not notes:
            return result
        candidate = result.clone()
        changes = _store_int8(candidate, notes)
        if not changes:
            return result
        cosines: list[str] = []
        if self._fidelity is not None and not self._fidelity.accepts(candidate, "int8 storage", cosines):
            self.log.summary["int8_storage"] = f"not used: {cosines[-1]}"
            return result
        # Not timed: once ONNX Runtime has folded every Cast and Mul, it runs the very graph it ran before.
        unfolded = _unfolded(candidate, {change.weight for change in changes}, self.context.workdir)
        if unfolded:
            self.log.summary["int8_storage"] = f"not used: ONNX Runtime did not fold it back ({unfolded})"
            return result
        self.log.layers.extend(changes)
        self.log.summary["int8_storage"] = f"{len(changes)} weights of layers left in float"
        return candidate

    def _warn_slow_paths(self, model: ir.Model) -> None:
        step, warn = self.step, self.log.warnings.append
        convs = sum(node.op_type == "Conv" for node in model.graph)
        if not self._static:
            if convs and step.op_types is None:
                self.log.summary["conv_left_in_float"] = convs
                warn(f"dynamic mode left {convs} Conv node(s) in float: ConvInteger is slower than float Conv on x86")
            elif convs and "Conv" in self._wanted:
                warn("Conv quantized in dynamic mode: ONNX Runtime documents ConvInteger as slow on x86")
        elif step.activation_type == "int8" and step.weight_type == "int8" and step.format == "qoperator":
            warn("int8 activations with int8 weights in QOperator format are documented slow on x86")
        elif step.activation_type == "int8":
            warn("int8 activations ran 1.4-2.4x slower than uint8 on x86 in our measurements; prefer uint8")

    def _record_skipped(self, work: ir.Model) -> None:
        done = {change.name for change in self.log.layers}
        groups: collections.Counter[tuple[str, str]] = collections.Counter(
            (node.op_type, self._skip_reason(node))
            for node in work.graph
            if node.name not in done and node.op_type in self._supported and _has_weight(node)
        )
        for (op_type, reason), count in sorted(groups.items()):
            self.log.skip(f"{op_type} x{count}", reason)

    def _skip_reason(self, node: ir.Node) -> str:
        step = self.step
        if node.name in self._non_finite:
            return self._non_finite[node.name or ""]
        if node.name in self._left_float:
            return self._left_float[node.name or ""]
        if node.name in step.exclude_nodes:
            return "excluded by exclude_nodes"
        if node.op_type in step.exclude_op_types:
            return "excluded by exclude_op_types"
        if step.op_types is None and node.op_type == "Conv" and not self._static:
            return _CONV_REASON
        if step.op_types is not None and node.op_type not in step.op_types:
            return "not in op_types"
        return "ONNX Runtime's quantizer left it in float"

    def _summarize(self, result: ir.Model) -> None:
        step, summary = self.step, self.log.summary
        computed = [c for c in self.log.layers if not (c.note or "").startswith("int8 storage")]
        per_op = collections.Counter(op_type for op_type, _ in {(c.op_type, c.name) for c in computed})
        summary.update(
            mode=step.mode,
            format=step.format if self._static else "dynamic (integer ops)",
            per_channel=self._per_channel,
            weight_type=step.weight_type,
            activation_type=step.activation_type if self._static else "uint8 (computed at run time)",
            opset_after=result.opset_imports.get("", 0),
            quantized_weights=len(computed),
            quantized_nodes=[f"{op_type}: {count}" for op_type, count in sorted(per_op.items())],
        )
        if self._static:
            summary["calibration_method"] = step.calibration_method
        logger.info("quantized %d weights (%s)", len(self.log.layers), summary["quantized_nodes"])


def _adopted(model: ir.Model, result: ir.passes.PassResult) -> ir.passes.PassResult:
    return ir.passes.PassResult(_adopt(model, result.model), modified=result.modified)
