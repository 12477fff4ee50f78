"""Dynamic int8 embedding tables with one scale per embedding column instead of one per table.

ONNX Runtime's dynamic quantizer stores a Gather's constant table as 8 bits with a single scale and zero point
(``Gather(table_quantized) -> DequantizeLinear``). Embedding columns differ in range by an order of magnitude or
more, so one grid for the whole table rounds the narrow columns coarsely: on paraphrase-MiniLM-L3-v2 that alone
took the sentence embeddings' mean cosine to 0.9987 (MatMuls left in float), where one scale per column kept
0.9999 (measured with the tables fake-quantized in the float model: per table 0.9963 symmetric, per token row
0.9995, per column 0.9999). The rewrite keeps the graph: the table becomes symmetric int8 on one grid per
column, and the DequantizeLinear after the Gather gets a scale and zero point per column (``axis=-1``: the
gathered rows keep the table's last axis). It needs no data; the file grows by one scale per column.

4-bit tables (``GatherBlockQuantized``) need opset 21: ``at_gather_opset`` converts the float model with ONNX's
version converter first, so ops whose form changed on the way (ReduceMean's ``axes`` attribute became an input
at opset 18) are rewritten; ONNX Runtime's MatMulNBitsQuantizer would only relabel the opset.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
from onnx import helper, numpy_helper

__all__: list[str] = []  # package-private (column_grid is also used by the pass's own dynamic path)


def at_gather_opset(model: ir.Model) -> tuple[ir.Model, str]:
    """`model` (unchanged) or a converted copy at the opset 4-bit Gather needs, and what was done in words.

    Raises:
        Exception: whatever ONNX's version converter raised (the caller keeps the tables in int8).
    """
    # Imported here: the int4 module imports ONNX Runtime's MatMulNBits quantizer (about 200 MB of imports).
    from onnx_ops.passes.int4 import _GATHER_OPSET, _converted

    version = model.opset_imports.get("", 1)
    if version >= _GATHER_OPSET:
        return model, f"{version} (unchanged)"
    upgraded = _converted(model, _GATHER_OPSET)  # the weights are carried over, not serialized
    upgraded.ir_version = max(10, upgraded.ir_version or 0)  # int4 tensors need IR version 10
    return upgraded, f"upgraded {version} -> {_GATHER_OPSET} (4-bit Gather needs it)"


def per_column_tables(quantized: onnx.ModelProto, source: onnx.ModelProto) -> list[str]:
    """Re-quantize each per-tensor int8 Gather table of `quantized` per column (in place) from `source`'s float.

    Args:
        quantized: ONNX Runtime's dynamic int8 model (changed in place).
        source: The float model it quantized (the tables' float values, by the names ONNX Runtime derived from).

    Returns:
        The float names of the tables rewritten.
    """
    if next((o.version for o in quantized.opset_import if o.domain in ("", "ai.onnx")), 1) < 13:
        return []  # DequantizeLinear has no axis before opset 13
    graph = quantized.graph
    inits = {init.name: init for init in graph.initializer}
    floats = {init.name: init for init in source.graph.initializer}
    readers: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in node.input:
            readers.setdefault(name, []).append(node)
    done = []
    for node in graph.node:
        table = inits.get(node.input[0]) if node.op_type == "Gather" and node.input else None
        if table is None or _axis(node) != 0 or len(table.dims) != 2:
            continue
        users = readers.get(node.output[0], [])
        dequantize = users[0] if len(users) == 1 and users[0].op_type == "DequantizeLinear" else None
        original = floats.get(table.name.removesuffix("_quantized"))
        if dequantize is None or original is None or len(dequantize.input) != 3 or not _private(dequantize, readers):
            continue
        scale, zero = inits.get(dequantize.input[1]), inits.get(dequantize.input[2])
        if scale is None or zero is None or len(scale.dims) or len(zero.dims) or len(readers[table.name]) != 1:
            continue
        values = numpy_helper.to_array(original)
        if values.shape != tuple(table.dims) or not np.all(np.isfinite(values)):
            continue
        levels, steps = column_grid(values)
        table.CopyFrom(numpy_helper.from_array(levels, table.name))
        scale.CopyFrom(numpy_helper.from_array(steps, scale.name))
        zero.CopyFrom(numpy_helper.from_array(np.zeros(steps.shape, np.int8), zero.name))
        del dequantize.attribute[:]
        dequantize.attribute.append(helper.make_attribute("axis", -1))
        done.append(original.name)
    return done


def column_grid(values: np.ndarray, chunk_rows: int = 4096) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric int8 levels of a 2-D float table on one grid per column, and the grid steps (float32).

    The steps are computed in float64 and the rows rounded a chunk at a time, so the float64 temporary stays
    small beside a large table.
    """
    steps = np.abs(values).max(axis=0).astype(np.float64) / 127.0
    steps[steps == 0] = 1.0
    levels = np.empty(values.shape, np.int8)
    for start in range(0, values.shape[0], chunk_rows):
        part = np.round(values[start : start + chunk_rows].astype(np.float64) / steps)
        levels[start : start + chunk_rows] = np.clip(part, -127, 127)
    return levels, steps.astype(np.float32)


def _axis(node: onnx.NodeProto) -> int:
    return next((a.i for a in node.attribute if a.name == "axis"), 0)


def _private(dequantize: onnx.NodeProto, readers: dict[str, list[onnx.NodeProto]]) -> bool:
    """True if the DequantizeLinear alone reads its scale and zero point (they can change shape)."""
    return all(len(readers.get(name, [])) == 1 for name in dequantize.input[1:])
