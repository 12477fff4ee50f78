"""One constant node folded with NumPy, its output computed a block of rows at a time as its bytes are written.

A cluster decoder (passes/cluster.py) turns a weight's packed indices into its float values through full-size
uint8, int32 and float32 intermediates. Folded whole, that is several copies of the weight alive at once. Here a
folded node whose output is large is a `DecodedTensor`: it keeps its inputs (constants, or other folded nodes) and
computes rows [start, stop) of its first axis on demand, from the rows of its inputs they depend on. The data file
is written a block of rows at a time (`DecodedTensor.tofile`), so a decoder holds one block of each intermediate.

Only the decoders' operators are folded (BitShift, Cast, Reshape, Mul, Add, Gather), and only where NumPy gives
ONNX Runtime's values exactly: integer arithmetic, widening integer casts, a Gather picking values (copied, not
computed). Every element of a block is computed as it would be in the whole array, so the bytes are the same.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np
import onnx_ir as ir

__all__ = ["DecodedTensor", "NotExactError", "fold"]


class NotExactError(Exception):
    """A node this folding does not compute exactly as ONNX Runtime does: the model is measured as it is."""


def _shift(node: ir.Node, data: np.ndarray, amount: np.ndarray) -> np.ndarray:
    left = node.attributes.get_string("direction", "") == "LEFT"
    shifted: np.ndarray = np.left_shift(data, amount) if left else np.right_shift(data, amount)
    return shifted


def _cast(node: ir.Node, data: np.ndarray) -> np.ndarray:
    target = np.dtype(ir.DataType(node.attributes.get_int("to", 0)).numpy())
    if data.dtype.kind not in "iu" or target.kind not in "iu" or target.itemsize < data.dtype.itemsize:
        raise NotExactError  # only widening integer casts: the same values whatever the rounding rules
    return data.astype(target)


def _reshape(_: ir.Node, data: np.ndarray, shape: np.ndarray) -> np.ndarray:
    if (shape == 0).any():
        raise NotExactError  # 0 copies a dimension of the input in ONNX
    return data.reshape(tuple(int(d) for d in shape))


def _integer(op: Callable[[np.ndarray, np.ndarray], np.ndarray]) -> Callable[..., np.ndarray]:
    def apply(_: ir.Node, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        if a.dtype != b.dtype or a.dtype.kind not in "iu":
            raise NotExactError
        return op(a, b)

    return apply


def _gather(node: ir.Node, data: np.ndarray, indices: np.ndarray) -> np.ndarray:
    return np.take(data, indices, axis=node.attributes.get_int("axis", 0))


OPS: dict[str, Callable[..., np.ndarray]] = {
    "BitShift": _shift,
    "Cast": _cast,
    "Reshape": _reshape,
    "Mul": _integer(np.multiply),
    "Add": _integer(np.add),
    "Gather": _gather,
}


class Rows:
    """One folded node's output, not computed: whole (`full`) or rows [start, stop) of its first axis (`rows`).

    Attributes:
        node: The folded node.
        inputs: Its inputs: arrays, or the Rows of folded nodes whose rows it reads (an input it reads whole is
            computed once, here).
        shape: The output's shape (rank 1 or more).
        dtype: The output's dtype.
    """

    def __init__(self, node: ir.Node, inputs: list[Source], shape: tuple[int, ...], dtype: np.dtype[Any]) -> None:
        self.node, self.shape, self.dtype = node, shape, dtype
        op = node.op_type
        if op == "Gather":
            sliced = [False, True]  # the data (a codebook) read whole, the indices a block at a time
        elif op == "Reshape":
            sliced = [True, False]  # the target shape read whole
        else:  # an input broadcast along the first axis is read whole
            sliced = [x.ndim == len(shape) and x.shape[0] != 1 for x in inputs]
        self.inputs = [
            x if keep or isinstance(x, np.ndarray) else x.full() for x, keep in zip(inputs, sliced, strict=True)
        ]
        self.sliced = sliced

    def full(self) -> np.ndarray:
        """The whole output, as the node computes it."""
        return OPS[self.node.op_type](self.node, *(_full(x) for x in self.inputs))

    def rows(self, start: int, stop: int) -> np.ndarray:
        """Rows [start, stop) of the output, from the rows of the inputs they depend on."""
        op = self.node.op_type
        if op == "Reshape":
            return self._reshaped(start, stop)
        parts = [_rows(x, start, stop) if keep else _full(x) for x, keep in zip(self.inputs, self.sliced, strict=True)]
        return OPS[op](self.node, *parts)

    def _reshaped(self, start: int, stop: int) -> np.ndarray:
        """Rows of a Reshape's output: the same values in the same order as its input's, rows cut elsewhere."""
        source = self.inputs[0]
        width = math.prod(self.shape[1:])
        first, last = start * width, stop * width  # the flat range of the rows
        if source.ndim == 0:
            flat, offset = _full(source).reshape(-1), 0
        else:
            source_width = math.prod(source.shape[1:])
            begin = first // source_width
            flat = _rows(source, begin, -(-last // source_width)).reshape(-1)
            offset = begin * source_width
        return flat[first - offset : last - offset].reshape((stop - start, *self.shape[1:]))

    @property
    def ndim(self) -> int:
        """The output's rank."""
        return len(self.shape)


