"""A bundle job deletes its uploaded archive once unpacked: nothing reads it again, and it is as large as the model."""

from __future__ import annotations

import io
import zipfile

import numpy as np
import pytest
from onnx import numpy_helper

from onnx_ops.errors import InvalidModelError
from onnx_ops.validate import Limits, iter_tensors, load_model
from service import job_upload, worker
from service import settings as settings_module

import models
from bundle_archives import external_mlp, tar_bundle, zip_bundle
from service_harness import make_settings

_LIMITS = Limits(max_external_bytes=64 << 20)


def _loads_as_the_mlp(path, limits) -> None:
    got = {label: numpy_helper.to_array(t) for label, t in iter_tensors(load_model(path, limits))}
    for label, tensor in iter_tensors(models.mlp()):
        np.testing.assert_array_equal(got[label], numpy_helper.to_array(tensor))


@pytest.mark.parametrize("kind", ["zip", "tar"])
def test_the_archive_is_deleted_once_unpacked_and_a_run_again_takes_the_unpacked_files(tmp_path, kind):
    files = external_mlp()
    archive = zip_bundle(files) if kind == "zip" else tar_bundle({f"mlp/{k}": v for k, v in files.items()})
    (tmp_path / "input.onnx").write_bytes(archive)
    model, limits = job_upload.model_of(tmp_path, _LIMITS)
    assert not (tmp_path / "input.onnx").exists()  # the archive is gone
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]  # and no half-unpacked folder is left
    assert model.is_relative_to(tmp_path / "model") and limits.allow_external_data
    _loads_as_the_mlp(model, limits)

    again, limits_again = job_upload.model_of(tmp_path, _LIMITS)  # a job run again: no archive to unpack
    assert again == model and limits_again.allow_external_data
    _loads_as_the_mlp(again, limits_again)


def test_a_refused_bundle_leaves_nothing_unpacked(tmp_path):
    model, data = external_mlp()["net.onnx"], external_mlp()["net.onnx.data"]
    (tmp_path / "input.onnx").write_bytes(zip_bundle({"net.onnx": model, "net.onnx.data": data, "b.onnx": model}))
    with pytest.raises(InvalidModelError, match="exactly one .onnx"):
        job_upload.model_of(tmp_path, _LIMITS)
    assert not (tmp_path / "model").exists() and not (tmp_path / "model.partial").exists()


def test_a_bundle_refused_half_way_leaves_no_unpacked_files(tmp_path):
    files = external_mlp()
    archive = bytearray(zip_bundle(files, method=zipfile.ZIP_STORED))
    with zipfile.ZipFile(io.BytesIO(bytes(archive))) as z:
        info = z.getinfo("net.onnx.data")
    archive[info.header_offset + 30 + len(info.filename) + info.file_size // 2] ^= 0xFF  # the data's CRC fails
    (tmp_path / "input.onnx").write_bytes(bytes(archive))
    with pytest.raises(InvalidModelError, match="not a readable zip"):  # found once the member is written
        job_upload.model_of(tmp_path, _LIMITS)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["input.onnx"]


def test_a_single_model_upload_stays_where_it_is(tmp_path):
    (tmp_path / "input.onnx").write_bytes(models.mlp().SerializeToString())
    model, limits = job_upload.model_of(tmp_path, _LIMITS)
    assert model == tmp_path / "input.onnx" and model.exists() and not limits.allow_external_data


def test_a_job_without_its_archive_is_sized_by_its_unpacked_files(tmp_path, monkeypatch):
    monkeypatch.setattr(settings_module, "host_memory_mb", lambda: 20000)
    folder = tmp_path / "job"
    (folder / "model" / "sub").mkdir(parents=True)
    with (folder / "model" / "sub" / "m.onnx.data").open("wb") as f:
        f.truncate(3 << 30)  # sparse: 3 GiB of unpacked files without using the disk
    settings = make_settings(tmp_path / "data", job_memory_floor_mb=1024, job_memory_factor=2.0)
    assert worker._job_limits(settings, folder) == (6144, 6144)  # as for the 3 GiB upload it came from
