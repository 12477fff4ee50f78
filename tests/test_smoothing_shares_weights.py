"""Smoothing's statistics session on the plan's first step: the job's data file is referred to, not copied."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest

from onnx_ops import job_files, job_model
from onnx_ops.passes._base import PassContext
from onnx_ops.passes.quantize import QuantizePass, smoothing
from onnx_ops.plan import QuantizeStep
from onnx_ops.validate import Limits

import models


def _calibration() -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(3)
    scales = np.geomspace(0.05, 20, 64)  # outlier channels: smoothing has something to do
    return [{"x": (rng.normal(size=(4, 64)) * scales).astype(np.float32)} for _ in range(6)]


def _job(tmp_path: Path) -> Path:
    """models.mlp() as a job's original: weightless original.onnx, weights in original.onnx.data (mapped)."""
    folder = tmp_path / "job"
    folder.mkdir()
    return job_model.from_proto(models.mlp(), folder, Limits()).path


@pytest.fixture
def data_file_sizes(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> list[int]:
    """The size of smoothing's float data file each time its session has been built (read as the stats run)."""
    sizes: list[int] = []
    real = smoothing.channel_ranges

    def recording(runner, names, feeds):  # type: ignore[no-untyped-def]
        (data,) = tmp_path.rglob("smoothing_float.onnx.data")  # the one of the statistics running now
        sizes.append(data.stat().st_size)
        return real(runner, names, feeds)

    monkeypatch.setattr(smoothing, "channel_ranges", recording)
    return sizes


def test_shared_statistics_refer_to_the_jobs_weights_and_match_a_full_copy(tmp_path, data_file_sizes):
    original = _job(tmp_path)
    model = job_files.load_ir(original)
    found = list(smoothing.groups(model))
    assert found
    shared = smoothing.statistics(model, found, _calibration(), original.parent, share=True)
    copied_folder = tmp_path / "copied"
    copied_folder.mkdir()
    copied = smoothing.statistics(model, found, _calibration(), copied_folder)
    weights = sum(v.const_value.nbytes for v in model.graph.initializers.values() if v.const_value.nbytes >= 1024)
    assert data_file_sizes == [0, pytest.approx(weights, rel=0.05)]  # referred to; then written whole
    for name in found:
        for field in ("low", "high", "mean_square"):
            np.testing.assert_array_equal(getattr(shared[name], field), getattr(copied[name], field))
    assert sorted(p.name for p in original.parent.iterdir()) == ["original.onnx", "original.onnx.data"]


def test_the_quantize_pass_shares_the_weights_on_the_plans_first_step(tmp_path, data_file_sizes):
    original = _job(tmp_path)
    step = QuantizeStep(mode="dynamic", speed_check=False, smoothing="all")
    context = PassContext(workdir=original.parent, calibration=_calibration(), source=original)
    qpass = QuantizePass(step, context)
    result = qpass(job_files.load_ir(original)).model
    assert " activations, alpha " in str(qpass.log.summary["smoothing"])
    assert data_file_sizes == [0]  # only the graph was written for the statistics session
    assert any(n.op_type == "MatMulInteger" for n in ir.to_proto(result).graph.node)

    later = PassContext(workdir=original.parent, calibration=_calibration())  # not the first step: written whole
    QuantizePass(step, later)(job_files.load_ir(original))
    assert data_file_sizes[1] > 0
    onnx.checker.check_model(str(original))
