"""Int8 quantization through onnxruntime.quantization, with defaults chosen for x86 CPUs.

The pass quantizes no operator itself. It prepares a private copy of the model (Constant weights lifted
to initializers, the opset raised where ONNX Runtime's output needs it, optionally ``quant_pre_process``),
calls ``quantize_dynamic`` or ``quantize_static`` in the context's work directory and loads the result
fully into memory. Defaults avoid slow paths measured on x86: dynamic mode leaves Conv in float
(ConvInteger ran 1.2-6x slower than float Conv) and static activations default to uint8. Weights get one
scale per output channel unless the step says otherwise. When the step leaves op_types to the pass, the
int8 model is timed against the float one (interleaved, one thread); if it is slower, the pass quantizes
again without depthwise Conv, then with MatMul/Gemm only, and keeps the model in float when every try is
slower (static QDQ made small MobileNet-style CNNs 1.3-2.9x slower). In static mode, with op_types left to
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
import contextlib
import io
import logging
import os
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
from onnx.external_data_helper import uses_external_data
from onnx_ir.passes import common
from onnxruntime import quantization as ortq
from onnxruntime.quantization.registry import IntegerOpsRegistry, QDQRegistry, QLinearOpsRegistry

from onnx_ops.data import input_specs, resolve_shapes, synthesize
from onnx_ops.errors import CompressionError, PassFailedError, PlanError
from onnx_ops.evaluate import Runner, agreement, latency_ratio
from onnx_ops.passes._base import Feed, PassContext, PassLog, non_finite_reason
from onnx_ops.plan import QuantizeStep
from onnx_ops.report import LayerChange
from onnx_ops.validate import clean_message

__all__ = ["QuantizePass"]

logger = logging.getLogger(__name__)

# ORT's dynamic quantizer rewrites every Gemm into MatMul + Add first, so Gemm is quantizable there too.
_DYNAMIC_OPS = frozenset(IntegerOpsRegistry) | {"Gemm"}
_STATIC_OPS = frozenset(QLinearOpsRegistry) | frozenset(QDQRegistry)
_CONV_REASON = "dynamic mode leaves Conv in float: ConvInteger is slower than float on CPU"
_QTYPES = {"int8": ortq.QuantType.QInt8, "uint8": ortq.QuantType.QUInt8}
_METHODS = {method.name.lower(): method for method in ortq.CalibrationMethod}
# Per-axis DequantizeLinear needs opset 13 (ORT refuses per-channel QDQ files below it);
# DynamicQuantizeLinear needs 11.
_MIN_OPSET_STATIC, _MIN_OPSET_DYNAMIC = 13, 11
_INT8 = (ir.DataType.INT8, ir.DataType.UINT8)
# Quantizing these again would stack a second set of scales onto already-rounded values.
_QUANTIZED_OPS = frozenset({
    "QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear", "MatMulInteger", "ConvInteger", "QLinearConv",
    "QLinearMatMul", "QGemm", "DynamicQuantizeLSTM", "MatMulIntegerToFloat", "QAttention", "MatMulNBits",
    "GatherBlockQuantized",
})  # fmt: skip
_Selection = tuple[list[str], list[str]]
# The speed check: int8 must be faster than float (p50 ratio below this) or the next fallback is tried.
_SLOWER = 1.0
_TIMING_SECONDS, _MIN_RUNS, _MAX_RUNS = 1.0, 8, 60
# Below this a run is mostly ONNX Runtime's per-call overhead: too noisy to act on, and too fast to matter.
_MIN_CHECKED_MS = 0.5
_MATMUL_OPS = frozenset({"MatMul", "Gemm"})
_WEIGHT_OPS = frozenset({"Conv", "MatMul", "Gemm"})
_RECURRENT_OPS = frozenset({"LSTM", "GRU", "RNN"})
STORABLE_OPS = _WEIGHT_OPS | _RECURRENT_OPS  # whose float weights float_layer_weights may store as int8
# The fidelity check (static mode, op types left to the pass): an int8 model whose worst float output cosine
# on this many calibration samples is below _FAR_OFF is not used. Not a budget (auto has those): a floor
# against int8 that no longer computes what the model computes.
_FAR_OFF = 0.9
_FIDELITY_SAMPLES = 8


class QuantizePass(ir.passes.FunctionalPass):
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
        """Quantize a copy of model; the input model is left unchanged."""
        if self._static:  # also when precheck was not called: ORT's error for this is obscure
            _check_calibration(model, self.context.calibration)
        work = model.clone()
        # ORT raises (dynamic) or keeps float (static) on weights held in Constant nodes.
        common.LiftConstantsToInitializersPass(lift_all_constants=True, size_limit=0)(work)
        common.NameFixPass()(work)
        self._leave_non_finite(work)
        self._warn_slow_paths(work)
        if not self._quantizable(work):  # e.g. dynamic mode on a CNN: only int8 storage of the Conv weights
            return self._float_compute(work)
        source, output = self.context.workdir / "quantize_input.onnx", self.context.workdir / "quantize_output.onnx"
        onnx.save(self._upgrade_opset(ir.to_proto(work)), source)
        prepared = self._preprocess(source, self.context.workdir / "quantize_prepared.onnx")
        prepared_proto = onnx.load(prepared)
        if _flatten_gemm_bias(prepared_proto):
            prepared = self.context.workdir / "quantize_prepared_bias.onnx"
            onnx.save(prepared_proto, prepared)
        self._quantize(prepared, output, *_ort_selection(work, prepared_proto, self._wanted, self.step))
        result = _load_in_memory(output)
        if self.step.op_types is None and (self.step.speed_check or self._static):
            kept, reason = self._checked(work, prepared, prepared_proto, result)
            if kept is None:
                self._left_float = {node.name or "": reason for node in work.graph}
                return self._float_compute(work)
            result = kept
        self.log.layers = _layer_changes(work, prepared_proto, result)
        if self._embeddings_4bit:
            result = self._gather_4bit(result)
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

    def _checked(
        self, work: ir.Model, prepared: Path, prepared_proto: onnx.ModelProto, result: ir.Model
    ) -> tuple[ir.Model | None, str]:
        """The first int8 model that is faithful (static) and faster (speed_check): ORT's result, then fallbacks.

        Returns (None, why) to keep the model in float.
        """
        timing = self._timing(work) if self.step.speed_check else None
        fidelity = _Fidelity.of(work, self.context.calibration, self.log) if self._static else None
        self._fidelity = fidelity
        speeds: list[str] = []  # "<variant> <ratio>x"
        cosines: list[str] = []  # "<variant> <worst cosine> (<output>)"
        far_off: list[str] = []  # the cosines below _FAR_OFF
        fallbacks = self._fallbacks(work)
        label, wanted, excluded, candidate = "all selected types", self._wanted, list[str](), result
        index = 0
        while True:
            faithful = fidelity is None or fidelity.accepts(candidate, label, cosines)
            if not faithful:
                far_off.append(cosines[-1])
                if index == 0:  # weight layers only is the first remedy for far-off outputs
                    fallbacks = self._weight_layers_only(work) + fallbacks
            if faithful and timing is not None:
                ratio = _speed_ratio(timing[0], candidate, timing[1])
                speeds.append(f"{label} {ratio:.2f}x")
                faithful = ratio < _SLOWER
            if faithful:
                break
            if index == len(fallbacks):
                return None, self._keep_float(speeds, cosines, far_off)
            label, wanted, excluded = fallbacks[index]
            index += 1
            step = self.step.model_copy(update={"exclude_nodes": [*self.step.exclude_nodes, *excluded]})
            output = self.context.workdir / f"quantize_fallback_{index}.onnx"
            self._quantize(prepared, output, *_ort_selection(work, prepared_proto, wanted, step))
            candidate = _load_in_memory(output)
        summary = self.log.summary
        if cosines:
            summary["fidelity_check"] = "worst output cosine on calibration samples: " + "; ".join(cosines)
        if timing is not None:
            summary["speed_check"] = f"int8/float p50 {speeds[0].rsplit(' ', 1)[1]} (one thread)"
        if index == 0:
            return candidate, ""
        if far_off and far_off[0] == cosines[0]:
            why = f"int8 changed the outputs too much ({far_off[0]})"
        else:
            why = f"int8 was slower than float on this CPU ({speeds[0]})"
        reason = f"left in float: {why}"
        self._left_float = dict.fromkeys(excluded, reason) | {
            node.name or "": reason
            for node in work.graph
            if node.op_type in self._wanted - wanted and node.op_type in self._supported
        }
        self.log.warnings.append(f"{why.replace('int8', 'int8 with every selected type', 1)}; quantized {label}")
        if timing is not None:
            summary["speed_check"] = f"fell back to {label}: " + "; ".join(speeds)
        return candidate, ""

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

    def _timing(self, work: ir.Model) -> tuple[Runner, Feed] | None:
        """The float model and a feed to time int8 variants against; None (and a note) when timing is moot."""
        summary = self.log.summary
        try:
            feed = self._timing_feed(work)
            baseline = Runner(ir.to_proto(work), threads=1, what="model")
            float_ms = _median_ms(baseline, feed)
        except CompressionError as e:  # the pipeline's own check of the result reports real failures
            summary["speed_check"] = f"skipped: {e.message}"
            return None
        if float_ms < _MIN_CHECKED_MS:
            summary["speed_check"] = f"skipped: the float model runs in {float_ms:.3f} ms, too fast to time"
            return None
        return baseline, feed

    def _keep_float(self, speeds: list[str], cosines: list[str], far_off: list[str]) -> str:
        """Record why no int8 variant was used; returns the reason for each node left in float."""
        summary = self.log.summary
        if speeds:
            summary["speed_check"] = "kept float: " + "; ".join(speeds)
        if cosines:
            summary["fidelity_check"] = "worst output cosine on calibration samples: " + "; ".join(cosines)
        if far_off and not speeds:
            self.log.warnings.append(
                f"every int8 variant tried changed the outputs too much on the calibration samples (worst output "
                f"cosine below {_FAR_OFF}: " + "; ".join(far_off) + "), so the model was left in float; try mode "
                "dynamic, auto with a budget, or name op_types to quantize anyway"
            )
            return f"left in float: int8 changed the outputs too much (worst output cosine below {_FAR_OFF})"
        self.log.warnings.append(
            "every int8 variant tried was slower than the float model on this CPU ("
            + "; ".join(speeds)
            + (f"; the others changed the outputs too much: {'; '.join(far_off)}" if far_off else "")
            + "), so the model was left in float; name op_types to quantize anyway"
        )
        return "left in float: every int8 variant tried was slower than float on this CPU"

    def _weight_layers_only(self, work: ir.Model) -> list[tuple[str, set[str], list[str]]]:
        present = {node.op_type for node in work.graph} & self._wanted
        weights = present & _WEIGHT_OPS
        return [("weight layers only", weights, [])] if weights and weights != present else []

    def _gather_4bit(self, model: ir.Model) -> ir.Model:
        """Quantize float Gather tables to 4-bit blocks (GatherBlockQuantized) with ORT's MatMulNBitsQuantizer."""
        from onnxruntime.quantization.matmul_nbits_quantizer import (
            DefaultWeightOnlyQuantConfig,
            MatMulNBitsQuantizer,
        )

        proto = ir.to_proto(model)
        excluded = set(self.step.exclude_nodes)
        gathers = {n.name: n for n in proto.graph.node if n.op_type == "Gather" and n.name not in excluded}
        config = DefaultWeightOnlyQuantConfig(
            block_size=32, is_symmetric=True, op_types_to_quantize=("Gather",), quant_axes=(("Gather", 1),)
        )
        try:
            quantizer = MatMulNBitsQuantizer(proto, nodes_to_exclude=self.step.exclude_nodes, algo_config=config)
            quantizer.process()
        except Exception as e:
            raise PassFailedError(f"quantize (4-bit embeddings) failed: {self._clean(e)}") from e
        result: onnx.ModelProto = quantizer.model.model
        sizes = {init.name: list(init.dims) for init in proto.graph.initializer}
        for node in result.graph.node:
            if node.op_type != "GatherBlockQuantized":
                continue
            source = gathers.get(node.name.removesuffix("_Q4")) or next(iter(gathers.values()), None)
            weight = source.input[0] if source is not None else node.input[0]
            shape = sizes.get(weight, [])
            count = int(np.prod(shape)) if shape else 0
            self.log.layers.append(LayerChange(
                name=source.name if source is not None else node.name, op_type="Gather", weight=weight,
                shape_before=shape, shape_after=shape, params_before=count, params_after=count,
                note="int4 blocks of 32 (weight-only)",
            ))  # fmt: skip
        self.log.summary["embedding_bits"] = 4
        self.log.summary["embeddings_4bit"] = sum(n.op_type == "GatherBlockQuantized" for n in result.graph.node)
        return ir.from_proto(result)

    def _fallbacks(self, work: ir.Model) -> list[tuple[str, set[str], list[str]]]:
        """(label, op types, extra excluded nodes) to try, in order, after the default selection was slower."""
        options: list[tuple[str, set[str], list[str]]] = []
        depthwise = [node.name or "" for node in work.graph if node.op_type == "Conv" and _is_depthwise(node)]
        if depthwise and "Conv" in self._wanted:
            options.append((f"without {len(depthwise)} depthwise Conv", self._wanted, depthwise))
        matmuls = self._wanted & _MATMUL_OPS
        has_matmul = any(node.op_type in matmuls and _has_weight(node) for node in work.graph)
        has_others = any(node.op_type in self._wanted - matmuls for node in work.graph)
        if has_matmul and has_others:
            options.append(("MatMul/Gemm only", matmuls, []))
        return options

    def _timing_feed(self, work: ir.Model) -> Feed:
        if self.context.calibration:
            return dict(self.context.calibration[0])
        specs = input_specs(ir.to_proto(work))
        shapes = resolve_shapes(specs, self.context.input_shapes)
        return synthesize(specs, shapes, 1, seed=0, max_elements=1 << 24)[0]

    def _warn_slow_paths(self, model: ir.Model) -> None:
        step, warn = self.step, self.log.warnings.append
        convs = sum(node.op_type == "Conv" for node in model.graph)
        if not self._static:
            if convs and step.op_types is None:
                self.log.summary["conv_left_in_float"] = convs
                warn(f"dynamic mode left {convs} Conv node(s) in float: ConvInteger is slower than float Conv on x86")
            elif convs and "Conv" in self._wanted:
                warn("Conv quantized in dynamic mode: ONNX Runtime documents ConvInteger as slow on x86")
            if step.activation_type == "int8":
                warn("activation_type is ignored in dynamic mode (activations are quantized to uint8)")
        elif step.activation_type == "int8" and step.weight_type == "int8" and step.format == "qoperator":
            warn("int8 activations with int8 weights in QOperator format are documented slow on x86")
        elif step.activation_type == "int8":
            warn("int8 activations ran 1.4-2.4x slower than uint8 on x86 in our measurements; prefer uint8")

    def _upgrade_opset(self, proto: onnx.ModelProto) -> onnx.ModelProto:
        before = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), 1)
        needed = _MIN_OPSET_STATIC if self._static or self._per_channel else _MIN_OPSET_DYNAMIC
        self.log.summary["opset_before"] = before
        self.log.summary["opset"] = f"{before} (unchanged)" if before >= needed else f"upgraded {before} -> {needed}"
        if before >= needed:  # never downgrade
            return proto
        try:
            return onnx.version_converter.convert_version(proto, needed)
        except Exception as e:
            if not self._static and self._per_channel:  # dynamic int8 works below 13, per tensor
                self._per_channel = False
                self.log.warnings.append(f"opset {before} could not be raised to 13: weights quantized per tensor")
                return proto
            raise PassFailedError(f"quantize needs opset {needed}; upgrading failed: {self._clean(e)}") from e

    def _preprocess(self, source: Path, target: Path) -> Path:
        mode = self.step.preprocess
        self.log.summary["preprocess"] = "off" if mode == "off" else "applied"
        if mode == "off":
            return source
        try:
            # Its symbolic shape inference failed on 5 of 9 real models; ONNX shape inference still runs.
            ortq.quant_pre_process(str(source), str(target), skip_symbolic_shape=True)
        except Exception as e:
            reason = self._clean(e)
            if mode == "on":
                raise PassFailedError(f"quantize preprocessing (quant_pre_process) failed: {reason}") from e
            self.log.warnings.append(f"quant_pre_process failed, quantized without it: {reason}")
            self.log.summary["preprocess"] = "failed, skipped"
            return source
        return target

    def _quantize(self, source: Path, target: Path, op_types: list[str], exclude: list[str]) -> None:
        step = self.step
        args = {"op_types_to_quantize": op_types, "nodes_to_exclude": exclude, "per_channel": self._per_channel}
        args |= {"reduce_range": step.reduce_range, "weight_type": _QTYPES[step.weight_type]}
        with _ort_log_captured() as captured:
            self._call_ort(source, target, args)
        if captured:
            self.log.summary["onnxruntime_log_messages"] = len(captured)
            logger.debug("onnxruntime.quantization said:\n%s", "\n".join(captured))

    def _call_ort(self, source: Path, target: Path, args: dict[str, object]) -> None:
        step = self.step
        try:
            if not self._static:
                ortq.quantize_dynamic(str(source), str(target), extra_options={"MatMulConstBOnly": True}, **args)
                return
            feeds = _pick(self.context.calibration or [], step.calibration_samples)
            self.log.summary["calibration_samples"] = len(feeds)
            fmt = ortq.QuantFormat.QDQ if step.format == "qdq" else ortq.QuantFormat.QOperator
            # The histogram calibrators print progress to stdout, which belongs to the CLI.
            with contextlib.redirect_stdout(io.StringIO()) as printed:
                ortq.quantize_static(
                    str(source), str(target), self.context.calibration_reader(feeds), quant_format=fmt,
                    activation_type=_QTYPES[step.activation_type], calibrate_method=_METHODS[step.calibration_method],
                    **args,
                )  # fmt: skip
            logger.debug("onnxruntime calibration output: %s", printed.getvalue())
        except Exception as e:
            label = f"static, {step.format}" if self._static else "dynamic"
            raise PassFailedError(f"quantize ({label}) failed: {self._clean(e)}") from e

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

    def _clean(self, error: BaseException) -> str:
        """The error's message without the work directory or any other file system path."""
        return clean_message(str(error).replace(str(self.context.workdir), "<workdir>"), limit=300)


