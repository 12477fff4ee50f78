"""What makes big models fit: the speed check's float file refers to the job's weights, a bounded gzip figure."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

import onnx_ops.gzip_size as gzip_size
from onnx_ops import compress, job_files, job_model
from onnx_ops.errors import InvalidModelError
from onnx_ops.passes._base import PassContext
from onnx_ops.plan import Plan
from onnx_ops.progress import Tracker
from onnx_ops.run_plan import to_file
from onnx_ops.validate import Limits
from tests.test_quantize_dynamic import _scripted

import models

FAST = {"latency_runs": 3, "warmup_runs": 1}


def _job(tmp_path: Path) -> Path:
    """A two-layer MLP as a job's original (weights in original.onnx.data); its path."""
    folder = tmp_path / "job"
    folder.mkdir()
    return job_model.from_proto(models.mlp((64, 256, 256, 10)), folder, Limits()).path


def _run(path: Path) -> np.ndarray:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    feed = {"x": np.linspace(-1, 1, 2 * 64, dtype=np.float32).reshape(2, 64)}
    return np.asarray(session.run(None, feed)[0])


def test_save_sharing_refers_to_mapped_weights_and_writes_the_others(tmp_path):
    original = _job(tmp_path)
    model = job_files.load_ir(original)
    target = original.with_name("float.onnx")
    job_files.save_sharing(model, target)
    assert target.with_name("float.onnx.data").stat().st_size == 0  # every weight is referred to, none written
    np.testing.assert_array_equal(_run(target), _run(original))
    locations = {
        entry.value
        for tensor in onnx.load(target, load_external_data=False).graph.initializer
        for entry in tensor.external_data
        if entry.key == "location"
    }
    assert locations == {"original.onnx.data"}

    changed = next(v for v in model.graph.initializers.values() if v.const_value.nbytes > 1024)
    changed.const_value = onnx_ir_tensor(changed.const_value.numpy() * 2, changed.name)
    job_files.save_sharing(model, target)  # a weight no longer mapped from the file goes to float.onnx.data
    assert target.with_name("float.onnx.data").stat().st_size == changed.const_value.nbytes
    assert not np.allclose(_run(target), _run(original))
    assert isinstance(changed.const_value.raw, np.ndarray)  # the model is left as it was given


def onnx_ir_tensor(array: np.ndarray, name: str | None) -> object:
    import onnx_ir as ir

    return ir.tensor(np.ascontiguousarray(array), name=name)


def test_the_first_steps_speed_check_writes_no_second_copy_of_the_weights(tmp_path):
    original = _job(tmp_path)
    weights = original.with_name("original.onnx.data").stat().st_size
    plan = Plan.model_validate({"steps": [{"kind": "quantize", "mode": "dynamic"}], "evaluation": FAST})
    context = PassContext(workdir=original.parent)
    out, steps = to_file(original, plan, context, Tracker(None), original.with_name("compressed.onnx"))
    float_data = original.with_name("quantize_float.onnx.data")
    assert float_data.exists()  # the speed check ran and wrote its float model ...
    assert float_data.stat().st_size < weights // 100  # ... referring to the job's own weights
    assert "speed_check" in steps[0].summary
    assert steps[0].summary["quantized_weights"] == 3
    assert np.allclose(_run(out), _run(original), atol=0.1)


def test_the_timed_int8_file_is_removed_after_the_speed_check(tmp_path):
    folder = tmp_path / "job"
    folder.mkdir()
    original = job_model.from_proto(models.mlp((512, 512, 512, 10)), folder, Limits()).path
    plan = Plan.model_validate({"steps": [{"kind": "quantize", "mode": "dynamic"}], "evaluation": FAST})
    # 128 x 512 x 512 twice: milliseconds of CPU time however loaded the host, so the check times int8
    context = PassContext(workdir=folder, input_shapes={"x": [128, 512]})
    steps = to_file(original, plan, context, Tracker(None), original.with_name("c.onnx"))[1]
    assert steps[0].summary["speed_check"].startswith("int8/float CPU time")  # it was timed ...
    assert not list(folder.glob("quantize_timed*"))  # ... and its file is gone


def _gzip_len(data: bytes) -> int:
    return len(gzip.compress(data, compresslevel=6, mtime=0))