Source = np.ndarray | Rows  # an input of a folded node


def _full(x: Source) -> np.ndarray:
    return x if isinstance(x, np.ndarray) else x.full()


def _rows(x: Source, start: int, stop: int) -> np.ndarray:
    return x[start:stop] if isinstance(x, np.ndarray) else x.rows(start, stop)


class DecodedTensor(ir.LazyTensor):
    """A folded node's large output, written to a file `block` elements (whole rows) at a time."""

    def __init__(self, rows: Rows, name: str | None, block: int) -> None:
        dtype, shape = ir.DataType.from_numpy(rows.dtype), ir.Shape(rows.shape)
        super().__init__(lambda: ir.Tensor(rows.full(), dtype=dtype), dtype=dtype, shape=shape, name=name)
        self.decoded = rows
        self.block = block

    def tofile(self, file: Any) -> None:
        """Write the tensor's bytes (as ``ir.Tensor`` writes them) to `file`, a block of rows at a time."""
        count = self.decoded.shape[0]
        step = max(1, self.block // max(1, math.prod(self.decoded.shape[1:])))
        for start in range(0, count, step):
            ir.Tensor(self.decoded.rows(start, min(count, start + step)), dtype=self.dtype).tofile(file)


def fold(node: ir.Node, inputs: list[Source], name: str | None, block: int) -> ir.TensorProtocol | None:
    """The output of `node` (a key of OPS) from its constant inputs; None: left to ONNX Runtime.

    An output of more than `block` elements, of a plain numeric type, is a DecodedTensor (computed as it is
    written); a smaller one is computed now.

    Raises:
        NotExactError: NumPy would not compute this node exactly as ONNX Runtime does.
    """
    if node.op_type == "Gather" and inputs[1].dtype.kind not in "iu":
        return None
    planned = _planned(node, inputs)
    if planned is None or math.prod(planned[0]) <= block or planned[1].kind not in "biuf" or not planned[1].isnative:
        return ir.tensor(np.ascontiguousarray(OPS[node.op_type](node, *(_full(x) for x in inputs))), name=name)
    return DecodedTensor(Rows(node, inputs, *planned), name, block)


def _planned(node: ir.Node, inputs: list[Source]) -> tuple[tuple[int, ...], np.dtype[Any]] | None:
    """The node's output shape and dtype, computed from its inputs' without their values; None: only whole.

    Raises:
        NotExactError: As the node's operator would on arrays of these dtypes.
    """
    op = node.op_type
    probes = [np.zeros(1, x.dtype) for x in inputs]  # the operator's checks and its result's dtype
    if op == "Gather":
        data, indices = inputs
        if data.ndim == 0 or indices.ndim == 0 or node.attributes.get_int("axis", 0) not in (0, -data.ndim):
            return None
        shape, dtype = (*indices.shape, *data.shape[1:]), data.dtype
    elif op == "Reshape":
        target = _full(inputs[1])
        # The shape Reshape gives (-1 resolved, a size that does not fit refused), from a view that holds nothing.
        shape = _reshape(node, np.broadcast_to(probes[0][0], inputs[0].shape), target).shape
        dtype = inputs[0].dtype
    else:
        shape = np.broadcast_shapes(*(x.shape for x in inputs))
        dtype = OPS[op](node, *probes).dtype
    return (tuple(shape), dtype) if shape else None
