"""Float16 conversion through ``onnxruntime.transformers.float16``, the model's float32 inputs and outputs kept.

Float32 weights become float16 and the graph computes in float16 between a Cast after each float input and one
before each float output, so callers feed and read float32 as before. Operators ONNX Runtime's converter knows to
lack float16 support (its default block list), the step's ``exclude_op_types`` and ``exclude_nodes`` stay in
float32 behind Casts, and so do the nodes reading a weight with values beyond float16's range (the converter would
clip them to +-65504). Non-zero values below float16's smallest subnormal become +-5.96e-8, counted per weight.

On CPU this is a storage format. ONNX Runtime's CPU provider has float16 kernels for few operators (not MatMul or
Add on x86) and inserts Casts to float32 around the others when it loads the model, so the file halves while
latency usually grows; the report's latency figures show by how much on this host. bfloat16 is not offered: the
CPU provider has no bfloat16 MatMul or Add at all, so such a model would not load.
"""

from __future__ import annotations

import logging

import onnx
import onnx_ir as ir
from onnx_ir.passes import common
from onnxruntime.transformers import float16

from onnx_ops.errors import PassFailedError, PlanError
from onnx_ops.passes._base import PassContext, PassLog
from onnx_ops.passes._fp16_weights import Converted, attach, strip
from onnx_ops.passes._int4_layers import QUANTIZED_OPS, all_graphs
from onnx_ops.plan import Fp16Step
from onnx_ops.report import LayerChange
from onnx_ops.validate import clean_message

__all__ = ["Fp16ConvertPass"]

logger = logging.getLogger(__name__)

_MAX = 65504.0  # float16's largest value: the converter clips beyond it
_CPU_NOTE = (
    "on CPU float16 is a storage format: ONNX Runtime computes most operators in float32 behind Casts it inserts "
    "at load time, so the file is about half the size and latency is usually higher (see the latency figures)"
)


