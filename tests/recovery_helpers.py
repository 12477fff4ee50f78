"""What the recovery tests (distill after unstructured or structured pruning) share: correlated inputs, the
output gap, and a model compressed with and without recovery on the same data.
"""

from __future__ import annotations

import numpy as np
import onnx

from onnx_ops.pipeline import compress
from onnx_ops.report import Report
from tests.helpers import NO_LATENCY

__all__ = ["correlated", "gap", "minilm", "with_and_without_distill"]


def correlated(n: int, seed: int, features: int = 64, latent: int = 12) -> np.ndarray:
    """[n, features] inputs whose features correlate (a low-dimensional signal plus noise), as real data's do."""
    rng = np.random.default_rng(seed)
    mixing = np.random.default_rng(99).standard_normal((latent, features))
    x = rng.standard_normal((n, latent)) @ mixing + 0.1 * rng.standard_normal((n, features))
    return x.astype(np.float32)


def gap(report: Report, output: str) -> float:
    """1 - cosine of one output against the original model's, on the evaluation inputs."""
    return next(1.0 - o.cosine for o in report.agreement.outputs if o.name == output)


def with_and_without_distill(
    model: onnx.ModelProto,
    prune: dict[str, object],
    cal: dict[str, np.ndarray],
    ev: dict[str, np.ndarray],
    distill: dict[str, object] | None = None,
    *,
    calibrate_prune: bool = False,
) -> tuple[onnx.ModelProto, Report, onnx.ModelProto, Report]:
    """(pruned model, its report, pruned + distilled model, its report), both measured on `ev`.

    `calibrate_prune`: the plain prune sees the calibration data too (structured pruning chooses channels by it).
    """
    plain = compress(
        model, {"steps": [prune], "evaluation": NO_LATENCY}, calibration=cal if calibrate_prune else None, evaluation=ev
    )
    plan = {"steps": [prune, {"kind": "distill", **(distill or {})}], "evaluation": NO_LATENCY}
    recovered = compress(model, plan, calibration=cal, evaluation=ev)
    return plain.model, plain.report, recovered.model, recovered.report


def minilm(calibration: int) -> tuple[onnx.ModelProto, dict[str, np.ndarray], dict[str, np.ndarray]]:
    """MiniLM-L3, `calibration` batches of its sample sentences and 16 held-out ones (skips when not installed)."""
    from tests import real_models

    path = real_models.path_or_skip("minilm_l3")
    model = onnx.load(str(path))
    return model, real_models.stacked_feeds("minilm_l3", calibration, 1), real_models.stacked_feeds("minilm_l3", 16, 2)
