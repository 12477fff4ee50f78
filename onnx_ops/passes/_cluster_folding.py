"""Does ONNX Runtime fold a clustered weight's decoder at load? Asked of a miniature of each decoder.

Loading the whole clustered model in ONNX Runtime to see its optimized graph holds every decoded weight at once.
Even one decoder, folded alone, holds its int32 and float intermediates of the weight's shape at once (about 4.5x
the weight). ONNX Runtime's constant folding decides per node from its op type and whether every input is a
constant, not from the values or (below its output size limit) the sizes, so each decoder is asked as a miniature: the
same nodes, attributes, dtypes and opsets, with each constant cut to a block of at most 8 values a dimension of the
weight (the packed bytes, the Reshape target, the channel offsets and the codebook to match). Its decoded weight is
added to a graph input, so that the decoded value is used, as in the full model. Decoders of the same structure get
one answer (the `cache`).

ONNX Runtime skips folding a node whose output passes ``optimization.constant_folding_max_output_size_in_bytes``
(1 GiB by default in the versions this project requires): a weight whose int32/float32 decoding passes that limit
is answered "not folded" without asking.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir

from onnx_ops.passes.optimize import ort_basic_optimized

__all__ = ["folds_alone"]

_FOLD_LIMIT = 1 << 30  # bytes: ONNX Runtime's default constant_folding_max_output_size_in_bytes
_SIDE = 8  # the miniature keeps at most this many values along each dimension of the weight
_INDEX_SPAN = 256  # an index within one codebook is below 2^bits <= 256


def folds_alone(
    decoder: list[ir.Node], opsets: dict[str, int], workdir: Path, cache: dict[tuple[object, ...], bool] | None = None
) -> bool:
    """True when ONNX Runtime's basic optimizer folds every node of `decoder` (a weight's decoding, last node last).

    Args:
        decoder: The nodes decoding one weight, in order; the last one's output is the float weight.
        opsets: The model's opset imports.
        workdir: A private directory for the files.
        cache: Answers by decoder structure, shared by the calls of one pass (None: ask every time).

    Raises:
        PassFailedError: ONNX Runtime could not load the decoder.
    """
    out = decoder[-1].outputs[0]
    shape = [int(d) for d in out.shape.numpy()] if out.shape is not None else None
    if shape is not None and 4 * math.prod(shape) > _FOLD_LIMIT:
        return False  # its int32 indices and float weight pass ONNX Runtime's folding limit
    key = _signature(decoder, opsets, shape)
    if cache is not None and key in cache:
        return cache[key]
    answer = _ask(decoder, opsets, workdir, shape)
    if cache is not None:
        cache[key] = answer
    return answer


def _ask(decoder: list[ir.Node], opsets: dict[str, int], workdir: Path, shape: list[int] | None) -> bool:
    """ONNX Runtime's answer for the decoder's miniature."""
    out = decoder[-1].outputs[0]
    names = {o.name for node in decoder for o in node.outputs}
    small = _small_shape(shape)
    constants: dict[str, np.ndarray] = {}
    for node in decoder:
        for index, value in enumerate(node.inputs):
            if value is not None and value.name not in names and value.const_value is not None:
                role = (node.op_type, index)
                constants[value.name or ""] = _miniature(value.const_value.numpy(), role, shape, small)
    if small != shape:
        _fit_codebook(decoder, constants, names)
    weight = onnx.helper.make_tensor_value_info(out.name or "", onnx.TensorProto.FLOAT, small)
    graph = onnx.helper.make_graph(
        [ir.serde.serialize_node(node) for node in decoder]
        + [onnx.helper.make_node("Add", ["decoder_probe", out.name or ""], ["decoder_probe_sum"])],
        "decoder",
        [onnx.helper.make_tensor_value_info("decoder_probe", onnx.TensorProto.FLOAT, small)],
        [onnx.helper.make_tensor_value_info("decoder_probe_sum", onnx.TensorProto.FLOAT, small)],
        [onnx.numpy_helper.from_array(array, name) for name, array in constants.items()],
        value_info=[weight],
    )
    proto = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid(d, v) for d, v in opsets.items()])
    path, _ = ort_basic_optimized(ir.from_proto(proto), workdir, keep_weights_outside=True)
    try:
        nodes = onnx.load(path, load_external_data=False).graph.node
        made = {name for node in nodes for name in node.output}
    finally:
        path.unlink(missing_ok=True)
        path.with_name(f"{path.name}.data").unlink(missing_ok=True)
    return not (made & names)  # folded: no node left computes any part of the decoding


def _small_shape(shape: list[int] | None) -> list[int] | None:
    """The miniature weight's shape: at most _SIDE a dimension, its size a multiple of 8 (whole bytes at 1 bit)."""
    if shape is None:
        return None
    small = [min(d, _SIDE) for d in shape]
    return small if math.prod(small) % 8 == 0 else shape  # no dimension reaches 8: the weight is small already


