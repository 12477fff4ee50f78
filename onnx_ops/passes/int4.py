"""Weight-only int4: MatMul, Gemm and embedding weights in 4-bit blocks through ONNX Runtime's MatMulNBitsQuantizer.

Each chosen MatMul becomes a ``MatMulNBits`` node (com.microsoft) holding its weight as 4-bit levels in blocks
of ``block_size`` along the input dimension, with one scale (and, asymmetric, one 4-bit zero point) per block;
ONNX Runtime computes it on CPU with activations in the precision ``accuracy_level`` names. A Gemm with a
constant weight is rewritten as MatMul + Add first (ONNX Runtime quantizes no Gemm). Embedding tables (Gather)
become ``GatherBlockQuantized``, which needs opset 21: the model is converted to it first, or its Gathers stay
in float when that fails. Methods: rtn (ONNX Runtime's C++ block quantizer), hqq (its HQQ quantizer, which
needs PyTorch) and gptq (ONNX Runtime's GPTQ solver on the calibration data, see _gptq.py, then packed by the
rtn quantizer). Per layer the report gives the bytes before and after and the relative error of the weight.
"""

from __future__ import annotations

import importlib.util
import logging

import onnx
import onnx_ir as ir
from onnx_ir.passes import common
from onnxruntime.quantization import matmul_nbits_quantizer as nbits

from onnx_ops.errors import PassFailedError, PlanError
from onnx_ops.passes import _base
from onnx_ops.passes._base import PassContext, PassLog, constant_array, is_constant_weight, non_finite_reason
from onnx_ops.passes._gptq import Rounded, gptq_weights, store_levels
from onnx_ops.passes._int4_layers import QUANTIZED_OPS, all_graphs, gemm_as_matmul, layer_changes
from onnx_ops.passes._int4_own import quantize_node
from onnx_ops.plan import Int4Step
from onnx_ops.report import LayerChange
from onnx_ops.validate import clean_message

__all__ = ["Int4QuantizePass"]

logger = logging.getLogger(__name__)
# The quantizer logs every node it visits at INFO (and configures the root logger when imported).
logging.getLogger(nbits.__name__).setLevel(logging.WARNING)

# GPTQ fits the Hessian of the calibration activations: with 64 rows for 64-128 inputs it did worse than rtn on
# held-out inputs of an MLP, with 256 rows better (tests/test_int4.py)
_GPTQ_ROWS_PER_INPUT = 2
_GATHER_OPSET = 21  # int4 tensors (GatherBlockQuantized's data) need opset 21 and IR version 10


