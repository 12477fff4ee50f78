"""Bundles: a zip or tar of a model and its data files, unpacked only when every member is safe."""

from __future__ import annotations

import stat
import tarfile
import zipfile
from collections.abc import Callable

import numpy as np
import pytest
from onnx import numpy_helper

from onnx_ops.errors import InvalidModelError
from onnx_ops.validate import iter_tensors, load_model
from service.bundles import BundleCaps, bundle_kind, unpack

import models
from bundle_archives import external_mlp, tar_bundle, with_location, zip_bundle, zip_twice

CAPS = BundleCaps(max_total_bytes=64 << 20, max_file_bytes=32 << 20)


def _unpacked_tensors(tmp_path, archive: bytes):
    source = tmp_path / "input.onnx"
    source.write_bytes(archive)
    model = unpack(source, tmp_path / "model", CAPS)
    return {label: numpy_helper.to_array(t) for label, t in iter_tensors(load_model(model))}


@pytest.mark.parametrize("kind", ["zip", "tar"])
def test_a_bundle_unpacks_to_a_model_that_loads_with_its_data(tmp_path, kind):
    files = external_mlp()
    archive = zip_bundle(files) if kind == "zip" else tar_bundle({f"mlp/{k}": v for k, v in files.items()})
    (tmp_path / "probe").write_bytes(archive)
    assert bundle_kind(tmp_path / "probe") == kind
    got = _unpacked_tensors(tmp_path, archive)
    for label, tensor in iter_tensors(models.mlp()):
        np.testing.assert_array_equal(got[label], numpy_helper.to_array(tensor))


def test_a_single_model_file_is_not_a_bundle(tmp_path):
    (tmp_path / "m.onnx").write_bytes(models.mlp().SerializeToString())
    assert bundle_kind(tmp_path / "m.onnx") is None


def _model_and_data() -> tuple[bytes, bytes]:
    files = external_mlp()
    return files["net.onnx"], files["net.onnx.data"]


def _hostile() -> dict[str, tuple[Callable[[], bytes], str]]:
    model, data = _model_and_data()
    link = stat.S_IFLNK | 0o777
    return {
        "parent": (
            lambda: zip_bundle({"net.onnx": model, "../net.onnx.data": data}),
            r"'\.\./net\.onnx\.data'.*no '\.\.'",
        ),
        "absolute": (lambda: zip_bundle({"/tmp/net.onnx": model}), "not a relative name"),
        "backslash": (lambda: zip_bundle({"a\\..\\net.onnx": model}), "not a relative name"),
        "duplicate": (lambda: zip_twice("net.onnx", model), "appears twice"),
        "zip symlink": (
            lambda: zip_bundle({"net.onnx": model, "net.onnx.data": b"/etc/passwd"}, modes={"net.onnx.data": link}),
            "'net.onnx.data' is a link",
        ),
        "encrypted": (lambda: zip_bundle({"net.onnx": model}, flags=0x1), "is encrypted"),
        "bzip2": (lambda: zip_bundle({"net.onnx": model}, method=zipfile.ZIP_BZIP2), "compression other than"),
        "zip bomb": (lambda: zip_bundle({"net.onnx": model, "zeros.bin": bytes(16 << 20)}), "more than 100 times"),
        "file too big": (
            lambda: zip_bundle({"net.onnx": model, "big.bin": bytes(33 << 20)}, zipfile.ZIP_STORED),
            "per file",
        ),
        "total too big": (
            lambda: zip_bundle(
                {"net.onnx": model, **{f"{i}.bin": bytes(30 << 20) for i in range(3)}}, zipfile.ZIP_STORED
            ),
            "unpacks to more than the limit",
        ),
        "too many members": (
            lambda: zip_bundle({"net.onnx": model, **{f"{i}.bin": b"" for i in range(2100)}}),
            "members",
        ),
        "no model": (lambda: zip_bundle({"net.onnx.data": data}), "exactly one .onnx file; it holds 0"),
        "two models": (lambda: zip_bundle({"a.onnx": model, "b.onnx": model}), "exactly one .onnx file; it holds 2"),
        "file and folder": (
            lambda: zip_bundle({"net.onnx": model, "x": b"", "x/y": b""}),
            "'x' is both a file and a folder",
        ),
        "tar symlink": (
            lambda: tar_bundle({"net.onnx": model}, {"net.onnx.data": (tarfile.SYMTYPE, "/etc/passwd")}),
            "'net.onnx.data' is a link",
        ),
        "tar hard link": (
            lambda: tar_bundle({"net.onnx": model}, {"net.onnx.data": (tarfile.LNKTYPE, "net.onnx")}),
            "'net.onnx.data' is a link",
        ),
        "tar fifo": (
            lambda: tar_bundle({"net.onnx": model}, {"pipe": (tarfile.FIFOTYPE, "")}),
            "'pipe' is a link or a special",
        ),
        "tar parent": (lambda: tar_bundle({"net.onnx": model, "../../x": data}), "no '..'"),
    }


@pytest.mark.parametrize("name", list(_hostile()))
def test_a_hostile_bundle_is_refused_before_anything_is_written(tmp_path, name):
    build, message = _hostile()[name]
    source = tmp_path / "input.onnx"
    source.write_bytes(build())
    with pytest.raises(InvalidModelError, match=message):
        unpack(source, tmp_path / "model", CAPS)
    assert not (tmp_path / "model").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["input.onnx"]


def test_a_reference_out_of_the_bundle_is_refused_by_the_model_checks(tmp_path):
    model, data = _model_and_data()
    archive = zip_bundle({"net.onnx": with_location(model, "../job.json"), "net.onnx.data": data})
    (tmp_path / "job.json").write_bytes(data)  # the right size, in the job folder, outside the bundle
    with pytest.raises(InvalidModelError, match="external data location '../job.json'.*no '..'"):
        _unpacked_tensors(tmp_path, archive)