def test_gzip_size_is_exact_up_to_its_limit_and_an_estimate_past_it(monkeypatch):
    rng = np.random.default_rng(0)
    # Weights-like bytes, about as compressible everywhere in the stream.
    data = rng.standard_normal(1 << 19).astype(np.float32).tobytes()  # 2 MiB
    exact = gzip_size.GzipSize()
    for start in range(0, len(data), 300_000):
        exact.update(data[start : start + 300_000])
    assert not exact.estimated
    assert exact.finish() == _gzip_len(data)

    monkeypatch.setattr(gzip_size, "EXACT_BYTES", 256 << 10)
    monkeypatch.setattr(gzip_size, "SAMPLE_BYTES", 16 << 10)
    monkeypatch.setattr(gzip_size, "STRIDE_BYTES", 128 << 10)
    sampled = gzip_size.GzipSize()
    for start in range(0, len(data), 25_000):  # chunks that straddle the samples' edges
        sampled.update(data[start : start + 25_000])
    assert sampled.estimated and sampled.size == len(data)
    assert sampled.finish() == pytest.approx(_gzip_len(data), rel=0.03)
    assert sampled._sample_in == 14 * (16 << 10)  # 1.75 MiB past the exact part: 14 samples, nothing else


def test_the_report_says_when_its_gzip_figure_is_an_estimate(monkeypatch):
    plan = {"steps": [{"kind": "quantize", "mode": "dynamic", "speed_check": False}], "evaluation": FAST}
    report = compress(models.mlp(), plan).report
    assert not report.before.gzip_estimated and not report.after.gzip_estimated
    monkeypatch.setattr(gzip_size, "EXACT_BYTES", 4096)
    report = compress(models.mlp(), plan).report
    assert report.before.gzip_estimated and report.after.gzip_estimated
    assert 0 < report.before.gzip_bytes < report.before.size_bytes * 1.1


def _user_model(tmp_path: Path, proto: onnx.ModelProto) -> Path:
    """`proto` saved as a user would, its weights in model.onnx.data beside it; its path."""
    folder = tmp_path / "user"
    folder.mkdir()
    # 4 KiB and more: the bias vectors stay inline (as LayerNorm scales do in big models)
    onnx.save(proto, folder / "model.onnx", save_as_external_data=True, location="model.onnx.data", size_threshold=4096)
    return folder / "model.onnx"


def test_the_command_lines_job_reads_the_users_data_files_where_they_are(tmp_path):
    user = _user_model(tmp_path, models.mlp((64, 256, 256, 10)))
    shared, copied = tmp_path / "shared", tmp_path / "copied"
    shared.mkdir()
    copied.mkdir()
    job = job_model.from_file(user, shared, Limits(share_external_data=True))
    assert job.path == user and not list(shared.iterdir())  # nothing copied into the job's folder
    copy = job_model.from_file(user, copied, Limits())
    assert copy.path.parent == copied and copy.stats == job.stats  # the same figures either way
    (user.parent / "model.onnx.data").rename(user.parent / "elsewhere.data")
    (user.parent / "model.onnx.data").symlink_to(user.parent / "elsewhere.data")
    with pytest.raises(InvalidModelError, match="symbolic link"):  # every check still applies
        job_model.from_file(user, shared, Limits(share_external_data=True))


@pytest.mark.parametrize("ratios", [[1.5, 0.9], [1.5, 1.3]])  # int8 slower: MatMul only; slower again: float
@pytest.mark.parametrize("smoothed", [False, True])  # smoothing changes the float model: the user's file is not it
def test_the_speed_check_on_the_users_own_file_gives_what_the_copied_job_gives(tmp_path, monkeypatch, ratios, smoothed):
    user = _user_model(tmp_path, models.tiny_encoder(decoder_seq=8))
    plan = Plan.model_validate({"steps": [{"kind": "quantize", "mode": "dynamic"}], "evaluation": FAST})
    rng = np.random.default_rng(0)
    feeds = [{"input_ids": rng.integers(0, 512, (1, 8)).astype(np.int64)} for _ in range(4)] if smoothed else None
    results = []
    for name, limits in (("shared", Limits(share_external_data=True)), ("copied", Limits())):
        _scripted(monkeypatch, ratios)
        folder = tmp_path / name
        folder.mkdir()
        job = job_model.from_file(user, folder, limits)
        context = PassContext(workdir=folder, calibration=feeds)
        out, steps = to_file(job.path, plan, context, Tracker(None), folder / "c.onnx")
        assert ("activations, alpha" in steps[0].summary.get("smoothing", "")) == smoothed, steps[0].summary
        assert not list(folder.glob("quantize_float.onnx.data")) or name == "copied" or smoothed
        results.append((job_files.load(out), steps[0]))
    (shared, shared_step), (copied, copied_step) = results
    assert shared_step.summary["speed_check"] == copied_step.summary["speed_check"]
    assert [s.model_dump() for s in shared_step.skipped] == [s.model_dump() for s in copied_step.skipped]
    assert list(shared.graph.node) == list(copied.graph.node)
    assert sorted(shared.graph.initializer, key=str) == sorted(copied.graph.initializer, key=str)  # any order
