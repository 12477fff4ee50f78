"""The quantize step's recovery_target reaches static int8 recovery: real ORT runs on a small Conv chain, no timing."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx_ir as ir
import pytest

from onnx_ops.passes._base import PassContext
from onnx_ops.passes.quantize import QuantizePass
from onnx_ops.plan import QuantizeStep
from service.form_schema import step_forms
from tests.test_quantize_aimed import _chain, _images


@pytest.mark.parametrize("target", ["float_weights", "float_outputs"])
def test_recovery_target_chooses_whether_the_static_pass_refits_to_the_float_outputs(
    target: str, tmp_path: Path
) -> None:
    rng = np.random.default_rng(5)
    model, calibration = _chain(rng), _images(rng, 10)
    step = QuantizeStep(mode="static", recovery_target=target, speed_check=False)  # type: ignore[arg-type]
    qpass = QuantizePass(step, PassContext(workdir=tmp_path, calibration=calibration))
    qpass(ir.from_proto(model))
    summary = qpass.log.summary
    assert summary["recovery_layers"] == 5, summary
    if target == "float_outputs":
        assert str(summary["recovery_aimed"]).endswith("layers refit to the float model's outputs before rounding")
    else:
        assert "recovery_aimed" not in summary, summary


def test_recovery_target_defaults_to_the_float_weights_and_is_static_only_like_its_siblings() -> None:
    assert QuantizeStep().recovery_target == "float_weights"
    with pytest.raises(ValueError, match="recovery_target"):
        QuantizeStep(mode="static", recovery_target="teacher")  # type: ignore[arg-type]
    # Like rounding and bias_correction, refused in dynamic mode (which would ignore it); the form shows it in static
    # mode only.
    with pytest.raises(ValueError, match="recovery_target applies to static quantization only"):
        QuantizeStep(mode="dynamic", recovery_target="float_outputs")
    form = {w.name: w for w in next(f for f in step_forms() if f.kind == "quantize").widgets}
    for name in ("recovery_target", "rounding", "bias_correction"):
        assert form[name].only == ("mode", "static"), name
    assert form["recovery_target"].choices == ("float_weights", "float_outputs")
