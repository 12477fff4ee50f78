"""GPTQ rounding of MatMul weights on the user's calibration data (Frantar et al., 2022), in numpy.

Not ONNX Runtime's GPTQ: its driver (``neural_compressor.weight_only.gptq_quantize``) imports PyTorch for every
multi-input calibration sample, and its numpy solver (``weight_only.gptq``) propagates each row's rounding error
through the column ``Hinv[i:, i]`` of the upper-triangular Cholesky factor, which is zero below the diagonal: its
result equals round-to-nearest (checked in tests/test_int4.py). Here the float model runs once per calibration
sample with the inputs of the chosen MatMuls as extra outputs, each input's Hessian ``2/n sum(x^T x)`` is
accumulated, and every weight W[K, N] is rounded row by row along K with the error spread over the rows not yet
rounded through ``Hinv[i, i+1:]``, one 4-bit grid per block of ``block_size`` rows and output column. The int4
pass lets ONNX Runtime's quantizer build the MatMulNBits nodes, then stores these exact levels, scales and zero
points in them (quantizing the rounded weights again would pick other grids: 2% more error measured).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np
import onnx
import onnxruntime as ort

from onnx_ops.feeds import Feed

__all__ = ["Rounded", "gptq_weights", "store_levels"]


@dataclasses.dataclass(frozen=True)
class Rounded:
    """A weight [K, N] on 4-bit grids: levels 0..15, and a scale and zero point per block of rows and column."""

    levels: np.ndarray  # uint8 [K, N]
    scales: np.ndarray  # float32 [blocks, N]
    zeros: np.ndarray  # uint8 [blocks, N]; 8 everywhere when symmetric
    block: int
    rows: int = 0  # calibration activation rows the Hessian came from

    def weight(self) -> np.ndarray:
        """The float weight the grids encode."""
        rows = np.arange(self.levels.shape[0]) // self.block
        return np.asarray((self.levels.astype(np.float32) - self.zeros[rows]) * self.scales[rows], np.float32)

    def matmul_nbits(self, symmetric: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """MatMulNBits' B [N, blocks, block/2], scales [N, blocks] and packed zero points (None when symmetric)."""
        k, n = self.levels.shape
        blocks = self.scales.shape[0]
        padded = np.empty((blocks * self.block, n), np.uint8)
        padded[:k] = self.levels
        padded[k:] = self.zeros[-1]  # rows past K decode to 0
        pairs = padded.T.reshape(n, blocks, self.block // 2, 2)
        packed = (pairs[..., 0] | (pairs[..., 1] << 4)).astype(np.uint8)
        if symmetric:
            return packed, np.ascontiguousarray(self.scales.T, np.float32), None
        zeros = np.zeros((n, blocks + blocks % 2), np.uint8)
        zeros[:, :blocks] = self.zeros.T
        return packed, np.ascontiguousarray(self.scales.T, np.float32), (zeros[:, 0::2] | (zeros[:, 1::2] << 4))


def gptq_weights(
    proto: onnx.ModelProto,
    targets: dict[str, tuple[str, np.ndarray]],
    feeds: Sequence[Feed],
    *,
    block_size: int,
    symmetric: bool,
) -> dict[str, Rounded]:
    """GPTQ-rounded weights.

    Args:
        proto: The float model.
        targets: Weight name -> (name of the MatMul's activation input, the float weight [K, N]).
        feeds: Calibration samples.
        block_size: Weights sharing one scale along K.
        symmetric: Symmetric blocks (no zero point).

    Returns:
        Weight name -> the weight after GPTQ, as levels on the 4-bit grid of each block.
    """
    hessians, rows = _hessians(proto, sorted({act for act, _ in targets.values()}), feeds)
    return {
        name: dataclasses.replace(_solve(weight, hessians[act].copy(), block_size, symmetric), rows=rows[act])
        for name, (act, weight) in targets.items()
    }


def store_levels(
    proto: onnx.ModelProto, rounded: dict[str, Rounded], weights: dict[str, str], *, symmetric: bool
) -> None:
    """Put the exact levels, scales and zero points into the MatMulNBits nodes ONNX Runtime's quantizer built.

    Args:
        proto: The quantized model, changed in place.
        rounded: Weight name -> its GPTQ rounding.
        weights: Name of each original MatMul node -> the name of its weight.
        symmetric: Blocks without zero points.
    """
    inits = {init.name: init for init in proto.graph.initializer}
    for node in proto.graph.node:
        found = rounded.get(weights.get(node.name.removesuffix("_Q4"), ""))
        if node.op_type != "MatMulNBits" or found is None:
            continue
        for name, array in zip(node.input[1:4], found.matmul_nbits(symmetric), strict=False):
            if array is not None:
                if list(inits[name].dims) != list(array.shape):
                    raise ValueError(f"{name}: ONNX Runtime wrote {list(inits[name].dims)}, gptq has {array.shape}")
                inits[name].CopyFrom(onnx.numpy_helper.from_array(array, name))


def _solve(weight: np.ndarray, h: np.ndarray, block: int, symmetric: bool, damp: float = 0.01) -> Rounded:
    """Weight [K, N] rounded row by row, each row's error compensated on the rows after it."""
    w = weight.astype(np.float64)
    dead = np.diag(h) == 0  # inputs that are always zero: their rows do not matter
    h[dead, dead] = 1.0
    w[dead, :] = 0.0
    h[np.diag_indices_from(h)] += damp * np.mean(np.diag(h))
    upper = np.linalg.cholesky(np.linalg.inv(h)).T  # Hinv's Cholesky factor: upper[i, j] for j >= i
    blocks = -(-w.shape[0] // block)
    levels = np.zeros(w.shape, np.uint8)
    scales, zeros = np.ones((blocks, w.shape[1])), np.zeros((blocks, w.shape[1]))
    for i in range(w.shape[0]):
        if i % block == 0:
            scales[i // block], zeros[i // block] = _grid(w[i : i + block], symmetric)
        scale, zero = scales[i // block], zeros[i // block]
        levels[i] = np.clip(np.round(w[i] / scale) + zero, 0, 15)
        err = (w[i] - scale * (levels[i] - zero)) / upper[i, i]
        w[i + 1 :] -= np.outer(upper[i, i + 1 :], err)
    return Rounded(levels, scales.astype(np.float32), zeros.astype(np.uint8), block)


def _grid(rows: np.ndarray, symmetric: bool) -> tuple[np.ndarray, np.ndarray]:
    """Scale and zero point of each column's 16 levels over a block of rows, as ONNX Runtime's rtn picks them."""
    if symmetric:  # the value of largest magnitude becomes level -8
        low, high = rows.min(axis=0), rows.max(axis=0)
        scale = np.where(np.abs(high) > np.abs(low), high, low) / -8.0
        zero = np.full_like(scale, 8.0)
    else:
        low, high = np.minimum(rows.min(axis=0), 0.0), np.maximum(rows.max(axis=0), 0.0)
        scale = (high - low) / 15
        zero = np.clip(np.round(-low / np.where(scale == 0, 1.0, scale)), 0, 15)
    scale[scale == 0] = 1.0
    return scale, zero


def _hessians(
    proto: onnx.ModelProto, activations: list[str], feeds: Sequence[Feed]
) -> tuple[dict[str, np.ndarray], dict[str, int]]:
    """2/n * sum(x^T x) over the calibration samples of each activation (n counts first dimensions), and its rows."""
    capture = onnx.ModelProto()
    capture.CopyFrom(proto)
    del capture.graph.output[:]
    capture.graph.output.extend(onnx.helper.make_empty_tensor_value_info(name) for name in activations)
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(capture.SerializeToString(), options, providers=["CPUExecutionProvider"])
    del capture
    totals: dict[str, np.ndarray] = {}
    counts: dict[str, int] = {}
    rows: dict[str, int] = {}
    for feed in feeds:
        for name, value in zip(activations, session.run(activations, feed), strict=True):
            x = np.asarray(value, np.float64)
            batch = x.shape[0] if x.ndim > 1 else 1
            x = x.reshape(-1, x.shape[-1])
            rows[name] = rows.get(name, 0) + x.shape[0]
            seen = counts.get(name, 0)
            h = totals.get(name, np.zeros((x.shape[1], x.shape[1])))
            h *= seen / (seen + batch)
            counts[name] = seen + batch
            x *= np.sqrt(2 / counts[name])
            totals[name] = h + x.T @ x
    return totals, rows
