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
    """Keep the chunk's recovery if the calibration outputs got closer to the float model's; else judge its layers.

    GPTQ lowers each layer's own error on its captured inputs, and yet it can move the model's outputs away:
    on ddddocr's captcha detector, calibrated on 16 captchas, the first stage (11 Convs) took the calibration
    cosine from 0.971 to 0.947, while the layer error fell to 0.07x of round-to-nearest; of its layers, Conv_44
    alone took it to 0.949 and Conv_41 alone to 0.981. So a stage that moves the outputs away is undone, then
    its layers are recovered again one at a time, in order, each kept only if the outputs get closer (their
    recovered values as the stage computed them). Returns the cosine now reached.
    """
    outcome.stages += 1
    now = judge.cosine(model.proto)
    if now >= closest:
        return now
    recovered = {name: model.array(name) for name in kept}
    for name, value in kept.items():
        model.set_array(name, value)
    for layer in chunk:
        names = [name for name in (layer.weight, layer.bias) if name]
        if len(chunk) > 1:
            for name in names:
                model.set_array(name, recovered[name])
            outcome.judged += 1
            now = judge.cosine(model.proto)
            if now >= closest:
                closest = now
                continue
            for name in names:
                model.set_array(name, kept[name])
        outcome.undo(layer.node)
        outcome.undone.append(layer.node)
    return closest
