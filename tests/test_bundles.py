"""Bundles: a zip or tar of a model and its data files, unpacked only when every member is safe."""

from __future__ import annotations

import dataclasses
import io
import json
import os
import signal
import stat
import subprocess
import sys
import tarfile
import time
import zipfile
from collections.abc import Callable

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import numpy_helper

from onnx_ops.errors import InvalidModelError
from onnx_ops.validate import Limits, iter_tensors, load_model
from service import job_upload, worker
from service import settings as settings_module
from service.bundles import BundleCaps, bundle_kind, unpack
from service.settings import host_memory_mb

import models
from bundle_archives import external_mlp, tar_bundle, with_location, zip_bundle, zip_twice
from service_harness import FAST, HANG_S, make_settings, running_service, submit_ok, wait_for_job

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


# --- results with external data, and job limits from the model's size ---------------------------------------


def test_a_bundle_job_asking_for_external_data_returns_a_zip_that_ort_loads(tmp_path):
    plan = json.dumps({"steps": [{"kind": "quantize", "mode": "dynamic"}], "evaluation": FAST, "external_data": True})
    with running_service(make_settings(tmp_path / "data")) as client:
        job_id = submit_ok(client, zip_bundle(external_mlp()), plan, model_name="net.zip")
        job, _ = wait_for_job(client, job_id, timeout=120)
        assert job["state"] == "succeeded", job
        download = job["model_download"]
        assert download["bundle"] is True and download["files"] == ["model.onnx", "model.onnx.data"]
        assert download["media_type"] == "application/zip" and download["filename"] == "net.compressed.zip"
        response = client.get(f"/api/jobs/{job_id}/model")
        assert response.status_code == 200
        assert response.headers["content-type"] == "application/zip"
        assert 'filename="net.compressed.zip"' in response.headers["content-disposition"]
        assert int(response.headers["content-length"]) == download["bytes"] == len(response.content)
        page = client.get(f"/jobs/{job_id}").text
        assert "external data" in page and "<code>model.onnx.data</code>" in page
    with zipfile.ZipFile(io.BytesIO(response.content)) as archive:
        assert archive.namelist() == ["model.onnx", "model.onnx.data"]
        archive.extractall(tmp_path / "result")
    session = ort.InferenceSession(str(tmp_path / "result" / "model.onnx"), providers=["CPUExecutionProvider"])
    x = np.random.default_rng(0).standard_normal((4, 64)).astype(np.float32)
    (want,) = ort.InferenceSession(models.mlp().SerializeToString(), providers=["CPUExecutionProvider"]).run(
        None, {"x": x}
    )
    (got,) = session.run(None, {"x": x})
    assert float(np.corrcoef(want.ravel(), got.ravel())[0, 1]) > 0.99
    # what the service returns, it takes back: the result zip is a bundle upload
    result = tmp_path / "again.onnx"
    result.write_bytes(response.content)
    assert load_model(unpack(result, tmp_path / "again", CAPS)).graph.node


def test_a_result_is_a_zip_past_the_threshold_and_a_single_onnx_file_within(tmp_path):
    big = models.mlp((512, 1024, 1024, 10)).SerializeToString()  # about 6 MB: pruned, still past 1 MB
    plan = json.dumps({"steps": [{"kind": "prune", "sparsity": 0.5}], "evaluation": FAST})
    with running_service(make_settings(tmp_path / "data", result_external_data_mb=1)) as client:
        past = submit_ok(client, big, plan)
        within = submit_ok(client, zip_bundle(external_mlp()), plan, model_name="net.zip")  # about 100 KB
        for job_id, bundle in ((past, True), (within, False)):
            job, _ = wait_for_job(client, job_id, timeout=120)
            assert job["state"] == "succeeded", job
            assert job["model_download"]["bundle"] is bundle
        response = client.get(f"/api/jobs/{within}/model")
        assert response.headers["content-type"] == "application/octet-stream"
        assert 'filename="net.compressed.onnx"' in response.headers["content-disposition"]
        onnx.load_from_string(response.content)
        response = client.get(f"/api/jobs/{past}/model")
        assert response.headers["content-type"] == "application/zip"
        with zipfile.ZipFile(io.BytesIO(response.content)) as archive:
            assert archive.getinfo("model.onnx.data").file_size > 1 << 20


