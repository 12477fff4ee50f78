"""onnxsim 0.8.1 (PyPI `onnxsim`, "Simplify your ONNX model"): its ONNX-level int8, pruning, int4 and k-means.

Every setting starts from the model as onnxsim's own `simplify` leaves it, at opset 17 at least and with its
weight Constant nodes made initializers: onnxsim's quantizers and pruners look for initializer weights only and,
below opset 13 (no per-channel QuantizeLinear), change nothing while reporting no error.

Settings (the benchmark groups them by what they are matched with):
    int8: static (quantize_static, calibrated on our data), static + bias correction (correct_bias),
        static + AdaQuant (apply_adaquant: rounding and clip ranges fitted on the data).
    prune 50%: magnitude (apply_magnitude_pruning), magnitude + finetune (apply_pruning_finetune, its
        layer-wise ridge refit), wanda (apply_wanda_pruning), sparsegpt (apply_sparsegpt_pruning).
    int4: rtn (quantize_weight_only_int4, 32-wide blocks), + gptq (apply_gptq), + adaround (apply_adaround).
    kmeans: 4-bit codebooks per layer (quantize_weight_only_kmeans).
"""

from __future__ import annotations

from collections.abc import Callable

import onnx
import onnxsim
from _common import Args, constants_to_initializers, feeds, run

_PREPARED: list[onnx.ModelProto] = []  # the prepared model, made once per run


def _prepared(args: Args) -> onnx.ModelProto:
    """A fresh copy of the prepared model (onnxsim's functions may change the model they are given)."""
    if not _PREPARED:
        _PREPARED.append(_prepare(args))
    copy = onnx.ModelProto()
    copy.CopyFrom(_PREPARED[0])
    return copy


def _prepare(args: Args) -> onnx.ModelProto:
    model = onnx.load(str(args.model))
    opset = max((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), default=17)
    simplified, _ = onnxsim.simplify(model, target_opset_version=max(opset, 17))
    return constants_to_initializers(simplified)


def _static(args: Args) -> onnx.ModelProto:
    return onnxsim.quantize_static(_prepared(args), calibration_data=feeds(args.calibration))


def _magnitude(args: Args) -> onnx.ModelProto:
    return onnxsim.apply_magnitude_pruning(_prepared(args), sparsity=0.5)


def _int4(args: Args) -> onnx.ModelProto:
    return onnxsim.quantize_weight_only_int4(_prepared(args))


# Each setting: (the function, the model it starts from or None for the prepared fp32 model alone).
Build = Callable[..., onnx.ModelProto]
SETTINGS: dict[str, tuple[Build, Callable[[Args], onnx.ModelProto] | None]] = {
    "int8 static": (lambda model, data: onnxsim.quantize_static(model, calibration_data=data), None),
    "int8 static + bias correction": (onnxsim.correct_bias, _static),
    "int8 static + adaquant": (onnxsim.apply_adaquant, _static),
    "prune magnitude": (lambda model, data: onnxsim.apply_magnitude_pruning(model, sparsity=0.5), None),
    "prune magnitude + finetune": (onnxsim.apply_pruning_finetune, _magnitude),
    "prune wanda": (lambda model, data: onnxsim.apply_wanda_pruning(model, calibration_data=data, sparsity=0.5), None),
    "prune sparsegpt": (
        lambda model, data: onnxsim.apply_sparsegpt_pruning(model, calibration_data=data, sparsity=0.5),
        None,
    ),
    "int4 rtn": (lambda model, data: onnxsim.quantize_weight_only_int4(model), None),
    "int4 gptq": (onnxsim.apply_gptq, _int4),
    "int4 adaround": (onnxsim.apply_adaround, _int4),
    "kmeans 4-bit": (lambda model, data: onnxsim.quantize_weight_only_kmeans(model, bits=4), None),
}


def _setting(name: str) -> Callable[[Args], None]:
    build, start = SETTINGS[name]

    def run_it(args: Args) -> None:
        data = feeds(args.calibration)
        if start is None:
            model = build(_prepared(args), data)
        else:  # a recovery step: the fp32 model, the compressed one, and the calibration data
            model = build(_prepared(args), start(args), calibration_data=data)
        onnx.save(model, str(args.out))

    return run_it


if __name__ == "__main__":
    run({name: _setting(name) for name in SETTINGS})
