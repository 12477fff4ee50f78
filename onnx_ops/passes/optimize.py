"""Graph simplification: ONNX Runtime's basic graph optimizations, applied once and saved as a portable ONNX model.

ONNX Runtime's basic level is provider-independent and writes only standard ONNX operators: constant folding,
removal of Identity, Dropout and other redundant nodes, common subexpressions merged, and BatchNormalization, Mul
and Add folded into the Conv before them. ONNX Runtime does the same when it loads a model, so latency in ONNX
Runtime barely moves; the gain is a smaller, simpler graph for the steps that follow (pruning sees a Conv whose
channels carry the BatchNormalization's scale; int8 storage and clustering store one folded weight instead of a
Conv weight and a BatchNormalization) and for any other runtime. The report lists nodes before and after by type.
"""

from __future__ import annotations

import collections
import itertools
import logging
from pathlib import Path

import onnx
import onnx_ir as ir
import onnxruntime as ort

from onnx_ops.errors import PassFailedError
from onnx_ops.passes._base import PassContext, PassLog
from onnx_ops.plan import OptimizeStep
from onnx_ops.validate import clean_message

__all__ = ["OptimizePass", "ort_basic_optimized"]

logger = logging.getLogger(__name__)

_STANDARD = frozenset({"", "ai.onnx", "ai.onnx.ml"})
_EXTERNAL_PAST = 1 << 30  # weights of more than 1 GiB go through an external data file (protobuf stops at 2 GiB)
_names = itertools.count()


def ort_basic_optimized(model: ir.Model, workdir: Path, *, keep_weights_outside: bool = False) -> tuple[Path, int]:
    """Write `model` to `workdir`, load it in ONNX Runtime at the basic level; the optimized model's path, and bytes.

    The bytes are those of the model as written for ONNX Runtime (with its data file, if any).

    Args:
        model: The model (left unchanged).
        workdir: A private directory for the files.
        keep_weights_outside: Write the optimized model's weights to a data file beside it, so the returned model
            file is small (for a caller that only reads its graph).

    Raises:
        PassFailedError: ONNX Runtime could not load the model.
    """
    number = next(_names)
    source, optimized = workdir / f"ort_basic_in_{number}.onnx", workdir / f"ort_basic_{number}.onnx"
    weights = sum(v.const_value.nbytes for v in model.graph.initializers.values() if v.const_value is not None)
    if weights > _EXTERNAL_PAST:
        ir.save(model, source, external_data=f"{source.name}.data")
    else:
        ir.save(model, source)
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    options.optimized_model_filepath = str(optimized)
    options.log_severity_level = 3
    if keep_weights_outside or weights > _EXTERNAL_PAST:
        options.add_session_config_entry(
            "session.optimized_model_external_initializers_file_name", f"{optimized.name}.data"
        )
        options.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes", "1024")
    data = source.with_name(f"{source.name}.data")
    written = source.stat().st_size + (data.stat().st_size if data.exists() else 0)
    try:
        ort.InferenceSession(str(source), options, providers=["CPUExecutionProvider"])
    except Exception as e:
        raise PassFailedError(f"ONNX Runtime could not load the model to optimize it: {clean_message(e)}") from e
    finally:
        source.unlink(missing_ok=True)
        data.unlink(missing_ok=True)
    return optimized, written


class OptimizePass(ir.passes.FunctionalPass):
    """Simplify the graph with ONNX Runtime's basic optimizations (standard ONNX operators only)."""

    def __init__(self, step: OptimizeStep, context: PassContext) -> None:
        super().__init__()
        self.step = step
        self.context = context
        self.log = PassLog()

    def precheck(self, model: ir.Model) -> None:
        """Nothing to refuse in advance: any model ONNX Runtime loads can be simplified."""

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        """The simplified model (a new one; the input model is left unchanged)."""
        before = _census(model)
        path, written = ort_basic_optimized(model, self.context.workdir)
        data = path.with_name(f"{path.name}.data")
        optimized_bytes = path.stat().st_size + (data.stat().st_size if data.exists() else 0)
        try:
            proto = onnx.load(path)  # with its data file, if any: the work directory goes away after the job
        finally:
            path.unlink(missing_ok=True)
            path.with_name(f"{path.name}.data").unlink(missing_ok=True)
        had = {node.domain for node in model.graph.all_nodes()}
        foreign = sorted({n.op_type for n in proto.graph.node if n.domain not in _STANDARD and n.domain not in had})
        if foreign:
            raise PassFailedError(f"ONNX Runtime's optimizer wrote operators of its own ({', '.join(foreign)})")
        result = ir.from_proto(proto)
        after = _census(result)
        self._record(before, after)
        self.log.summary.update(file_bytes_before=written, file_bytes_after=optimized_bytes)
        if optimized_bytes > written * 1.05 + 4096:
            self.log.warnings.append(
                f"optimize: the simplified model is larger ({written} -> {optimized_bytes} bytes): ONNX Runtime's "
                "constant folding wrote out tensors the graph used to compute"
            )
        return ir.passes.PassResult(result, modified=before != after)

    def _record(self, before: collections.Counter[str], after: collections.Counter[str]) -> None:
        changed = sorted(set(before) | set(after), key=lambda op: (after[op] - before[op], op))
        changes = [f"{op} {after[op] - before[op]:+d}" for op in changed if after[op] != before[op]]
        self.log.summary.update(
            nodes_before=sum(before.values()), nodes_after=sum(after.values()), node_changes=changes
        )
        logger.info("optimize: %d -> %d nodes (%s)", sum(before.values()), sum(after.values()), ", ".join(changes))


def _census(model: ir.Model) -> collections.Counter[str]:
    return collections.Counter(node.op_type for node in model.graph.all_nodes())
