"""The size figures of a ModelProto given to a job: never a copy of the model written only to count them.

The one-file limit is lowered (onnx_ops.large.ONE_FILE_LIMIT) so that a model of a few hundred KB takes the path
of models past 2 GiB.
"""

from __future__ import annotations

import gzip

import numpy as np
import pytest
from onnx import numpy_helper

from onnx_ops import job_model, large
from onnx_ops.validate import Limits

import models

_LIMIT = 16 << 10


@pytest.fixture
def saves(monkeypatch: pytest.MonkeyPatch) -> list[object]:
    """Every model written by onnx_ops.large (a temp copy made to count a model's sizes goes through it)."""
    written: list[object] = []
    real_save = large.save_model
    monkeypatch.setattr(large, "save_model", lambda *a, **k: written.append(a) or real_save(*a, **k))
    return written


def test_a_proto_past_the_limit_is_counted_from_the_jobs_own_files(tmp_path, monkeypatch, saves):
    model = models.mlp((64, 256, 256, 10))  # about 330 KB of weights, past the lowered limit
    want = model.SerializeToString()
    monkeypatch.setattr(large, "ONE_FILE_LIMIT", _LIMIT)
    job = job_model.from_proto(model, tmp_path, Limits())
    assert saves == []  # no temp copy of the model was written to learn its sizes
    files = [job.path, tmp_path / "original.onnx.data"]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(f.name for f in files)
    assert job.stats.size_bytes == sum(f.stat().st_size for f in files) > len(want) - _LIMIT
    packed = gzip.compress(b"".join(f.read_bytes() for f in files), compresslevel=6, mtime=0)
    assert job.stats.gzip_bytes == len(packed) and not job.stats.gzip_estimated
    assert job.stats.parameters == sum(numpy_helper.to_array(t).size for t in model.graph.initializer)
    assert model.SerializeToString() == want  # the caller's proto is left as it was


def test_a_proto_within_the_limit_is_counted_as_one_file_in_memory(tmp_path, saves):
    model = models.mlp((64, 256, 256, 10))
    job = job_model.from_proto(model, tmp_path, Limits())
    assert saves == []
    one_file = model.SerializeToString()
    assert job.stats.size_bytes == len(one_file)
    assert job.stats.gzip_bytes == len(gzip.compress(one_file, compresslevel=6, mtime=0))


def test_past_the_limit_the_figures_are_those_the_compressed_model_gets_counted_by(tmp_path, monkeypatch):
    # A result past the limit is counted from the job's files as they are (measure.result_stats); an original
    # given as a proto now is too, so a model compressed by nothing at all keeps its figures.
    from onnx_ops.measure import result_stats

    model = models.mlp((64, 256, 256, 10))
    model.graph.initializer[0].CopyFrom(
        numpy_helper.from_array(np.zeros((64, 256), np.float32), model.graph.initializer[0].name)
    )
    monkeypatch.setattr(large, "ONE_FILE_LIMIT", _LIMIT)
    job = job_model.from_proto(model, tmp_path, Limits())
    assert result_stats(job.path) == job.stats
    assert job.stats.zero_fraction > 0.1