class _Fidelity:
    """The float model's outputs on a few calibration samples, to compare int8 variants with."""

    def __init__(self, feeds: list[Feed], names: list[str], reference: list[list[object]]) -> None:
        self.feeds, self.names, self.reference = feeds, names, reference

    @classmethod
    def of(cls, work: ir.Model, calibration: Sequence[Feed] | None, log: PassLog) -> _Fidelity | None:
        feeds = _pick(calibration or [], _FIDELITY_SAMPLES)
        try:
            runner = Runner(ir.to_proto(work), what="model")
            reference = [runner.run(feed) for feed in feeds]
        except CompressionError as e:  # the pipeline's own check of the result reports real failures
            log.summary["fidelity_check"] = f"skipped: {e.message}"
            return None
        return cls(feeds, runner.output_names, reference) if feeds else None

    def accepts(self, model: ir.Model, label: str, notes: list[str]) -> bool:
        """False when some float output's cosine is below _FAR_OFF; appends a note on what was found to notes."""
        try:
            runner = Runner(ir.to_proto(model), what="quantized model")
            found = agreement(self.names, self.reference, [runner.run(feed) for feed in self.feeds])
        except CompressionError as e:  # e.g. a changed output shape: the pipeline reports it on the result
            notes.append(f"{label}: not checked ({e.message})")
            return True
        floating = {n for n, out in zip(self.names, self.reference[0], strict=True) if _is_float_array(out)}
        worst = min((a for a in found if a.name in floating), key=lambda a: a.cosine, default=None)
        if worst is None:
            notes.append(f"{label}: no float output")
            return True
        notes.append(f"{label} {worst.cosine:.3f} ({worst.name})")
        return worst.cosine >= _FAR_OFF


