"""Static int8 recovery "auto": a stage of layers is kept only where it brings the outputs closer to the float model's.

See `keep_if_closer`; onnx_ops.passes.quantize.recovery calls it after each stage.
"""

from __future__ import annotations

import numpy as np

from onnx_ops.passes.quantize import exclusions
from onnx_ops.passes.quantize.outcome import Outcome
from onnx_ops.passes.quantize.qdq import QdqLayer, QdqModel

__all__: list[str] = []  # package-private


def kept(model: QdqModel, chunk: list[QdqLayer]) -> dict[str, np.ndarray]:
    """What recovering `chunk` will change: its layers' stored weights and biases."""
    return {name: model.array(name) for layer in chunk for name in (layer.weight, layer.bias) if name}


def keep_if_closer(
    model: QdqModel,
    chunk: list[QdqLayer],
    kept: dict[str, np.ndarray],
    judge: exclusions.Exclusions,
    closest: float,
    outcome: Outcome,
) -> float:
    """Keep the chunk's recovery if the calibration outputs got closer to the float model's; else undo it.

    GPTQ lowers each layer's own error on its captured inputs, and yet it can move the model's outputs away:
    on ddddocr's captcha detector, calibrated on 16 captchas, the first stage (11 Convs) took the calibration
    cosine from 0.971 to 0.947, while the layer error fell to 0.07x of round-to-nearest. Judging the layers of
    such a stage one by one as well was measured and not kept: it brought the calibration cosine closer still
    (0.985 against 0.972) but cost the detector 0.8 points of box F1 on held-out captchas. Returns the cosine
    now reached.
    """
    outcome.stages += 1
    now = judge.cosine(model.proto)
    if now >= closest:
        return now
    for name, value in kept.items():
        model.set_array(name, value)
    for layer in chunk:
        outcome.undo(layer.node)
        outcome.undone.append(layer.node)
    return closest
