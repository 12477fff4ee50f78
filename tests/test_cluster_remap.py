"""Cluster maps a checked weight afresh (its pages leave memory) only where the job's file holds it unchanged."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from onnx_ops import job_files
from onnx_ops.passes._base import PassContext
from onnx_ops.passes.cluster import ClusterPass
from onnx_ops.plan import ClusterStep

import models


@pytest.mark.parametrize("first_step", [True, False])
def test_weights_are_mapped_afresh_only_on_the_plans_first_step(tmp_path: Path, first_step: bool) -> None:
    path = job_files.spill(models.mlp(), tmp_path / "original.onnx")
    model = job_files.load_ir(path)
    before = {name: value.const_value for name, value in model.graph.initializers.items()}
    context = PassContext(workdir=tmp_path, source=path if first_step else None)
    assert (context.unchanged_source is not None) == first_step
    ClusterPass(ClusterStep(kind="cluster", bits=4), context).precheck(model)  # checks (and maps) each candidate
    checked = [name for name, tensor in before.items() if tensor.size >= 4096]
    assert checked  # the MLP's large weights
    for name in checked:
        after = model.graph.initializers[name].const_value
        assert (after is not before[name]) == first_step, name
        assert isinstance(getattr(after, "raw", None), np.memmap)
        np.testing.assert_array_equal(after.numpy(), before[name].numpy())