def _is_float_array(value: object) -> bool:
    return isinstance(value, np.ndarray) and value.dtype.kind == "f"


class _FeedReader(ortq.CalibrationDataReader):  # type: ignore[misc]  # ORT ships no type hints
    """Hands ONNX Runtime's calibrator one feed dict per call."""

    def __init__(self, feeds: Sequence[Feed]) -> None:
        self._feeds = iter(feeds)

    def get_next(self) -> Feed | None:
        return next(self._feeds, None)


class _OrtRecords(logging.Filter):
    """Takes the records onnxruntime.quantization writes to the root logger (it calls logging.warning)."""

    def __init__(self) -> None:
        super().__init__()
        self.messages: list[str] = []

    def filter(self, record: logging.LogRecord) -> bool:
        if f"{os.sep}onnxruntime{os.sep}" in record.pathname:
            self.messages.append(record.getMessage())
            return False
        return True


@contextlib.contextmanager
def _ort_log_captured() -> Iterator[list[str]]:
    """Keep onnxruntime.quantization's root-logger warnings out of the user's log while it runs.

    It warns about every tensor it cannot type ("Inference failed or unsupported type ..."): hundreds of lines
    on some models, none actionable. The pass counts them; debug logging shows them.
    """
    records = _OrtRecords()
    root = logging.getLogger()
    root.addFilter(records)
    try:
        yield records.messages
    finally:
        root.removeFilter(records)


