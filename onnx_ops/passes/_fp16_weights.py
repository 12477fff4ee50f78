"""The fp16 pass's weights, converted one at a time beside ONNX Runtime's converter run on the graph alone.

``float16.convert_float_to_float16`` takes a whole ModelProto: the model's float32 weights serialized once more
beside the job's memory-mapped copy, each converted in the proto, and the result parsed back. Here the converter
gets the graph with each initializer replaced by an empty tensor of its type (``strip``): it decides and rewrites
just as before (which weights to convert, the Casts, the types), since it reads of a weight only its name and
type, and the value info ``ir.to_proto`` writes for it (its shape). What it needs of the values, each float32
weight's largest finite magnitude (the nodes reading one beyond float16's range stay float32), ``strip`` reads.
Each weight it marked float16 is converted by the converter's own ``convert_np_to_float16``, a chunk at a time into
a float16 array. A weight mapped from the job's file is read once: ``strip`` converts it as it takes its largest
magnitude, its pages leaving with the mapping, and the float16 array waits for the converter's decision beside a
mapping that costs no memory (it is dropped if the weight stays float32). A weight held in memory (a later
step's) is converted by ``attach``, the float32 array dropped as its float16 one arrives: converting it in
``strip`` would hold both at once (enc400 in memory: the pass's peak 88 MB above its start, 258 MB so). The
others get their own tensor back. The result is the graph and the bytes the converter writes (tests/test_fp16.py
compares them).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator

import numpy as np
import onnx_ir as ir
from onnxruntime.transformers import float16

from onnx_ops import job_files

__all__ = ["Converted", "Stripped", "attach", "strip"]

_MAX, _TINY = 65504.0, 5.96e-08  # the converter's clipping bounds (float16's largest value, smallest subnormal)
_CHUNK = 1 << 20  # elements; the chunks of passes._base.sum_squares, so the error sums add up in its order


@dataclasses.dataclass(frozen=True)
class Converted:
    """What the report says of one weight converted to float16."""

    shape: list[int]
    size: int
    flushed: int  # nonzero values below float16's smallest subnormal, raised to it
    rel_error: float


def _chunks(array: np.ndarray) -> Iterator[tuple[slice, np.ndarray]]:
    flat = array.reshape(-1)
    for start in range(0, flat.size, _CHUNK):
        piece = slice(start, start + _CHUNK)
        yield piece, flat[piece]


def _largest(chunk: np.ndarray) -> float:
    """The largest finite magnitude in `chunk`, 0 if none."""
    return float(np.abs(chunk[np.isfinite(chunk)], dtype=np.float64).max(initial=0))


def _largest_finite(array: np.ndarray) -> float:
    """The largest finite magnitude of a float32 array (0 if none), a chunk at a time."""
    return max((_largest(chunk) for _, chunk in _chunks(array)), default=0.0)


def _to_float16(original: np.ndarray) -> tuple[np.ndarray, Converted, float]:
    """`original` as the converter makes it float16 (its clipping included), its stats and largest finite magnitude.

    One pass, a chunk at a time. The conversion is elementwise, so converting chunks gives the converter's bytes;
    the error and the norm are summed in float64 over the chunks of ``sum_squares``, in its order. The largest
    finite magnitude is 0 when there is none.
    """
    half = np.empty(original.shape, np.float16)
    out = half.reshape(-1)
    flushed, error, norm, largest = 0, 0.0, 0.0, 0.0
    for piece, chunk in _chunks(original):
        largest = max(largest, _largest(chunk))
        converted = float16.convert_np_to_float16(chunk)
        out[piece] = converted
        flushed += int(np.count_nonzero((chunk != 0) & (np.abs(chunk) < _TINY)))
        diff = converted.astype(np.float32)
        np.subtract(diff, chunk, out=diff)
        wide = diff.astype(np.float64)
        error += float(wide @ wide)
        wide = chunk.astype(np.float64)
        norm += float(wide @ wide)
    rel_error = float(np.sqrt(error / norm)) if norm else 0.0
    return half, Converted(list(original.shape), int(original.size), flushed, rel_error), largest


def _graphs(model: ir.Model) -> list[ir.Graph]:
    return [model.graph, *model.graph.subgraphs()]


@dataclasses.dataclass
class Stripped:
    """What `strip` did to a model's initializers, by (graph index, name), in the model's order.

    Attributes:
        tensors: The tensors it took out.
        halves: The float16 version of each float32 tensor it took out mapped from the job's file, with what the
            report says of it.
        inline: What the report would say of each float32 tensor it left in, its values in the proto's typed
            fields (small constants of some exporters): the converter converts those itself, and writes them in
            those fields.
        largest: The largest finite magnitude of each float32 weight, by name.
    """

    tensors: dict[tuple[int, str], ir.TensorProtocol] = dataclasses.field(default_factory=dict)
    halves: dict[tuple[int, str], tuple[np.ndarray, Converted]] = dataclasses.field(default_factory=dict)
    inline: dict[tuple[int, str], Converted] = dataclasses.field(default_factory=dict)
    largest: dict[str, float] = dataclasses.field(default_factory=dict)

    def restore(self, model: ir.Model) -> None:
        """Put the tensors back into the model they were taken from (when the conversion failed)."""
        self.halves.clear()
        for g, graph in enumerate(_graphs(model)):
            for name, value in graph.initializers.items():
                if (tensor := self.tensors.get((g, name))) is not None:
                    value.const_value = tensor


def strip(model: ir.Model, remap: bool) -> Stripped:
    """Replace each initializer of a plain NumPy type by an empty tensor of that type; return what was done.

    Each float32 weight is read on the way for its largest magnitude, a chunk at a time. When `remap`, a weight
    mapped from the job's file is converted to float16 in the same pass and mapped afresh: the pages read leave
    memory at once and are not read again. Tensors whose values are in a proto's typed fields (float_data,
    int64_data...) stay (their report figures taken in the same pass): they are small, and the converter writes
    float16 ones in int32_data, as it always did.

    Args:
        model: The model; its values keep their types and shapes, which ``ir.to_proto`` writes as value info.
        remap: The weights are the job file's, mapped and unchanged: map each afresh (the pages read so far leave
            memory with the old mapping).
    """
    stripped = Stripped()
    for g, graph in enumerate(_graphs(model)):
        for name, value in graph.initializers.items():
            tensor = value.const_value
            if tensor is None or not _plain(tensor.dtype):
                continue
            inline = isinstance(tensor, ir.serde.TensorProtoTensor) and not tensor.raw.HasField("raw_data")
            fresh = job_files.remapped(tensor) if remap else None
            if tensor.dtype == ir.DataType.FLOAT and (inline or fresh is not None):
                half, converted, stripped.largest[name] = _to_float16(tensor.numpy())
                if inline:
                    stripped.inline[(g, name)] = converted
                else:
                    stripped.halves[(g, name)] = half, converted
                del half
            elif tensor.dtype == ir.DataType.FLOAT:
                stripped.largest[name] = _largest_finite(tensor.numpy())  # converted by `attach`
            if inline:
                continue
            stripped.tensors[(g, name)] = fresh if fresh is not None else tensor
            value.const_value = ir.Tensor(np.empty(0, tensor.dtype.numpy()), dtype=tensor.dtype, name=name)
    return stripped


def _plain(dtype: ir.DataType) -> bool:
    try:
        return dtype.numpy().kind in "biuf" and dtype.numpy().itemsize == dtype.itemsize
    except (TypeError, ValueError, NotImplementedError):
        return False


def attach(converted: ir.Model, stripped: Stripped) -> dict[str, Converted]:
    """Give the converter's result its weights: float16 where it marked a float32 one so, else the tensor as it was.

    Each float32 weight leaves as its float16 version arrives (converted here unless `strip` did); the float16
    versions `strip` made of the others are dropped.
    Returns what the report needs of each converted weight, by name.

    Raises:
        ValueError: the result's graphs are not the model's (the converter adds none).
    """
    graphs = _graphs(converted)
    if len(graphs) <= max((g for g, _ in [*stripped.tensors, *stripped.inline]), default=-1):
        raise ValueError("the converted model has fewer graphs than the model")
    found: dict[str, Converted] = {}
    for g, graph in enumerate(graphs):
        for name, value in graph.initializers.items():
            tensor = stripped.tensors.pop((g, name), None)
            ready = stripped.halves.pop((g, name), None)
            mark = value.const_value
            if mark is None:
                continue
            if tensor is None:
                if (inline := stripped.inline.get((g, name))) is not None and mark.dtype == ir.DataType.FLOAT16:
                    found[name] = inline
                continue
            if mark.dtype == ir.DataType.FLOAT16 and tensor.dtype == ir.DataType.FLOAT:
                half, found[name] = ready if ready is not None else _to_float16(tensor.numpy())[:2]
                meta = dict(tensor.metadata_props)
                value.const_value = ir.Tensor(half, name=name, doc_string=tensor.doc_string, metadata_props=meta)
                del half
            else:
                value.const_value = tensor
            del tensor, ready
    stripped.halves.clear()
    return found