class Int4QuantizePass(ir.passes.FunctionalPass):
    """Store MatMul/Gemm/Gather weights as 4-bit blocks that ONNX Runtime computes with directly."""

    def __init__(self, step: Int4Step, context: PassContext, *, own_path: bool = True) -> None:
        """The pass for `step`; `own_path` False gives rtn to ONNX Runtime's full-model quantizer too."""
        super().__init__()
        self.own_path = own_path
        self.step = step
        self.context = context
        self.log = PassLog()
        self._no_gather = ""  # why Gathers stay in float (the opset could not be raised), once known
        self._rounded: dict[str, Rounded] = {}  # gptq: weight name -> its levels, scales and zero points

    def precheck(self, model: ir.Model) -> None:
        """Raise PlanError when the step cannot work on this model or with this data."""
        step = self.step
        if found := sorted({n.op_type for n in model.graph.all_nodes() if n.op_type in QUANTIZED_OPS}):
            raise PlanError(f"the model is already quantized (it has {', '.join(found)}); give its float original")
        if step.method == "hqq" and importlib.util.find_spec("torch") is None:
            raise PlanError("int4 method 'hqq' needs PyTorch, which is not installed here; use 'rtn' or 'gptq'")
        if step.method == "gptq" and not self.context.calibration:
            raise PlanError("int4 method 'gptq' needs calibration data (one array per model input); or use 'rtn'")
        if missing := sorted(set(step.exclude_nodes) - {node.name or "" for node in model.graph.all_nodes()}):
            raise PlanError(f"exclude_nodes names nodes the model does not have: {', '.join(missing)}")
        reasons = [self._reason(node) for node in model.graph]
        if not any(isinstance(reason, tuple) for reason in reasons):
            skipped = [reason for reason in reasons if isinstance(reason, str)]
            raise PlanError(
                f"no {'/'.join(step.op_types)} node has a constant 2-D float32 weight of at least "
                f"{step.min_elements} elements to store in 4 bits"
                + (f" ({skipped[0]}{f', and {len(skipped) - 1} more' if len(skipped) > 1 else ''})" if skipped else "")
            )

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        """Quantize a copy of model; the input model is left unchanged."""
        work = model.clone()
        common.LiftConstantsToInitializersPass(lift_all_constants=True, size_limit=0)(work)
        common.NameFixPass()(work)
        if any(node.op_type == "Gather" and isinstance(self._reason(node), tuple) for node in work.graph):
            work = self._raise_opset(work)
        chosen: dict[str, tuple[str, ir.Value]] = {}  # node name -> (original op type, weight)
        for node in list(work.graph):
            reason = self._reason(node)
            if isinstance(reason, str):
                self.log.skip(node.name or node.op_type, reason)
            elif reason is not None and node.op_type == "Gemm":
                matmul = gemm_as_matmul(work.graph, node)
                if isinstance(matmul, str):
                    self.log.skip(node.name or "Gemm", matmul)
                else:
                    chosen[matmul.name or ""] = ("Gemm", matmul.inputs[1])  # type: ignore[assignment]
            elif reason is not None:
                chosen[node.name or ""] = (node.op_type, reason[1])
        if self.step.method == "rtn" and self.own_path:
            self._quantize_own(work, chosen)
            return ir.passes.PassResult(work, modified=bool(self.log.layers))
        self.log.summary["quantizer"] = f"onnxruntime: {self.step.method} through its full-model quantizer"
        gathers = {name for name, (op, _) in chosen.items() if op == "Gather"}
        # The float tensors themselves (GPTQ replaces the values' tensors), read one at a time when recorded.
        before = {name: (op, w.name or "", _tensor(w)) for name, (op, w) in chosen.items()}
        if self.step.method == "gptq":
            self._gptq(work, chosen)
        proto = ir.to_proto(work)
        matmuls = {name for name, (op, _) in chosen.items() if op != "Gather"}
        if matmuls:
            proto = self._quantize(proto, matmuls, self._config(("MatMul",)))
        if self._rounded:
            weights = {name: weight for name, (_, weight, _) in before.items()}
            store_levels(proto, self._rounded, weights, symmetric=self.step.symmetric)
        if gathers:
            proto = self._quantize(proto, gathers, self._rtn(("Gather",), (("Gather", 1),)))
        self._record(proto, before)
        return ir.passes.PassResult(ir.from_proto(proto), modified=bool(self.log.layers))

    def _quantize_own(self, work: ir.Model, chosen: dict[str, tuple[str, ir.Value]]) -> None:
        """rtn: each chosen node quantized in place by ONNX Runtime's per-node quantizer (see _int4_own)."""
        nodes = {node.name or "": node for node in work.graph}
        done: dict[str, tuple[LayerChange, int]] = {}
        # MatMuls first, then Gathers: the order in which ONNX Runtime's quantizer, run once per kind, adds tensors
        for name, (op, _) in sorted(chosen.items(), key=lambda item: item[1][0] == "Gather"):
            kind = ("Gather",) if op == "Gather" else ("MatMul",)
            config = self._rtn(kind, (("Gather", 1),) if op == "Gather" else None)
            try:
                done[name] = quantize_node(work.graph, nodes[name], config, (op, self.step.method))
            except Exception as e:
                raise PassFailedError(f"int4 ({self.step.method}) failed: {self._clean(e)}") from e
        if any(op == "Gather" for op, _ in chosen.values()):
            work.ir_version = max(10, work.ir_version)
        _base.release_proto(work)
        self.log.layers = [done[name][0] for name in chosen]
        self.log.summary["quantizer"] = "own (onnxruntime's MatMulNBits nodes, built weight by weight)"
        self._summarize(sum(layer.params_before * 4 for layer in self.log.layers), sum(b for _, b in done.values()))

    def _reason(self, node: ir.Node) -> tuple[str, ir.Value] | str | None:
        """(op type, weight) for a node to quantize, a reason it is skipped, or None when it is no candidate."""
        step = self.step
        if node.op_type not in step.op_types or node.domain != "" or len(node.inputs) < 2:
            return None
        weight = node.inputs[0] if node.op_type == "Gather" else node.inputs[1]
        if not is_constant_weight(weight):
            return None  # e.g. attention's Q @ K^T, or a Gather of shapes
        assert weight is not None and weight.const_value is not None
        tensor = weight.const_value
        if (node.name or "") in step.exclude_nodes:
            return "excluded by exclude_nodes"
        if tensor.dtype != ir.DataType.FLOAT or len(tensor.shape) != 2:
            return f"weight '{weight.name}' is not a 2-D float32 matrix"
        if tensor.size < step.min_elements:
            return f"weight '{weight.name}' has {tensor.size} elements < min_elements {step.min_elements}"
        if len(weight.uses()) > 1 or weight.is_graph_output():
            return f"weight '{weight.name}' is shared with other nodes; it stays in float for all of them"
        if node.op_type == "Gather" and node.attributes.get_int("axis", 0) != 0:
            return "Gather along an axis other than 0 is left in float"
        if node.op_type == "Gather" and self._no_gather:
            return self._no_gather
        return non_finite_reason(weight) or (node.op_type, weight)

    def _raise_opset(self, work: ir.Model) -> ir.Model:
        """The model at the opset int4 Gather needs, or the model as is with its Gathers left in float."""
        version = work.opset_imports.get("", 1)
        self.log.summary["opset"] = f"{version} (unchanged)"
        if version >= _GATHER_OPSET:
            return work
        try:
            upgraded = _converted(work, _GATHER_OPSET)
        except Exception as e:
            logger.info("opset %d -> %d failed: %s", version, _GATHER_OPSET, e)
            self._no_gather = (
                f"the model's opset {version} could not be raised to {_GATHER_OPSET} (int4 Gather needs it)"
            )
            return work
        upgraded.ir_version = max(10, upgraded.ir_version)
        self.log.summary["opset"] = f"upgraded {version} -> {_GATHER_OPSET} (int4 Gather needs it)"
        return upgraded

    def _gptq(self, work: ir.Model, chosen: dict[str, tuple[str, ir.Value]]) -> None:
        """Replace the chosen MatMul weights by their GPTQ rounding, which the rtn packer then stores exactly."""
        nodes = {node.name: node for node in work.graph}
        targets = {
            w.name or "": (nodes[name].inputs[0].name or "", constant_array(w))  # type: ignore[union-attr]
            for name, (op, w) in chosen.items()
            if op != "Gather"
        }
        feeds = list(self.context.calibration or [])
        limit = self.step.calibration_samples
        feeds = feeds[:: max(1, -(-len(feeds) // limit))][:limit] if limit else feeds
        try:
            rounded = gptq_weights(ir.to_proto(work), targets, feeds, block_size=self.step.block_size,
                                   symmetric=self.step.symmetric)  # fmt: skip
        except Exception as e:
            raise PassFailedError(f"int4 gptq failed: {self._clean(e)}") from e
        for _, w in chosen.values():
            if (w.name or "") in rounded:  # for ORT's quantizer to build the node from; _store_gptq fills it
                w.const_value = ir.tensor(rounded[w.name or ""].weight(), name=w.name)
        self._rounded = rounded
        self.log.summary["calibration_samples"] = len(feeds)
        short = sorted(n for n, r in rounded.items() if r.rows < _GPTQ_ROWS_PER_INPUT * r.levels.shape[0])
        if short:
            self.log.warnings.append(
                f"int4 gptq: the calibration data gives fewer activation rows than {_GPTQ_ROWS_PER_INPUT}x the "
                f"inputs of {len(short)} of {len(rounded)} layers (e.g. {short[0]!r}: {rounded[short[0]].rows} rows "
                f"for {rounded[short[0]].levels.shape[0]} inputs); GPTQ then fits those samples and may do worse "
                "than rtn on other inputs: give more calibration samples or use rtn"
            )

    def _config(self, ops: tuple[str, ...]) -> nbits.WeightOnlyQuantConfig:
        if self.step.method == "hqq":
            return nbits.HQQWeightOnlyQuantConfig(block_size=self.step.block_size, op_types_to_quantize=ops)
        return self._rtn(ops, None)

    def _rtn(self, ops: tuple[str, ...], axes: tuple[tuple[str, int], ...] | None) -> nbits.WeightOnlyQuantConfig:
        step = self.step
        return nbits.DefaultWeightOnlyQuantConfig(
            block_size=step.block_size, is_symmetric=step.symmetric, accuracy_level=step.accuracy_level or None,
            op_types_to_quantize=ops, quant_axes=axes,
        )  # fmt: skip

    def _quantize(
        self, proto: onnx.ModelProto, names: set[str], config: nbits.WeightOnlyQuantConfig
    ) -> onnx.ModelProto:
        ops = config.op_types_to_quantize
        others = [n.name for g in all_graphs(proto.graph) for n in g.node if n.op_type in ops and n.name not in names]
        try:
            quantizer = nbits.MatMulNBitsQuantizer(proto, nodes_to_exclude=others, algo_config=config)
            quantizer.process()
        except Exception as e:
            raise PassFailedError(f"int4 ({self.step.method}) failed: {self._clean(e)}") from e
        result: onnx.ModelProto = quantizer.model.model
        if self.step.method == "hqq" and self.step.accuracy_level:
            for node in result.graph.node:
                if node.op_type == "MatMulNBits":
                    node.attribute.append(onnx.helper.make_attribute("accuracy_level", self.step.accuracy_level))
        return result

    def _record(self, proto: onnx.ModelProto, before: dict[str, tuple[str, str, ir.TensorProtocol]]) -> None:
        step = self.step
        self.log.layers, total_before, total_after = layer_changes(proto, before, step.method, step.block_size)
        self._summarize(total_before, total_after)

    def _summarize(self, total_before: int, total_after: int) -> None:
        step = self.step
        self.log.summary.update(
            method=step.method, block_size=step.block_size, symmetric=step.symmetric,
            accuracy_level=step.accuracy_level, layers_int4=len(self.log.layers),
            weight_bytes_before=total_before, weight_bytes_after=total_after,
        )  # fmt: skip

    def _clean(self, error: BaseException) -> str:
        return clean_message(str(error).replace(str(self.context.workdir), "<workdir>"), limit=300)


def _tensor(value: ir.Value) -> ir.TensorProtocol:
    assert value.const_value is not None
    return value.const_value


def _converted(model: ir.Model, version: int) -> ir.Model:
    """`model` at opset `version` by ONNX's version converter, given the graph without its large weights.

    The weights of more than 1 KiB go to the converter as graph inputs (no copy of them is serialized) and come
    back as the same tensors; the small constants that adapters read (shapes, axes, pads) go as initializers.
    """
    large = {
        name: value.const_value
        for name, value in model.graph.initializers.items()
        if value.const_value is not None and value.const_value.nbytes > 1024 and not value.is_graph_input()
    }
    inputs = len(model.graph.inputs)
    for name in large:
        value = model.graph.initializers.pop(name)
        value.const_value = None
        model.graph.inputs.append(value)
    try:
        proto = ir.to_proto(model)
    finally:
        for value in model.graph.inputs[inputs:]:
            value.const_value = large[value.name or ""]
            model.graph.register_initializer(value)
        del model.graph.inputs[inputs:]
    upgraded = ir.from_proto(onnx.version_converter.convert_version(proto, version))
    kept = [value for value in upgraded.graph.inputs if value.name not in large]
    for value in upgraded.graph.inputs:
        if value.name in large:
            value.const_value = large[value.name]
            upgraded.graph.register_initializer(value)
    upgraded.graph.inputs.clear()
    upgraded.graph.inputs.extend(kept)
    return upgraded