def _speed_ratio(baseline: Runner, quantized: ir.Model, feed: Feed) -> float:
    """p50 latency of the quantized model over the float one: one thread, interleaved, about a second."""
    candidate = Runner(ir.to_proto(quantized), threads=1, what="quantized model")
    start = time.perf_counter()
    for _ in range(2):
        baseline.session.run(None, feed)
        candidate.session.run(None, feed)
    per_pair = max((time.perf_counter() - start) / 2, 1e-6)
    runs = int(min(max(_TIMING_SECONDS / per_pair, _MIN_RUNS), _MAX_RUNS))
    return latency_ratio(baseline, candidate, feed, runs=runs, warmup=1)


def _median_ms(runner: Runner, feed: Feed, runs: int = 5) -> float:
    runner.session.run(None, feed)
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        runner.session.run(None, feed)
        times.append((time.perf_counter() - start) * 1000.0)
    return float(np.median(times))


def _is_depthwise(node: ir.Node) -> bool:
    group = node.attributes.get("group")
    return group is not None and group.as_int() > 1


def _pick(feeds: Sequence[Feed], limit: int | None) -> list[Feed]:
    # Evenly spaced rather than the first n: calibration files are often sorted by class or source.
    if limit is None or limit >= len(feeds):
        return list(feeds)
    return [feeds[i] for i in np.unique(np.linspace(0, len(feeds) - 1, limit).round().astype(int))]


