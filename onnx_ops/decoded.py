"""The compressed model as ONNX Runtime runs it after folding its weight decoders, written one weight at a time.

A clustered model (passes/cluster.py) stores each weight as a codebook and packed indices that standard operators
decode (BitShift, Reshape, Cast, Mul, Add, Gather), all of whose inputs are constants: ONNX Runtime folds them
when it loads the model and runs with the float weights. Loading it that way takes about 2.5x the float weights
(the folded results are copied into the session), beside the original's session in the measure phase. Here the
same folding is done with NumPy, a decoder at a time (integer arithmetic and a Gather: exact, the values ONNX
Runtime computes), and the result written with its weights in a data file that ONNX Runtime maps: the compressed
model's session then holds one copy of the float weights, the same graph ONNX Runtime would run. A large folded
weight is computed as it is written, a block of rows at a time (onnx_ops._decode_rows): the folding holds one
block of each of a decoder's intermediates, not the weight several times over (as int32 indices and as floats).
"""

from __future__ import annotations

from pathlib import Path

import onnx_ir as ir

from onnx_ops import job_files
from onnx_ops._decode_rows import OPS, DecodedTensor, NotExactError, fold
from onnx_ops.memory import release_memory
from onnx_ops.report import StepResult

__all__ = ["folded_file", "session_file"]

_ALIGNMENT = 1 << 16  # ONNX Runtime maps tensors at 64 KiB offsets rather than copy them
_BLOCK = 1 << 20  # elements of a folded weight decoded at a time (whole rows; at least one row)


def folded_file(path: Path, out: Path) -> Path | None:
    """Write `path` with its constant decoders folded to `out` (weights in ``<name>.data``); None: nothing to fold.

    Only the operators of the cluster step's decoders are folded, on integer indices (the Gather picks float
    values: copied, not computed). A folded weight of more than ``_BLOCK`` elements is decoded as it is written,
    ``_BLOCK`` elements (whole rows) at a time; smaller ones are decoded whole and held until written.
    """
    written = _fold(path, out)
    # Only now: the folded model lives in reference cycles (a value's uses -> its node -> the graph) that the
    # folding's locals keep reachable until it returns, and the collector might not run before both sessions
    # are built (one more copy of the float weights beside them).
    release_memory()
    return out if written else None


def _fold(path: Path, out: Path) -> bool:
    model = job_files.load_ir(path)
    graph = model.graph
    folded = 0
    for node in list(graph):
        if node.op_type not in OPS or node.domain not in ("", "ai.onnx") or len(node.outputs) != 1:
            continue
        inputs = [value.const_value if value is not None else None for value in node.inputs]
        if any(tensor is None for tensor in inputs):
            continue
        # A folded input still to be computed is read a block of rows at a time, not whole.
        sources = [t.decoded if isinstance(t, DecodedTensor) else t.numpy() for t in inputs]  # type: ignore[union-attr]
        output = node.outputs[0]
        try:
            result = fold(node, sources, output.name, _BLOCK)
        except NotExactError:
            continue
        if result is None:
            continue
        constant = ir.Value(name=output.name, shape=ir.Shape(result.shape.numpy()), type=ir.TensorType(result.dtype))
        constant.const_value = result
        output.replace_all_uses_with(constant, replace_graph_outputs=True)
        read = list(node.inputs)
        graph.remove(node, safe=True)
        graph.register_initializer(constant)
        for value in read:
            if value is not None and value.is_initializer() and not value.uses() and not value.is_graph_output():
                graph.initializers.pop(value.name or "")
        folded += 1
    if folded:
        ir.save(model, out, external_data=f"{out.name}.data", size_threshold_bytes=1024, alignment=_ALIGNMENT)
    return folded > 0


def session_file(compressed: Path, steps: list[StepResult]) -> Path:
    """The file to measure the compressed model with: folded beside it when a cluster step's decoders all fold.

    When ONNX Runtime leaves a decoder unfolded (the step's ``folded_at_load`` is false), the model is measured
    as it is: it then decodes on every run, and its latency must show it.
    """
    clustered = [step for step in steps if step.kind == "cluster"]
    if not clustered or not all(step.summary.get("folded_at_load") is True for step in clustered):
        return compressed
    return folded_file(compressed, compressed.with_name(f"{compressed.stem}_folded.onnx")) or compressed
