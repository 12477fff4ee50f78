"""Data files are checked against the model's inputs, and shapes are resolved or refused clearly."""

from __future__ import annotations

import zipfile

import numpy as np
import pytest

from onnx_ops.data import input_specs, load_dataset, resolve_shapes, synthesize
from onnx_ops.errors import DataError, PlanError

import models

MB = 1 << 20


@pytest.fixture
def specs():
    return input_specs(models.mlp())


def _npz(tmp_path, **arrays):
    path = tmp_path / "data.npz"
    np.savez(path, **arrays)
    return path


def test_batch_dimension_defaults_to_one(specs):
    assert resolve_shapes(specs, {}) == {"x": [1, 64]}


def test_symbolic_non_batch_dimension_needs_a_shape():
    specs = input_specs(models.lstm())
    with pytest.raises(PlanError, match="symbolic dimension 'T' at axis 0|symbolic dimension 'N' at axis 1"):
        resolve_shapes(specs, {})
    assert resolve_shapes(specs, {"x": [5, 1, 16]}) == {"x": [5, 1, 16]}


def test_given_shape_must_fit_fixed_dimensions(specs):
    with pytest.raises(PlanError, match="fixes it to 64"):
        resolve_shapes(specs, {"x": [1, 63]})
    with pytest.raises(PlanError, match="model's inputs are"):
        resolve_shapes(specs, {"y": [1, 64]})


def test_rows_become_batch_of_one(tmp_path, specs):
    data = load_dataset(_npz(tmp_path, x=np.ones((10, 64))), specs, {"x": [1, 64]}, role="calibration", max_bytes=MB)
    assert len(data.feeds) == 10 and data.feeds[0]["x"].shape == (1, 64) and data.feeds[0]["x"].dtype == np.float32


def test_whole_batches_per_sample(tmp_path, specs):
    x = np.ones((3, 8, 64), np.float32)
    labels = np.zeros((3, 8), np.int64)
    data = load_dataset(_npz(tmp_path, x=x, labels=labels), specs, {"x": [1, 64]}, role="evaluation", max_bytes=MB)
    assert len(data.feeds) == 3 and data.feeds[0]["x"].shape == (8, 64) and data.labels.shape == (3, 8)


@pytest.mark.parametrize(
    ("arrays", "message"),
    [
        ({"wrong": np.ones((2, 64), np.float32)}, r"missing \['x'\].*unexpected \['wrong'\].*x: float32"),
        ({"x": np.ones((2, 63), np.float32)}, "axis 1 of each sample is 63, the model expects 64"),
        ({"x": np.ones((2,), np.float32)}, "expected"),
        ({"x": np.ones((2, 64), np.int64)}, "dtype int64, the model expects float32"),
        ({"x": np.full((2, 64), np.nan, np.float32)}, "NaN"),
        ({"x": np.ones((0, 64), np.float32)}, "zero samples"),
    ],
)
def test_bad_data_is_refused(tmp_path, specs, arrays, message):
    with pytest.raises(DataError, match=message):
        load_dataset(_npz(tmp_path, **arrays), specs, {"x": [1, 64]}, role="calibration", max_bytes=MB)


def test_bad_labels_are_refused(tmp_path, specs):
    path = _npz(tmp_path, x=np.ones((4, 64), np.float32), labels=np.ones(3))
    with pytest.raises(DataError, match="labels must be integer classes"):
        load_dataset(path, specs, {"x": [1, 64]}, role="evaluation", max_bytes=MB)


def test_pickled_objects_are_refused(tmp_path, specs):
    path = tmp_path / "data.npz"
    np.savez(path, x=np.array([{"a": 1}, None], dtype=object))
    with pytest.raises(DataError, match="pickles are refused"):
        load_dataset(path, specs, {"x": [1, 64]}, role="calibration", max_bytes=MB)


def test_zip_bomb_is_refused_before_decompression(tmp_path, specs):
    path = tmp_path / "bomb.npz"
    big = np.zeros((20_000, 64), np.float32)  # 5 MB of zeros, a few KB compressed
    np.savez_compressed(path, x=big)
    assert path.stat().st_size < 100_000
    with pytest.raises(DataError, match="more than 1048576 bytes"):
        load_dataset(path, specs, {"x": [1, 64]}, role="calibration", max_bytes=MB)


@pytest.mark.parametrize("content", [b"", b"not a zip at all", b"PK\x03\x04broken"])
def test_non_npz_files_are_refused(tmp_path, specs, content):
    path = tmp_path / "data.npz"
    path.write_bytes(content)
    with pytest.raises(DataError, match="not a valid .npz"):
        load_dataset(path, specs, {"x": [1, 64]}, role="calibration", max_bytes=MB)


def test_non_npy_member_is_refused(tmp_path, specs):
    path = tmp_path / "data.npz"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("x.txt", "hello")
    with pytest.raises(DataError, match="not a .npy array"):
        load_dataset(path, specs, {"x": [1, 64]}, role="calibration", max_bytes=MB)


def test_mapping_source_is_accepted(specs):
    data = load_dataset({"x": np.ones((2, 64), np.float32)}, specs, {"x": [1, 64]}, role="evaluation", max_bytes=MB)
    assert len(data.feeds) == 2 and data.labels is None


def test_synthesized_inputs_are_seeded_and_capped(specs):
    a = synthesize(specs, {"x": [1, 64]}, 2, seed=3, max_elements=1000)
    b = synthesize(specs, {"x": [1, 64]}, 2, seed=3, max_elements=1000)
    assert np.array_equal(a[1]["x"], b[1]["x"])
    with pytest.raises(PlanError, match="more than the limit"):
        synthesize(specs, {"x": [1, 64]}, 1, seed=0, max_elements=10)