def _check_calibration(model: ir.Model, calibration: Sequence[Feed] | None) -> None:
    if not calibration:
        raise PlanError("static quantization needs calibration data: one array per model input (or use dynamic)")
    required = {v.name or "" for v in model.graph.inputs if v.const_value is None}
    known = {v.name or "" for v in model.graph.inputs}
    for index, feed in enumerate(calibration):
        missing, unknown = sorted(required - feed.keys()), sorted(feed.keys() - known)
        if missing or unknown:
            raise PlanError(
                f"calibration sample {index} does not match the model's inputs ({', '.join(sorted(required))}): "
                f"missing {missing or 'none'}, unknown {unknown or 'none'}"
            )


def _has_weight(node: ir.Node) -> bool:
    """True if a float input of at least 2 dimensions is constant (an initializer or a Constant node)."""
    for value in node.inputs:
        producer = value.producer() if value is not None else None
        if producer is not None and producer.op_type == "Constant" and producer.domain in ("", "ai.onnx"):
            return True
        tensor = value.const_value if value is not None else None
        if tensor is not None and tensor.dtype.is_floating_point() and len(tensor.shape) >= 2:
            return True
    return False


_MIN_STORED_ELEMENTS = 256  # smaller weights gain less than their scale and two nodes cost


def _store_int8(model: ir.Model, notes: dict[str, str]) -> list[LayerChange]:
    """Replace the float weights of each node named in `notes` by int8 -> Cast -> Mul(scale per output channel).

    Symmetric int8 (-127..127, zero point 0). Only float32 initializers of at least _MIN_STORED_ELEMENTS that
    only this node uses (and that are not graph inputs) are changed. ONNX Runtime's constant folding turns the
    Cast and Mul back into one float initializer when it loads the model, so the layer runs as before; a
    DequantizeLinear would not be folded, and Conv would lose its pre-packed weight (measured 1.3-2.5x slower).
    """
    changes = []
    for node in list(model.graph):
        if node.name not in notes:
            continue
        for index, axis in _weight_axes(node):
            weight = node.inputs[index] if index < len(node.inputs) else None
            tensor = weight.const_value if weight is not None else None
            if (
                weight is None
                or tensor is None
                or not weight.is_initializer()
                or weight.is_graph_input()
                or tensor.dtype != ir.DataType.FLOAT
                or tensor.size < _MIN_STORED_ELEMENTS
                or len(weight.uses()) != 1
                or non_finite_reason(weight)
            ):
                continue
            array = tensor.numpy()
            axis = axis % array.ndim
            others = tuple(i for i in range(array.ndim) if i != axis)
            shape = [1] * array.ndim
            shape[axis] = -1
            scale = (np.abs(array).max(axis=others) / 127.0).astype(np.float32).reshape(shape)
            scale[scale == 0] = 1.0  # an all-zero channel
            quantized = np.clip(np.round(array / scale), -127, 127).astype(np.int8)
            name = weight.name or f"{node.name}_input{index}"
            stored, scales = _initializer(f"{name}_int8", quantized), _initializer(f"{name}_scale", scale)
            model.graph.register_initializer(stored)
            model.graph.register_initializer(scales)
            cast = ir.node("Cast", [stored], attributes={"to": ir.DataType.FLOAT}, name=f"{name}_cast")
            mul = ir.node("Mul", [cast.outputs[0], scales], name=f"{name}_scale")
            for output, suffix in ((cast.outputs[0], "cast"), (mul.outputs[0], "float")):
                output.name, output.shape = f"{name}_{suffix}", weight.shape
                output.type = ir.TensorType(ir.DataType.FLOAT)
            model.graph.insert_before(node, [cast, mul])
            node.replace_input_with(index, mul.outputs[0])
            model.graph.initializers.pop(weight.name or "")
            restored = quantized.astype(np.float32) * scale
            changes.append(LayerChange(
                name=node.name or name, op_type=node.op_type, weight=name, shape_before=list(array.shape),
                shape_after=list(array.shape), params_before=int(array.size), params_after=int(array.size),
                rel_error=float(np.linalg.norm(restored - array) / (np.linalg.norm(array) or 1.0)),
                note=notes[node.name or ""],
            ))  # fmt: skip
    return changes


