"""Teacher-aimed rounding of a static int8 layer: refit to the float model's outputs, then GPTQ inside the scales.

Plain GPTQ (onnx_ops.passes.quantize.rounding) keeps the int8 layer close to its own float weight on the
student's inputs: ``min ||X_s (W - Q)^T||``. The student's inputs already carry the 8-bit error of every layer
before it, which that objective leaves alone. Here each layer aims at the teacher's output of the same layer
instead, from the student's own (dequantized) inputs:

1. Refit: ``W' = argmin ||X_s W'^T + b' - Y_t||^2 + lambda ||W' - W||^2`` (ridge towards the float weight, the
   bias fit too and not damped), with lambda chosen by two-fold cross-validation over the calibration feeds
   (onnx_ops.passes._refit_cv); when no lambda predicts the held-out fold better than the float weight, W' = W.
2. GPTQ rounds W' on ONNX Runtime's grids with H = X_s^T X_s. Since W' solves the least-squares problem, the
   output error is ``||X_s (W' - Q)^T||^2`` (what GPTQ minimises) plus the refit's own residual.
3. The bias is the least-squares one for the rounded weight: ``mean(Y_t) - Q mean(X_s)``, which also takes
   out the mean shift the student's inputs carry.

This needs X_s from a student whose earlier layers are already final: recovery visits the layers in stages
(onnx_ops.passes.quantize.stages) when it aims at the teacher. Grouped Convs are not refit (GPTQ of the float
weight, then the least-squares bias); when recovery's depthwise check later undoes their rounding, the layers
after them stay fit to the inputs they had (not measured: the models measured with aim have no depthwise Conv).
Measured on ddddocr's captcha detector (README, "Static int8 with recovery"): output error far lower, box F1
not measurably different from GPTQ alone, so it is not the default.
"""

from __future__ import annotations

import numpy as np
import onnx

from onnx_ops.capture import LayerStats
from onnx_ops.passes._refit import solve_masked
from onnx_ops.passes._refit_cv import choose_damping
from onnx_ops.passes.quantize.qdq import QdqLayer

__all__: list[str] = []  # package-private

DAMPING = 0.01  # the centre of the cross-validated grid (x 0.1 .. x 1000), relative to mean(diag(X^T X))


def refit(stats: LayerStats, weight: np.ndarray, bias: np.ndarray | None) -> tuple[np.ndarray, np.ndarray, float]:
    """The weight and bias aimed at the teacher's outputs, and the damping used (-1 when the float ones are kept).

    Args:
        stats: One group's statistics: student inputs (with the ones column) against teacher outputs, with two
            folds for the cross-validation (without them, a fixed DAMPING).
        weight: [n, k] the float weight (rows: output channels).
        bias: [n] the float bias, or None when the layer has none (its bias is then not fit).
    """
    prior = np.vstack([weight.T, (bias if bias is not None else np.zeros(weight.shape[0]))[None]])
    damping = DAMPING
    if stats.folds:
        choice = choose_damping(stats, prior, bias is not None, DAMPING)
        if choice is not None and not choice.helps:
            return weight, prior[-1], -1.0
        damping = choice.damping if choice is not None else DAMPING
    solved = solve_masked(stats, prior, bias is not None, damping)
    if not np.all(np.isfinite(solved)):
        return weight, prior[-1], -1.0
    return solved[:-1].T, solved[-1], damping


def least_squares_bias(stats: LayerStats, quantized: np.ndarray) -> np.ndarray:
    """[n] the bias that minimises the output error of the [n, k] weight `quantized`: mean(Y) - Q mean(X)."""
    rows = max(stats.rows, 1)
    sums_x, sums_y = stats.xtx[-1, :-1], stats.xty[-1]
    return np.asarray((sums_y - quantized @ sums_x) / rows)


def before_activations(teacher: onnx.ModelProto, layers: list[QdqLayer]) -> None:
    """Aim each layer at the teacher's output of the layer itself, not of the activation fused into its output.

    ONNX Runtime's quantizer drops a Relu (or Clip) after a Conv and lets the output's QuantizeLinear clip
    instead: the Conv's output then has the activation's name, whose teacher values are not linear in the
    layer's inputs. The target becomes the teacher's tensor before the activation (the same node's output).
    """
    producers = {name: node for node in teacher.graph.node for name in node.output}
    for layer in layers:
        found = producers.get(layer.output)
        if found is not None and found.op_type in ("Relu", "Clip") and found.input:
            before = producers.get(found.input[0])
            if before is not None and before.name == layer.node and before.op_type == layer.op_type:
                layer.output = found.input[0]
