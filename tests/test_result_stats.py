"""A result past 2 GiB is measured from the files the job wrote: never loaded whole nor written again.

The one-file limit is lowered (onnx_ops.large.ONE_FILE_LIMIT) so that small models take the path of models
past 2 GiB.
"""

from __future__ import annotations

import gzip

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import onnx_ops.large as large
from onnx_ops import compress, job_files
from onnx_ops.evaluate import model_stats
from onnx_ops.measure import result_stats

import models

FAST = {"latency_runs": 3, "warmup_runs": 1}
_LIMIT = 16 << 10  # models.mlp() (about 100 KB) is past it


def _with_odd_tensors() -> onnx.ModelProto:
    """models.mlp() with zeros in a weight, a Constant node's tensor and an unused int4 initializer (packed)."""
    model = models.mlp()
    weight = model.graph.initializer[0]
    array = numpy_helper.to_array(weight).copy()
    array[:, ::3] = 0.0
    weight.CopyFrom(numpy_helper.from_array(array, weight.name))
    packed = helper.make_tensor("packed", TensorProto.INT4, [4096], bytes(range(256)) * 8, raw=True)  # 2 a byte
    model.graph.initializer.append(packed)
    constant = numpy_helper.from_array(np.zeros(8, np.float32), "c")
    model.graph.node.append(helper.make_node("Constant", [], ["unused_c"], value=constant))
    model.opset_import[0].version = 21
    model.ir_version = 10
    onnx.checker.check_model(model)
    return model


def test_a_result_past_the_limit_is_counted_from_its_files_as_they_are(tmp_path, monkeypatch):
    model = _with_odd_tensors()
    want = model_stats(model)  # within the real limit: the model as one file, counted in memory
    path = job_files.spill(onnx.ModelProto.FromString(model.SerializeToString()), tmp_path / "compressed.onnx")
    monkeypatch.setattr(large, "ONE_FILE_LIMIT", _LIMIT)
    written: list[object] = []
    real_save = large.save_model
    monkeypatch.setattr(large, "save_model", lambda *a, **k: written.append(a) or real_save(*a, **k))
    got = result_stats(path)
    assert written == []  # no second copy of the model was written to count it
    files = [path, tmp_path / "compressed.onnx.data"]
    assert got.size_bytes == sum(f.stat().st_size for f in files)
    assert got.gzip_bytes == len(gzip.compress(b"".join(f.read_bytes() for f in files), compresslevel=6, mtime=0))
    assert not got.gzip_estimated
    assert (got.parameters, got.zero_fraction) == (want.parameters, want.zero_fraction)
    assert got.zero_fraction > 0.09  # the zeros were read from the data file
    assert (got.nodes, got.op_counts, got.opset) == (want.nodes, want.op_counts, want.opset)


def test_a_result_within_the_limit_is_measured_as_one_file(tmp_path):
    model = _with_odd_tensors()
    path = job_files.spill(onnx.ModelProto.FromString(model.SerializeToString()), tmp_path / "compressed.onnx")
    assert result_stats(path) == model_stats(model)


def test_compress_writes_no_copy_of_a_result_past_the_limit_to_measure_it(tmp_path, monkeypatch):
    monkeypatch.setattr(large, "ONE_FILE_LIMIT", _LIMIT)
    written: list[object] = []
    real_save = large.save_model
    monkeypatch.setattr(large, "save_model", lambda *a, **k: written.append(a) or real_save(*a, **k))
    plan = {"steps": [{"kind": "prune", "method": "unstructured", "sparsity": 0.5}], "evaluation": FAST}
    source = tmp_path / "in" / "mlp.onnx"
    source.parent.mkdir()
    source.write_bytes(models.mlp().SerializeToString())
    result = compress(source, plan)
    assert written == []
    after = result.report.after
    counted = [numpy_helper.to_array(t) for t in result.model.graph.initializer]
    assert after.parameters == sum(a.size for a in counted)
    assert after.zero_fraction == pytest.approx(sum(a.size - np.count_nonzero(a) for a in counted) / after.parameters)
    (tmp_path / "out").mkdir()
    assert result.save(tmp_path / "out" / "out.onnx")  # past the limit: saved with external data
    saved = sum(p.stat().st_size for p in (tmp_path / "out").iterdir())
    assert after.size_bytes == pytest.approx(saved, rel=0.01)  # as saved, but for the data file's name in references