def _weight_axes(node: ir.Node) -> list[tuple[int, int]]:
    """(input index, output-channel axis) of each weight of a layer whose weights can be stored as int8."""
    if node.op_type == "Conv":
        return [(1, 0)]  # [M, C/group, k...]
    if node.op_type == "Gemm":
        attribute = node.attributes.get("transB")
        return [(1, 0 if attribute is not None and attribute.as_int() else 1)]
    if node.op_type == "MatMul":
        return [(1, -1)]  # the output columns
    if node.op_type in _RECURRENT_OPS:
        return [(1, 1), (2, 1)]  # W and R: [directions, gates x hidden, input or hidden]
    return []


def _unfolded(model: ir.Model, weights: set[str], workdir: Path) -> str:
    """Which stored weights ONNX Runtime's basic graph optimizations leave as int8 -> Cast -> Mul ("" if none)."""
    optimized = workdir / "int8_storage_optimized.onnx"
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    options.optimized_model_filepath = str(optimized)
    options.log_severity_level = 3
    try:
        ort.InferenceSession(ir.to_proto(model).SerializeToString(), options, providers=["CPUExecutionProvider"])
        used = {name for node in onnx.load(optimized).graph.node for name in node.input}
    except Exception as e:  # whatever it is, the model without int8 storage is the safe one
        return f"it could not check: {clean_message(str(e), limit=120)}"
    finally:
        optimized.unlink(missing_ok=True)
    left = sorted(weight for weight in weights if f"{weight}_int8" in used)
    return ", ".join(left[:3]) + (f" and {len(left) - 3} more" if len(left) > 3 else "")