class Fp16ConvertPass(ir.passes.InPlacePass):
    """Convert float32 weights and computation to float16, float32 inputs and outputs kept."""

    def __init__(self, step: Fp16Step, context: PassContext) -> None:
        super().__init__()
        self.step = step
        self.context = context
        self.log = PassLog()

    def precheck(self, model: ir.Model) -> None:
        """Raise PlanError when there is nothing to convert or the step names nodes the model lacks."""
        if found := sorted({n.op_type for n in model.graph.all_nodes() if n.op_type in QUANTIZED_OPS}):
            raise PlanError(
                f"the model is already quantized (it has {', '.join(found)}, which take float32); give its float "
                "original"
            )
        if missing := sorted(set(self.step.exclude_nodes) - {node.name or "" for node in model.graph.all_nodes()}):
            raise PlanError(f"exclude_nodes names nodes the model does not have: {', '.join(missing)}")
        if not any(_float32(v) for v in _weights(model)):
            raise PlanError("the model has no float32 weights to convert to float16")

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        """Convert model in place: ONNX Runtime's converter rewrites its graph, the weights follow one at a time.

        The converter gets a proto of the graph whose initializers are empty tensors of their types (see
        passes/_fp16_weights.py): no copy of the weights is serialized. What it needs of the weights' values (the
        nodes reading one beyond float16's range stay float32) is read first, a weight at a time; a weight mapped
        from the job's file is converted as the converter would (the same bytes) in that same read. The weights it
        marks float16 then get their float16 version, each float32 one leaving as it arrives.
        """
        # The report lists the weights in the model's order, which shape inference changes (it moves the large ones).
        order = [v.name or "" for v in _weights(model) if _float32(v)]
        common.ShapeInferencePass(check_type=False, strict_mode=False, data_prop=False)(model)
        stripped = strip(model, remap=self.context.unchanged_source is not None)
        largest = {name: stripped.largest[name] for name in order}
        proto = ir.to_proto(model)
        graphs = all_graphs(proto.graph)
        users = _first_users(graphs)
        wide = self._too_wide(graphs, largest)
        casts = sum(node.op_type == "Cast" for graph in graphs for node in graph.node)
        # Contrib operators (DynamicQuantizeLSTM, ...) are typed for float32; the converter does not know them.
        contrib = {n.op_type for g in graphs for n in g.node if n.domain not in ("", "ai.onnx", "ai.onnx.ml")}
        blocked = [*float16.DEFAULT_OP_BLOCK_LIST, *self.step.exclude_op_types, *sorted(contrib)]
        try:
            result = float16.convert_float_to_float16(
                proto, keep_io_types=True, disable_shape_infer=True, op_block_list=blocked,
                node_block_list=[*self.step.exclude_nodes, *wide],
            )  # fmt: skip
        except Exception as e:
            stripped.restore(model)
            raise PassFailedError(f"fp16 failed: {clean_message(str(e), limit=300)}") from e
        self.log.summary.update(
            casts_added=sum(n.op_type == "Cast" for g in all_graphs(result.graph) for n in g.node) - casts,
            float32_ops_kept=sorted(
                {n.op_type for g in all_graphs(result.graph) for n in g.node if n.op_type in blocked}
            ),
            cpu_note=_CPU_NOTE,
        )
        converted = ir.from_proto(result)
        del proto, result
        found = attach(converted, stripped)  # before sorting: the graphs in the order strip saw them
        self._record(found, largest, users, wide)
        common.TopologicalSortPass()(converted)  # the converter appends the Casts it adds at the end of the graph
        model.graph = converted.graph
        model.ir_version = converted.ir_version
        model.functions.clear()
        model.functions.update(converted.functions)
        return ir.passes.PassResult(model, modified=bool(self.log.layers))

    def _too_wide(self, graphs: list[onnx.GraphProto], largest: dict[str, float]) -> dict[str, str]:
        """Nodes reading a weight with finite values beyond float16's range -> that weight; they stay float32.

        The converter would clip those values to +-65504: a BatchNormalization variance of 1e5 clipped so made
        PP-OCRv4's detector output drift to cosine 0.86. Unnamed nodes get a name, since the block list goes by name.
        """
        wide = {name for name, value in largest.items() if value > _MAX}
        nodes: dict[str, str] = {}
        for g, graph in enumerate(graphs):
            for i, node in enumerate(graph.node):
                if hit := next((name for name in node.input if name in wide), None):
                    node.name = node.name or f"fp16_kept_{g}_{i}"
                    nodes[node.name] = hit
        return nodes

    def _record(
        self,
        converted: dict[str, Converted],
        largest: dict[str, float],
        users: dict[str, onnx.NodeProto],
        wide: dict[str, str],
    ) -> None:
        too_wide = set(wide.values())
        bytes_before = bytes_after = 0
        for name, biggest in largest.items():
            node = users.get(name)
            label = node.name if node is not None and node.name else name
            found = converted.get(name)
            if found is None:
                why = "only nodes kept in float32 read it" if node is not None else "no node reads it"
                if name in too_wide:
                    why = f"it holds values beyond float16's +-65504 (largest {biggest:.3g})"
                self.log.skip(label, f"weight '{name}' stays float32: {why}")
                continue
            half_bytes = found.size * 2
            extra = f", {found.flushed} tiny values raised to +-5.96e-8" if found.flushed else ""
            bytes_before, bytes_after = bytes_before + found.size * 4, bytes_after + half_bytes
            self.log.layers.append(LayerChange(
                name=label, op_type=node.op_type if node is not None else "", weight=name,
                shape_before=found.shape, shape_after=found.shape, params_before=found.size,
                params_after=found.size, rel_error=found.rel_error,
                note=f"float16: {found.size * 4} -> {half_bytes} bytes{extra}",
            ))  # fmt: skip
        if wide:
            self.log.warnings.append(
                f"fp16: {len(too_wide)} weights hold values beyond float16's range; the {len(wide)} nodes reading "
                "them stay float32 (see the skipped weights)"
            )
        self.log.summary.update(
            weights_float16=len(self.log.layers), weight_bytes_before=bytes_before, weight_bytes_after=bytes_after
        )
        logger.info("fp16: %d weights converted, %d kept float32", len(self.log.layers), len(self.log.skipped))


def _weights(model: ir.Model) -> list[ir.Value]:
    graphs = [model.graph, *model.graph.subgraphs()]
    return [v for g in graphs for v in g.initializers.values() if v.const_value is not None]


def _float32(value: ir.Value) -> bool:
    return value.const_value is not None and value.const_value.dtype == ir.DataType.FLOAT


def _first_users(graphs: list[onnx.GraphProto]) -> dict[str, onnx.NodeProto]:
    """Initializer name -> the first node that reads it (for the report's layer names)."""
    users: dict[str, onnx.NodeProto] = {}
    for graph in graphs:
        for node in graph.node:
            for name in node.input:
                users.setdefault(name, node)
    return users
