"""Float16 conversion through ``onnxruntime.transformers.float16``, the model's float32 inputs and outputs kept.

Float32 weights become float16 and the graph computes in float16 between a Cast after each float input and one
before each float output, so callers feed and read float32 as before. Operators ONNX Runtime's converter knows to
lack float16 support (its default block list), the step's ``exclude_op_types`` and ``exclude_nodes`` stay in
float32 behind Casts. Values beyond float16's range are clipped to +-65504 and non-zero values below its smallest
subnormal become +-5.96e-8: the report counts both per weight.

On CPU this is a storage format. ONNX Runtime's CPU provider has float16 kernels for few operators (not MatMul or
Add on x86) and inserts Casts to float32 around the others when it loads the model, so the file halves while
latency usually grows; the report's latency figures show by how much on this host. bfloat16 is not offered: the
CPU provider has no bfloat16 MatMul or Add at all, so such a model would not load.
"""

from __future__ import annotations

import logging

import numpy as np
import onnx
import onnx_ir as ir
from onnx_ir.passes import common
from onnxruntime.transformers import float16

from onnx_ops.errors import PassFailedError, PlanError
from onnx_ops.passes._base import PassContext, PassLog
from onnx_ops.plan import Fp16Step
from onnx_ops.report import LayerChange
from onnx_ops.validate import clean_message

__all__ = ["Fp16ConvertPass"]

logger = logging.getLogger(__name__)

_MAX, _TINY = 65504.0, 5.96e-08  # the converter's clipping bounds (float16's largest value, smallest subnormal)
_CPU_NOTE = (
    "on CPU float16 is a storage format: ONNX Runtime computes most operators in float32 behind Casts it inserts "
    "at load time, so the file is about half the size and latency is usually higher (see the latency figures)"
)


class Fp16ConvertPass(ir.passes.FunctionalPass):
    """Convert float32 weights and computation to float16, float32 inputs and outputs kept."""

    def __init__(self, step: Fp16Step, context: PassContext) -> None:
        super().__init__()
        self.step = step
        self.context = context
        self.log = PassLog()

    def precheck(self, model: ir.Model) -> None:
        """Raise PlanError when there is nothing to convert or the step names nodes the model lacks."""
        if missing := sorted(set(self.step.exclude_nodes) - {node.name or "" for node in model.graph.all_nodes()}):
            raise PlanError(f"exclude_nodes names nodes the model does not have: {', '.join(missing)}")
        if not any(v.const_value is not None and v.const_value.dtype == ir.DataType.FLOAT for v in _weights(model)):
            raise PlanError("the model has no float32 weights to convert to float16")

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        """Convert a copy of model; the input model is left unchanged."""
        proto = ir.to_proto(model)
        before = {
            init.name: onnx.numpy_helper.to_array(init)
            for init in proto.graph.initializer
            if init.data_type == onnx.TensorProto.FLOAT
        }
        users = _first_users(proto.graph)
        casts = sum(node.op_type == "Cast" for node in proto.graph.node)
        blocked = [*float16.DEFAULT_OP_BLOCK_LIST, *self.step.exclude_op_types]
        try:
            result = float16.convert_float_to_float16(
                proto, keep_io_types=True, op_block_list=blocked, node_block_list=list(self.step.exclude_nodes)
            )
        except Exception as e:
            raise PassFailedError(f"fp16 failed: {clean_message(str(e), limit=300)}") from e
        self._record(result, before, users)
        self.log.summary.update(
            casts_added=sum(node.op_type == "Cast" for node in result.graph.node) - casts,
            float32_ops_kept=sorted({n.op_type for n in result.graph.node if n.op_type in blocked}),
            cpu_note=_CPU_NOTE,
        )
        converted = ir.from_proto(result)
        common.TopologicalSortPass()(converted)  # the converter appends the Casts it adds at the end of the graph
        return ir.passes.PassResult(converted, modified=bool(self.log.layers))

    def _record(self, result: onnx.ModelProto, before: dict[str, np.ndarray], users: dict[str, onnx.NodeProto]) -> None:
        after = {init.name: init for init in result.graph.initializer}
        clipped_total = 0
        bytes_before = bytes_after = 0
        for name, original in before.items():
            node = users.get(name)
            label = node.name if node is not None and node.name else name
            init = after.get(name)
            if init is None or init.data_type != onnx.TensorProto.FLOAT16:
                why = "only nodes kept in float32 read it" if node is not None else "no node of the main graph reads it"
                self.log.skip(label, f"weight '{name}' stays float32: {why}")
                continue
            half = onnx.numpy_helper.to_array(init)
            clipped = int(np.count_nonzero(np.abs(original) > _MAX))
            flushed = int(np.count_nonzero((original != 0) & (np.abs(original) < _TINY)))
            clipped_total += clipped
            wide = original.astype(np.float64)  # float32 sums of squares overflow on mask constants near -3.4e38
            norm = float(np.linalg.norm(wide))
            error = float(np.linalg.norm(half.astype(np.float64) - wide) / norm) if norm else 0.0
            extra = f", {clipped} values clipped to +-65504" if clipped else ""
            extra += f", {flushed} tiny values raised to +-5.96e-8" if flushed else ""
            bytes_before, bytes_after = bytes_before + original.nbytes, bytes_after + half.nbytes
            self.log.layers.append(LayerChange(
                name=label, op_type=node.op_type if node is not None else "", weight=name,
                shape_before=list(original.shape), shape_after=list(half.shape), params_before=original.size,
                params_after=half.size, rel_error=error,
                note=f"float16: {original.nbytes} -> {half.nbytes} bytes{extra}",
            ))  # fmt: skip
        if clipped_total:
            self.log.warnings.append(
                f"fp16: {clipped_total} weight values beyond +-65504 were clipped (see the layers); exclude the "
                "nodes that read them if the outputs drift"
            )
        self.log.summary.update(
            weights_float16=len(self.log.layers), weight_bytes_before=bytes_before, weight_bytes_after=bytes_after
        )
        logger.info("fp16: %d weights converted, %d kept float32", len(self.log.layers), len(self.log.skipped))


def _weights(model: ir.Model) -> list[ir.Value]:
    return [v for v in model.graph.initializers.values() if v.const_value is not None]


def _first_users(graph: onnx.GraphProto) -> dict[str, onnx.NodeProto]:
    """Initializer name -> the first node of the main graph that reads it (for the report's layer names)."""
    users: dict[str, onnx.NodeProto] = {}
    for node in graph.node:
        for name in node.input:
            users.setdefault(name, node)
    return users