def _initializer(name: str, array: np.ndarray) -> ir.Value:
    tensor = ir.tensor(array, name=name)
    return ir.Value(name=name, shape=ir.Shape(array.shape), type=ir.TensorType(tensor.dtype), const_value=tensor)


def _quantized_parts(model: ir.Model) -> str:
    """What makes the model already quantized: quantization nodes or 8-bit weight tensors ("" if none)."""
    ops = sorted({node.op_type for node in model.graph if node.op_type in _QUANTIZED_OPS})
    # Weight-only int8 exports (int8 initializer -> Cast -> Mul) have no quantization node at all.
    weights = sum(
        v.const_value is not None and v.const_value.dtype in _INT8 and len(v.const_value.shape) >= 2
        for v in model.graph.initializers.values()
    )
    parts = [f"{', '.join(ops)} nodes"] if ops else []
    return "; ".join(parts + ([f"{weights} int8/uint8 weight tensors"] if weights else []))


def _flatten_gemm_bias(proto: onnx.ModelProto) -> bool:
    """Reshape Gemm biases of shape [1, N] (which Gemm broadcasts like [N]) to [N]; True if any changed."""
    # ORT's per-channel QDQ bias check indexes the bias per channel and raises on [1, N], which skl2onnx
    # writes (MatMul + Add, fused into Gemm by preprocessing).
    graph = proto.graph
    inputs = {value.name for value in graph.input}
    initializers = {init.name: init for init in graph.initializer if init.name not in inputs}
    uses = collections.Counter(name for node in graph.node for name in node.input)
    changed = set()
    for node in graph.node:
        bias = initializers.get(node.input[2]) if node.op_type == "Gemm" and len(node.input) > 2 else None
        if bias is not None and len(bias.dims) == 2 and bias.dims[0] == 1 and uses[bias.name] == 1:
            bias.CopyFrom(onnx.numpy_helper.from_array(onnx.numpy_helper.to_array(bias).reshape(-1), bias.name))
            changed.add(bias.name)
    kept = [info for info in graph.value_info if info.name not in changed]  # their recorded shape is now wrong
    del graph.value_info[:]
    graph.value_info.extend(kept)
    return bool(changed)