def test_the_job_unpacks_a_bundle_by_the_model_cap_not_the_one_file_cap(tmp_path):
    files = external_mlp()
    (tmp_path / "input.onnx").write_bytes(zip_bundle(files))
    data = len(files["net.onnx.data"])
    limits = Limits(max_model_bytes=len(files["net.onnx"]), max_external_bytes=data + len(files["net.onnx"]))
    model, limits = job_upload.model_of(tmp_path, limits)
    assert model == tmp_path / "model" / "net.onnx" and limits.allow_external_data
    assert load_model(model, limits).graph.node
    (tmp_path / "input.onnx").write_bytes(zip_bundle(files))
    with pytest.raises(InvalidModelError, match="more than the limit"):
        job_upload.model_of(tmp_path, dataclasses.replace(limits, max_external_bytes=data - 1))


def test_job_memory_follows_the_model_size_within_the_floor_and_the_host(tmp_path, monkeypatch):
    host = 20000
    monkeypatch.setattr(settings_module, "host_memory_mb", lambda: host)
    settings = make_settings(tmp_path / "data")
    assert settings.job_limits(0) == (8192, 4096)  # a small model: the floor, and the default file size limit
    assert settings.job_limits(2 << 30) == (min(16384, max(8192, host)), 4096)  # 8 x 2 GiB
    assert settings.job_limits(3 << 30)[1] == 6144  # files: twice the upload
    assert settings.job_limits(1 << 40)[0] == host  # never more than the host has available
    monkeypatch.setattr(settings_module, "host_memory_mb", lambda: 3000)
    assert settings.job_limits(1 << 40)[0] == 8192  # the floor all the same
    fixed = make_settings(tmp_path / "data", job_memory_mb=3000, job_file_mb=100)
    assert fixed.job_limits(1 << 40) == (3000, 100)


def test_the_host_memory_is_what_it_has_available():
    total = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") >> 20
    assert 0 < host_memory_mb() <= total


def test_the_worker_gives_a_job_the_limits_of_its_upload(tmp_path, monkeypatch):
    monkeypatch.setattr(settings_module, "host_memory_mb", lambda: 20000)
    folder = tmp_path / "job"
    folder.mkdir()
    with (folder / "input.onnx").open("wb") as f:
        f.truncate(3 << 30)  # sparse: a 3 GiB upload without using the disk
    settings = make_settings(tmp_path / "data", job_memory_floor_mb=1024, job_memory_factor=2.0)
    command = worker._command(settings, folder, worker._job_limits(settings, folder))
    memory = int(command[command.index("--memory-mb") + 1])
    assert memory == 6144
    assert command[command.index("--file-mb") + 1] == "6144"
    assert worker._command(settings, None)[command.index("--memory-mb") + 1] == "1024"  # a warm process: the floor


def test_a_job_process_dying_by_a_signal_at_its_memory_limit_is_out_of_memory(tmp_path):
    # Native code (protobuf, ONNX Runtime) that hits RLIMIT_AS may crash (SIGSEGV, SIGABRT) instead of raising.
    # The child holds its 300 MB until the signal ends it; the wait for its peak only bounds a hang.
    child = subprocess.Popen([sys.executable, "-c", "import time; x = bytearray(300 << 20); time.sleep(3600)"])
    try:
        deadline = time.monotonic() + HANG_S
        while worker._address_space_peak_mb(child.pid) < 300 and time.monotonic() < deadline:
            time.sleep(0.1)
        peak = worker._address_space_peak_mb(child.pid)
    finally:
        child.send_signal(signal.SIGSEGV)
        code = child.wait()
    assert peak >= 300
    error = worker._outcome(code, tmp_path, peak, peak)
    assert error is not None and error.code == "out_of_memory"
    assert f"more than its {peak} MB" in error.message and "SIGSEGV" in error.message
    error = worker._outcome(code, tmp_path, 4 * peak, peak)  # far below its limit: a crash
    assert error is not None and error.code == "crashed" and "SIGSEGV" in error.message
    error = worker._outcome(-signal.SIGKILL, tmp_path, peak, peak)  # the kernel's OOM killer or an operator
    assert error is not None and error.code == "crashed"