def _miniature(
    array: np.ndarray, role: tuple[str, int], shape: list[int] | None, small: list[int] | None
) -> np.ndarray:
    """One constant of the decoder, cut to the miniature weight's shape (a constant of no such shape: as it is)."""
    if shape is None or small is None or small == shape:
        return array
    if role == ("BitShift", 0) and array.ndim == 2 and array.shape[0] and math.prod(shape) % array.shape[0] == 0:
        per_byte = math.prod(shape) // array.shape[0]
        return np.ascontiguousarray(array[: math.prod(small) // per_byte])  # the packed bytes
    if role == ("Reshape", 1) and array.ravel().tolist() == shape:
        return np.asarray(small, array.dtype)
    if (
        array.ndim == len(shape)
        and array.size > 1
        and all(d in (1, s) for d, s in zip(array.shape, shape, strict=True))
    ):
        block = tuple(slice(0, min(d, m)) for d, m in zip(array.shape, small, strict=True))
        return np.ascontiguousarray(array[block])  # indices of the weight's shape, or per-channel offsets
    return array


def _fit_codebook(decoder: list[ir.Node], constants: dict[str, np.ndarray], names: set[str | None]) -> None:
    """Cut each constant Gather table to the entries the miniature's indices can reach (zeros past its end)."""
    offsets = [
        constants[v.name or ""]
        for node in decoder
        if node.op_type == "Add"
        for v in node.inputs
        if v is not None and v.name not in names and (v.name or "") in constants and constants[v.name or ""].size > 1
    ]
    reach = max((int(o.max()) for o in offsets), default=0) + _INDEX_SPAN
    for node in decoder:
        table = node.inputs[0] if node.op_type == "Gather" and node.inputs else None
        if table is None or (table.name or "") not in constants or constants[table.name or ""].ndim != 1:
            continue
        full = constants[table.name or ""]
        if full.size > reach:
            constants[table.name or ""] = np.ascontiguousarray(full[:reach])
        elif offsets and full.size < reach:
            constants[table.name or ""] = np.concatenate([full, np.zeros(reach - full.size, full.dtype)])


def _signature(decoder: list[ir.Node], opsets: dict[str, int], shape: list[int] | None) -> tuple[object, ...]:
    """What ONNX Runtime's answer depends on: ops, attributes, the constants' dtypes and ranks, wiring, opsets."""
    made = {id(o): i for i, node in enumerate(decoder) for o in node.outputs}
    parts: list[object] = [tuple(sorted(opsets.items())), None if shape is None else len(shape)]
    for node in decoder:
        inputs: list[object] = []
        for value in node.inputs:
            if value is None:
                inputs.append(None)
            elif id(value) in made:
                inputs.append(made[id(value)])
            elif (tensor := value.const_value) is not None:
                inputs.append((str(tensor.dtype), len(tensor.shape), tensor.size > 1))
            else:
                inputs.append(("input", value.name))
        attributes = tuple(sorted((name, repr(attr.value)) for name, attr in node.attributes.items()))
        parts.append((node.domain, node.op_type, attributes, tuple(inputs)))
    return tuple(parts)