def _original_node(nodes: dict[str, ir.Node], name: str) -> ir.Node | None:
    # ORT's graph optimizer names a fused node "<first original node>/<FusionName>".
    return nodes.get(name) or nodes.get(name.split("/")[0])


def _ort_selection(work: ir.Model, prepared: onnx.ModelProto, wanted: set[str], step: QuantizeStep) -> _Selection:
    """ORT's op_types_to_quantize and nodes_to_exclude, chosen by each node's original name and op type."""
    # Preprocessing renames and retypes nodes (MatMul + Add becomes Gemm "<name>/MatMulAddFusion").
    nodes = {node.name or "": node for node in work.graph}
    dynamic = step.mode == "dynamic"
    op_types, exclude = set(wanted), []
    for node in prepared.graph.node:
        if node.op_type not in (_DYNAMIC_OPS if dynamic else _STATIC_OPS):
            continue  # ORT never quantizes it; listing it would only slow ORT's list lookups
        original = _original_node(nodes, node.name)
        if (original or node).op_type in wanted and (original is None or original.name not in step.exclude_nodes):
            op_types.add(node.op_type)
            continue
        exclude.append(node.name)
        if node.op_type == "Gemm" and dynamic:
            exclude.append(f"{node.name}_MatMul")  # the name ORT's Gemm -> MatMul rewrite gives it
    if dynamic and "Gemm" in op_types:  # ORT's dynamic quantizer sees every Gemm as a MatMul
        op_types = (op_types - {"Gemm"}) | {"MatMul"}
    return sorted(op_types), exclude


def _layer_changes(work: ir.Model, prepared: onnx.ModelProto, result: ir.Model) -> list[LayerChange]:
    """One LayerChange per weight that ORT stored as int8/uint8, named as in the original model."""
    nodes = {node.name or "": node for node in work.graph}
    initializers = {init.name for init in prepared.graph.initializer}
    users: dict[str, tuple[onnx.NodeProto, int]] = {}
    for node in prepared.graph.node:
        for index, name in enumerate(node.input):
            if name in initializers:
                users.setdefault(name, (node, index))
    changes = []
    for name, value in result.graph.initializers.items():
        tensor = value.const_value
        source = name.removesuffix("_quantized")
        source = source if source in users else source.removesuffix("_Transposed")  # ORT's Gemm -> MatMul
        if tensor is None or tensor.dtype not in _INT8 or not name.endswith("_quantized") or source not in users:
            continue
        node, index = users[source]
        original = _original_node(nodes, node.name)
        weight = original.inputs[index] if original is not None and index < len(original.inputs) else None
        weight = weight if weight is not None and weight.const_value is not None else None  # else keep ORT's view
        before = tensor if weight is None or weight.const_value is None else weight.const_value
        scale = result.graph.initializers.get(name.removesuffix("_quantized") + "_scale")
        per_channel = scale is not None and scale.const_value is not None and scale.const_value.size > 1
        changes.append(LayerChange(
            name=original.name if original is not None and original.name else node.name,
            op_type=original.op_type if original is not None else node.op_type,
            weight=weight.name if weight is not None and weight.name else source,
            shape_before=list(before.shape.numpy()),
            shape_after=list(tensor.shape.numpy()), params_before=tensor.size, params_after=tensor.size,
            note=f"{tensor.dtype.name.lower()} {'per-channel' if per_channel else 'per-tensor'}",
        ))  # fmt: skip
    return changes


def _load_in_memory(path: Path) -> ir.Model:
    """Load ORT's output with every tensor in memory, so the work directory can be deleted."""
    proto = onnx.load(path, load_external_data=False)
    if any(uses_external_data(init) for init in proto.graph.initializer):
        raise PassFailedError("quantize failed: ONNX Runtime wrote the weights to external data files")
    return ir.from_proto(proto)
