"""NNCF (OpenVINO's Neural Network Compression Framework) on its ONNX backend.

Settings:
    int8 quantize: nncf.quantize with its defaults (model_type transformer for the transformer), our
        calibration samples as the calibration dataset.
    int8 accuracy control: nncf.quantize_with_accuracy_control, max_drop 0.01: layers go back to float until
        the validation metric is within 0.01 of the original's. Label-free like our budgets: the metric is the
        mean output cosine against the original model on the calibration samples (1.0 for the original).
    int4 weights: nncf.compress_weights INT4_SYM, every layer (ratio 1), 32-wide groups, data-free.
    int4 weights + awq + scale estimation: the same with the calibration samples, AWQ and scale estimation.
"""

from __future__ import annotations

from typing import Any

import nncf
import numpy as np
import onnx
import onnxruntime as ort
from _common import Args, feeds, run


def _session(model: onnx.ModelProto) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.log_severity_level = 3
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def _model_type(args: Args) -> Any:
    return nncf.ModelType.TRANSFORMER if args.family == "transformer" else None


def int8_quantize(args: Args) -> None:
    data = nncf.Dataset(feeds(args.calibration))
    model = nncf.quantize(onnx.load(str(args.model)), data, model_type=_model_type(args))
    onnx.save(model, str(args.out))


def int8_accuracy_control(args: Args) -> str:
    samples = feeds(args.calibration)
    original = onnx.load(str(args.model))
    reference = [_session(original).run(None, feed) for feed in samples]

    def validate(model: onnx.ModelProto, items: Any) -> tuple[float, list[float]]:
        session = _session(model)
        cosines = []
        for feed, want in zip(items, reference, strict=True):
            got = session.run(None, feed)
            a = np.concatenate([np.asarray(w, np.float64).ravel() for w in want])
            b = np.concatenate([np.asarray(g, np.float64).ravel() for g in got])
            cosines.append(float(a @ b / max(np.linalg.norm(a) * np.linalg.norm(b), 1e-30)))
        return float(np.mean(cosines)), cosines

    model = nncf.quantize_with_accuracy_control(
        original,
        nncf.Dataset(samples),
        nncf.Dataset(samples),
        validate,
        max_drop=0.01,
        model_type=_model_type(args),
    )
    onnx.save(model, str(args.out))
    return "validation: mean output cosine on the calibration samples, max_drop 0.01"


def _int4(args: Args, **extra: Any) -> None:
    model = nncf.compress_weights(
        onnx.load(str(args.model)), mode=nncf.CompressWeightsMode.INT4_SYM, ratio=1.0, group_size=32, **extra
    )
    onnx.save(model, str(args.out))


def int4_weights(args: Args) -> None:
    _int4(args)


def int4_awq(args: Args) -> None:
    _int4(args, dataset=nncf.Dataset(feeds(args.calibration)), awq=True, scale_estimation=True)


if __name__ == "__main__":
    run(
        {
            "int8 quantize": int8_quantize,
            "int8 accuracy control": int8_accuracy_control,
            "int4 weights": int4_weights,
            "int4 weights + awq + scale estimation": int4_awq,
        }
    )
