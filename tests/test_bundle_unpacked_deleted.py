"""A bundle job deletes its unpacked files once it has its own copy of the model, and on failure: never before."""

from __future__ import annotations

import json
import shutil

import numpy as np
import onnxruntime as ort
import pytest

from onnx_ops import compress
from onnx_ops.errors import InvalidModelError
from onnx_ops.validate import Limits
from service import job_upload
from service.bundles import drop_unpacked

import models
from bundle_archives import external_mlp, zip_bundle
from service_harness import FAST, make_settings, running_service, submit_ok, wait_for_job

_PLAN = {"steps": [{"kind": "quantize", "mode": "dynamic"}], "evaluation": FAST}


def _agrees_with_the_mlp(model: bytes) -> None:
    x = np.random.default_rng(0).standard_normal((4, 64)).astype(np.float32)
    runs = [
        ort.InferenceSession(m, providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
        for m in (models.mlp().SerializeToString(), model)
    ]
    assert float(np.corrcoef(runs[0].ravel(), runs[1].ravel())[0, 1]) > 0.99


def test_the_unpacked_files_are_gone_once_a_job_validates_and_its_result_is_intact(tmp_path):
    files = external_mlp()
    nan = bytearray(files["net.onnx.data"])
    nan[:4] = np.array([np.nan], np.float32).tobytes()  # the first weight's first value
    with running_service(make_settings(tmp_path / "data")) as client:
        good = submit_ok(client, zip_bundle(files), json.dumps(_PLAN), model_name="net.zip")
        bad = submit_ok(
            client, zip_bundle({**files, "net.onnx.data": bytes(nan)}), json.dumps(_PLAN), model_name="nan.zip"
        )
        job, _ = wait_for_job(client, good, timeout=120)
        assert job["state"] == "succeeded", job
        refused, _ = wait_for_job(client, bad, timeout=120)
        assert refused["state"] == "failed" and refused["error"]["code"] == "invalid_model", refused
        assert "NaN" in refused["error"]["message"]  # refused once copied, before `validated`: deleted on failure
        for job_id in (good, bad):
            left = {p.name for p in (client.data_dir / "jobs" / job_id).iterdir()}
            assert "model" not in left and "input.onnx" not in left, left  # neither the archive nor its files
        assert "output.onnx" in {p.name for p in (client.data_dir / "jobs" / good).iterdir()}
        response = client.get(f"/api/jobs/{good}/model")
        assert response.status_code == 200
        report = client.get(f"/api/jobs/{good}/report").json()
    assert report["before"]["parameters"] == sum(int(np.prod(t.dims)) for t in models.mlp().graph.initializer)
    _agrees_with_the_mlp(response.content)


def test_the_model_given_is_not_read_once_compress_says_it_is_validated(tmp_path):
    folder = tmp_path / "given"
    folder.mkdir()
    for name, data in external_mlp().items():
        (folder / name).write_bytes(data)
    events: list[str] = []

    def validated() -> None:
        events.append("validated")
        shutil.rmtree(folder)  # as the service does with a bundle's files

    result = compress(
        folder / "net.onnx",
        _PLAN,
        limits=Limits(),
        progress=lambda stage, _: events.append(stage),
        validated=validated,
    )
    assert events.count("validated") == 1
    at = events.index("validated")
    assert at > 0 and all(stage.startswith("validat") for stage in events[:at])  # after validation, before the rest
    assert len(events) > at + 1
    _agrees_with_the_mlp(result.model.SerializeToString())


def test_a_job_run_again_after_its_files_went_is_told_so(tmp_path):
    (tmp_path / "input.onnx").write_bytes(zip_bundle(external_mlp()))
    job_upload.model_of(tmp_path, Limits())
    drop_unpacked(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == []
    with pytest.raises(InvalidModelError, match="no longer here"):
        job_upload.model_of(tmp_path, Limits())


def test_only_the_unpacked_folder_goes_and_a_link_in_its_place_is_not_followed(tmp_path):
    elsewhere = tmp_path / "other-job"
    elsewhere.mkdir()
    (elsewhere / "kept.onnx").write_bytes(b"another job's file")
    job = tmp_path / "job"
    job.mkdir()
    (job / "model").symlink_to(elsewhere, target_is_directory=True)
    (job / "report.json").write_bytes(b"{}")
    drop_unpacked(job)
    assert (elsewhere / "kept.onnx").read_bytes() == b"another job's file"
    (job / "model").unlink()
    (job / "model" / "sub").mkdir(parents=True)
    (job / "model" / "sub" / "link").symlink_to(elsewhere, target_is_directory=True)
    drop_unpacked(job)
    assert sorted(p.name for p in job.iterdir()) == ["report.json"]
    assert (elsewhere / "kept.onnx").exists()
