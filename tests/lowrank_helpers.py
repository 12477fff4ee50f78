"""Helpers of the low-rank tests: correlated calibration inputs and models with their constants lifted."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
from onnx_ir.passes.common import LiftConstantsToInitializersPass

__all__ = ["correlated_feeds", "lifted"]


def correlated_feeds(
    k: int, seed: int, batches: int, rows: int, decay: float, offset: float
) -> list[dict[str, np.ndarray]]:
    """Feeds of input "x" [rows, k]: a few strong directions (scales falling as exp(-i / decay)), an offset."""
    mixing = np.random.default_rng(100).standard_normal((k, k)) * np.exp(-np.arange(k) / decay)[:, None]
    rng = np.random.default_rng(seed)
    return [{"x": (rng.standard_normal((rows, k)) @ mixing + offset).astype(np.float32)} for _ in range(batches)]


def lifted(proto: onnx.ModelProto) -> ir.Model:
    """The model in IR with its constants lifted to initializers, as the pipeline hands it to a pass."""
    model = ir.from_proto(proto)
    LiftConstantsToInitializersPass(lift_all_constants=True, size_limit=0)(model)
    return model
