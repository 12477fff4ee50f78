"""The calls into onnxruntime.quantization and the bookkeeping around them (names, opsets, log records)."""

from __future__ import annotations

import collections
import contextlib
import io
import logging
import os
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
from onnxruntime import quantization as ortq
from onnxruntime.quantization.registry import IntegerOpsRegistry, QDQRegistry, QLinearOpsRegistry

from onnx_ops.errors import PassFailedError, PlanError
from onnx_ops.passes._base import Feed, PassContext, PassLog
from onnx_ops.passes.quantize import dynamic_calibrated, recovery, tail
from onnx_ops.plan import QuantizeStep
from onnx_ops.report import LayerChange
from onnx_ops.validate import clean_message

__all__: list[str] = []  # package-private: the pass in onnx_ops.passes.quantize is the interface

logger = logging.getLogger(__name__)

# ORT's dynamic quantizer rewrites every Gemm into MatMul + Add first, so Gemm is quantizable there too.
_DYNAMIC_OPS = frozenset(IntegerOpsRegistry) | {"Gemm"}
_STATIC_OPS = frozenset(QLinearOpsRegistry) | frozenset(QDQRegistry)
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


class _OrtCalls:
    """The pass's calls into ONNX Runtime's quantization tools (a mixin of QuantizePass)."""

    step: QuantizeStep
    context: PassContext
    log: PassLog
    _static: bool
    _per_channel: bool
    _large: bool = False  # past 2 GiB: ORT's tools read and write external data (in the work directory)

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
        if mode == "auto" and self._large:  # it loads the model and builds a session of it besides: 2-3 more copies
            self.log.summary["preprocess"] = "skipped: the model is past 2 GiB ('on' forces it)"
            return source
        try:
            # Its symbolic shape inference failed on 5 of 9 real models; ONNX shape inference still runs.
            ortq.quant_pre_process(
                str(source), str(target), skip_symbolic_shape=True, save_as_external_data=self._large
            )
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
            if self._static or self._large:
                self._call_ort(source, target, args)
            else:  # per-column embedding tables; with calibration data, optionally GPTQ rounding
                feeds = _pick(self.context.calibration or [], step.calibration_samples)
                call = lambda s, t: self._call_ort(s, t, args)  # noqa: E731
                dynamic_calibrated.quantize(
                    source, target, call, step=step, feeds=feeds, log=self.log, clean=self._clean
                )
        if self._static and step.recovery != "off" and step.format == "qdq":
            feeds = _pick(self.context.calibration or [], step.calibration_samples)
            recovery.recover_file(source, target, step, feeds, self.log, self._clean)
        if captured:
            self.log.summary["onnxruntime_log_messages"] = len(captured)
            logger.debug("onnxruntime.quantization said:\n%s", "\n".join(captured))

    def _call_ort(self, source: Path, target: Path, args: dict[str, object]) -> None:
        step = self.step
        try:
            if not self._static:
                ortq.quantize_dynamic(
                    str(source), str(target), extra_options={"MatMulConstBOnly": True},
                    use_external_data_format=self._large, **args,
                )  # fmt: skip
                return
            feeds = _pick(self.context.calibration or [], step.calibration_samples)
            self.log.summary["calibration_samples"] = len(feeds)
            fmt = ortq.QuantFormat.QDQ if step.format == "qdq" else ortq.QuantFormat.QOperator
            # The histogram calibrators print progress to stdout, which belongs to the CLI.
            with contextlib.redirect_stdout(io.StringIO()) as printed:
                ortq.quantize_static(
                    str(source), str(target), self.context.calibration_reader(feeds), quant_format=fmt,
                    activation_type=_QTYPES[step.activation_type], calibrate_method=_METHODS[step.calibration_method],
                    use_external_data_format=self._large, **args,
                )  # fmt: skip
            logger.debug("onnxruntime calibration output: %s", printed.getvalue())
        except Exception as e:
            label = f"static, {step.format}" if self._static else "dynamic"
            raise PassFailedError(f"quantize ({label}) failed: {self._clean(e)}") from e

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

    def _clean(self, error: BaseException) -> str:
        """The error's message without the work directory or any other file system path."""
        return clean_message(str(error).replace(str(self.context.workdir), "<workdir>"), limit=300)


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
    if not dynamic and step.op_types is None:  # static, types left to the pass: the output tail stays float
        exclude += [name for name in tail.output_tail(prepared.graph) if name not in exclude]
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
    """Load ORT's output with every tensor in memory, so the work directory can be deleted.

    A model past 2 GiB was written by ORT's tools with its weights in a data file beside it, in the work
    directory (a file this pass had them write, not an upload): read too.
    """
    return ir.from_proto(onnx.load(path))
