"""Models past 2 GiB: deciding without serializing, saving with external data past a threshold, and the path a
model past the one-file limit takes (ONNX Runtime, the checker and the report's sizes through files).

The one-file limit is lowered to a few KiB (onnx_ops.large.ONE_FILE_LIMIT) so a small model takes that path;
bench/big_models.py runs the real thing on a 2.5 GB model.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import numpy_helper
from onnx.external_data_helper import uses_external_data

import onnx_ops.large as large
from onnx_ops import compress
from onnx_ops.errors import InvalidModelError
from onnx_ops.large import check_model, file_sizes, fits_in_one_file, payload_bytes, save_model, session_input
from onnx_ops.validate import Limits, iter_tensors, load_model

import models

FAST = {"latency_runs": 3, "warmup_runs": 1}
INT8 = {"steps": [{"kind": "quantize", "mode": "dynamic"}], "evaluation": FAST}


@pytest.fixture
def tiny_one_file_limit(monkeypatch: pytest.MonkeyPatch) -> int:
    """models.mlp() (about 100 KB) counts as a model past the most one file can hold."""
    monkeypatch.setattr(large, "ONE_FILE_LIMIT", 16 << 10)
    return 16 << 10


def _feed() -> dict[str, np.ndarray]:
    return {"x": np.random.default_rng(1).standard_normal((8, 64)).astype(np.float32)}


def _run(source: str | bytes) -> np.ndarray:
    session = ort.InferenceSession(source, providers=["CPUExecutionProvider"])
    return np.asarray(session.run(None, _feed())[0])


def _external(model: onnx.ModelProto, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, path, save_as_external_data=True, location=path.name + ".data", size_threshold=0)
    return path


def test_payload_is_counted_from_shapes_and_serialized_only_near_the_limit():
    model = models.mlp()
    assert payload_bytes(model) == sum(numpy_helper.to_array(t).nbytes for _, t in iter_tensors(model))
    size = model.ByteSize()
    assert fits_in_one_file(model)
    assert fits_in_one_file(model, limit=size)  # close to the limit: counted exactly
    assert not fits_in_one_file(model, limit=size - 1)
    assert not fits_in_one_file(model, limit=payload_bytes(model) - 1)  # clearly past: not serialized


def test_save_model_writes_external_data_past_its_threshold(tmp_path):
    model = models.mlp()
    size = model.ByteSize()
    assert save_model(model, tmp_path / "past.onnx", threshold=size - 1) is True
    assert save_model(model, tmp_path / "within.onnx", threshold=size) is False
    assert sorted(p.name for p in tmp_path.iterdir()) == ["past.onnx", "past.onnx.data", "within.onnx"]
    np.testing.assert_array_equal(_run(str(tmp_path / "past.onnx")), _run(model.SerializeToString()))


def test_a_model_past_the_limit_reaches_libraries_through_files(tiny_one_file_limit):
    model = models.mlp()
    with session_input(model) as source:
        assert isinstance(source, str)
        folder = Path(source).parent
        assert sorted(p.name for p in folder.iterdir()) == ["model.onnx", "model.onnx.data"]
        np.testing.assert_array_equal(_run(source), _run(model.SerializeToString()))
        files = sum(p.stat().st_size for p in folder.iterdir())
    assert not folder.exists()  # removed once used
    size, packed = file_sizes(model)
    assert size == files > payload_bytes(model)  # the data file's 64 KiB-aligned offsets count too
    assert 0 < packed < size
    broken = models.mlp()
    broken.graph.node[0].input[1] = "missing"
    with pytest.raises(onnx.checker.ValidationError, match="missing"):
        check_model(broken)  # checked through its file, as a model past 2 GiB must be


def test_a_model_past_the_limit_is_compressed_and_saved_with_external_data(tmp_path, tiny_one_file_limit):
    source = _external(models.mlp(gemm=True), tmp_path / "in" / "m.onnx")  # Gemm: ONNX Runtime's quantizer
    result = compress(source, INT8)
    assert result.report.steps[0].summary["quantized_weights"] == 3
    assert result.report.steps[0].summary["preprocess"].startswith("skipped: the model is past 2 GiB")
    assert result.report.before.size_bytes > payload_bytes(load_model(source))  # as written: both files
    out = tmp_path / "out" / "m.int8.onnx"
    out.parent.mkdir()
    assert result.save(out) is True  # past the limit: external data without being asked
    assert any(uses_external_data(t) for t in onnx.load(out, load_external_data=False).graph.initializer)
    before, after = _run(str(source)), _run(str(out))
    cosine = float(before.ravel() @ after.ravel() / (np.linalg.norm(before) * np.linalg.norm(after)))
    assert cosine > 0.99
    assert result.report.agreement.outputs[0].cosine > 0.99


def test_the_plan_asks_for_external_data_in_the_cli(tmp_path):
    source = tmp_path / "m.onnx"
    onnx.save(models.mlp(), source)
    out = tmp_path / "out.onnx"
    plan = json.dumps({**INT8, "external_data": True})
    command = [sys.executable, "-m", "onnx_ops.cli", "compress", str(source), str(out), "--plan", plan, "-q"]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "out.onnx.data").is_file()
    np.testing.assert_allclose(_run(str(out)), _run(str(source)), atol=0.5)


def test_a_single_file_past_2_gib_is_refused_asking_for_external_data(tmp_path):
    path = tmp_path / "huge.onnx"
    with path.open("wb") as f:
        f.truncate((2 << 30) + 1)  # sparse: no disk used, refused by its size before it is read
    with pytest.raises(InvalidModelError, match="more than the limit of 2147483647 bytes.*external data"):
        load_model(path)
    small = tmp_path / "small.onnx"
    onnx.save(models.mlp(), small)
    with pytest.raises(InvalidModelError, match="more than the limit of 1000 bytes$"):  # no hint below 2 GiB
        load_model(small, Limits(max_model_bytes=1000))
