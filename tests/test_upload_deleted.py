"""A single .onnx upload is deleted once the job has its own copy of the model, and when the job ends or fails."""

from __future__ import annotations

import argparse
import json
import stat
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest

import onnx_ops
from service import job_process, job_upload

import models
from helpers import random_feeds, run
from service_harness import FAST, make_settings, running_service, submit_ok, wait_for_job

_PLAN = {"steps": [{"kind": "quantize", "mode": "dynamic"}], "evaluation": FAST}
_ARGS = argparse.Namespace(
    threads=1, max_model_mb=64, max_data_mb=64, memory_mb=4096, file_mb=4096, external_data_mb=2048
)


def _agrees_with_the_mlp(model: bytes) -> None:
    feeds = random_feeds(models.mlp())
    got, want = (run(m, feeds)[0].ravel() for m in (onnx.load_from_string(model), models.mlp()))
    assert float(got @ want / (np.linalg.norm(got) * np.linalg.norm(want))) > 0.99


def _with_nan(model: onnx.ModelProto) -> bytes:
    broken = onnx.ModelProto()
    broken.CopyFrom(model)
    weight = onnx.numpy_helper.to_array(broken.graph.initializer[0]).copy()
    weight.flat[0] = np.nan
    broken.graph.initializer[0].CopyFrom(onnx.numpy_helper.from_array(weight, broken.graph.initializer[0].name))
    return broken.SerializeToString()


def test_the_upload_is_gone_after_a_job_and_its_result_is_intact(tmp_path: Path) -> None:
    with running_service(make_settings(tmp_path / "data")) as client:
        good = submit_ok(client, models.mlp().SerializeToString(), json.dumps(_PLAN))
        bad = submit_ok(client, _with_nan(models.mlp()), json.dumps(_PLAN), model_name="nan.onnx")
        job, _ = wait_for_job(client, good, timeout=120)
        assert job["state"] == "succeeded", job
        refused, _ = wait_for_job(client, bad, timeout=120)
        assert refused["state"] == "failed" and refused["error"]["code"] == "invalid_model", refused
        assert "NaN" in refused["error"]["message"]  # refused before `validated`: deleted as the job failed
        for job_id in (good, bad):
            left = {p.name for p in (client.data_dir / "jobs" / job_id).iterdir()}
            assert "input.onnx" not in left and "model" not in left, left
        left = {p.name for p in (client.data_dir / "jobs" / good).iterdir()}
        assert {"output.onnx", "report.json", "report.html"} <= left, left
        response = client.get(f"/api/jobs/{good}/model")
        assert response.status_code == 200
        report = client.get(f"/api/jobs/{good}/report").json()
        assert client.get(f"/api/jobs/{good}/report.html").status_code == 200
    assert report["before"]["parameters"] == sum(int(np.prod(t.dims)) for t in models.mlp().graph.initializer)
    assert report["before"]["size_bytes"] == len(models.mlp().SerializeToString())
    _agrees_with_the_mlp(response.content)


def _job_folder(tmp_path: Path) -> Path:
    folder = tmp_path / "job"
    (folder / "tmp").mkdir(parents=True)
    (folder / "input.onnx").write_bytes(models.mlp().SerializeToString())
    (folder / "job.json").write_text(json.dumps({"plan": _PLAN}))
    return folder


def test_the_upload_goes_as_soon_as_the_job_has_its_copy(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = _job_folder(tmp_path)
    seen: list[tuple[bool, bool]] = []
    real = onnx_ops.compress

    def watched(*args: Any, validated: Any, **kwargs: Any) -> Any:
        def hook() -> None:
            before = (folder / "input.onnx").exists()
            validated()
            seen.append((before, (folder / "input.onnx").exists()))

        return real(*args, validated=hook, **kwargs)  # the real compression, its hook observed

    monkeypatch.setattr(onnx_ops, "compress", watched)
    assert job_process._run(folder, _ARGS) == job_process.EXIT_OK
    assert seen == [(True, False)]  # there when validated, gone right after: not only at the job's end
    _agrees_with_the_mlp((folder / "output.onnx").read_bytes())


def test_a_job_run_again_without_its_upload_is_told_so(tmp_path: Path) -> None:
    folder = _job_folder(tmp_path)
    assert job_process._run(folder, _ARGS) == job_process.EXIT_OK
    assert not (folder / "input.onnx").exists()
    assert job_process._run(folder, _ARGS) == job_process.EXIT_KNOWN_ERROR
    error = json.loads((folder / "error.json").read_bytes())
    assert error["code"] == "invalid_model" and "no longer here" in error["message"], error
    assert not (folder / "output.onnx").exists()  # the earlier run's result is not passed off as this one's


def test_only_the_upload_goes_and_a_link_in_its_place_is_not_followed(tmp_path: Path) -> None:
    elsewhere = tmp_path / "other-job" / "input.onnx"
    elsewhere.parent.mkdir()
    elsewhere.write_bytes(b"another job's model")
    job = tmp_path / "job"
    job.mkdir()
    (job / "input.onnx").symlink_to(elsewhere)
    (job / "report.json").write_bytes(b"{}")
    job_upload.drop_upload(job)
    assert sorted(p.name for p in job.iterdir()) == ["report.json"]  # the link went, not what it named
    assert elsewhere.read_bytes() == b"another job's model"
    (job / "input.onnx").mkdir()  # not a file the server wrote: left alone, and no error
    (job / "input.onnx" / "kept").write_bytes(b"x")
    job_upload.drop_upload(job)
    assert (job / "input.onnx" / "kept").exists()


def test_the_upload_is_private_while_its_job_waits(tmp_path: Path) -> None:
    # tests/hostile/test_records.py checks a finished job's files, which no longer include the upload.
    with running_service(make_settings(tmp_path / "data"), embedded_worker=False) as client:
        job_id = submit_ok(client, models.mlp().SerializeToString(), json.dumps(_PLAN))
        upload = client.data_dir / "jobs" / job_id / "input.onnx"
        assert upload.read_bytes() == models.mlp().SerializeToString()
        assert stat.S_IMODE(upload.lstat().st_mode) == 0o600
