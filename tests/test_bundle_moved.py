"""A bundle's weights are on disk once while its job unpacks and validates them, not twice.

A tar's bytes are freed as its files are unpacked (the archive is deleted afterwards); the unpacked data files are
then checked and moved (renamed) into the job's own folder rather than copied. Every check still applies.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest

import onnx_ops
from onnx_ops import job_model
from onnx_ops.errors import InvalidModelError
from onnx_ops.validate import Limits
from service import job_process
from service.bundles import BundleCaps, unpack
from service.hole_punch import open_for_punching, punch_hole

import models
from bundle_archives import tar_bundle
from service_harness import FAST

_SIZES = (256, 1024, 1024, 10)  # about 5 MB of weights
_CAPS = BundleCaps(max_total_bytes=1 << 30, max_file_bytes=1 << 30)


def _external(sizes: tuple[int, ...] = _SIZES) -> dict[str, bytes]:
    """models.mlp(sizes) as {file name: bytes}: net.onnx and its weights in net.onnx.data."""
    with tempfile.TemporaryDirectory() as tmp:
        onnx.save(
            models.mlp(sizes),
            Path(tmp, "net.onnx"),
            save_as_external_data=True,
            location="net.onnx.data",
            size_threshold=1024,
        )
        return {p.name: p.read_bytes() for p in Path(tmp).iterdir()}


def _allocated(folder: Path) -> int:
    """Bytes of disk the folder's files take (holes not counted)."""
    return sum(os.lstat(Path(root, name)).st_blocks * 512 for root, _, names in os.walk(folder) for name in names)


def _punching_works(folder: Path) -> bool:
    probe = folder / "probe"
    probe.write_bytes(os.urandom(1 << 20))
    fd = open_for_punching(probe)
    try:
        return fd is not None and punch_hole(fd, 0, 1 << 20) and _allocated(folder) < 1 << 19
    finally:
        if fd is not None:
            os.close(fd)
        probe.unlink()


def test_a_tars_bytes_are_freed_as_it_is_unpacked_and_its_files_are_whole(tmp_path: Path) -> None:
    if not _punching_works(tmp_path):
        pytest.skip("this file system cannot free a file's blocks (fallocate PUNCH_HOLE)")
    files = _external()
    archive = tmp_path / "bundle.tar"
    archive.write_bytes(tar_bundle(files))
    kept = tmp_path / "kept.tar"
    kept.write_bytes(archive.read_bytes())
    unpack(kept, tmp_path / "kept", _CAPS)  # not consumed: the archive stays as it was
    assert kept.read_bytes() == tar_bundle(files)
    model = unpack(archive, tmp_path / "unpacked", _CAPS, consume=True)
    assert {p.name: p.read_bytes() for p in model.parent.iterdir()} == files
    data = len(files["net.onnx.data"])
    assert archive.stat().st_size == len(tar_bundle(files))  # its size kept, its blocks freed
    assert archive.stat().st_blocks * 512 < data // 10, (archive.stat().st_blocks * 512, data)


_ARGS = argparse.Namespace(
    threads=1, max_model_mb=64, max_data_mb=64, memory_mb=4096, file_mb=4096, external_data_mb=2048
)


def test_a_bundle_jobs_weights_are_on_disk_once_when_it_has_validated_them(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    files = _external()
    folder = tmp_path / "job"
    (folder / "tmp").mkdir(parents=True)
    (folder / "input.onnx").write_bytes(tar_bundle(files))
    plan = {"steps": [{"kind": "quantize", "mode": "dynamic"}], "evaluation": FAST}
    (folder / "job.json").write_text(json.dumps({"plan": plan}))
    seen: list[int] = []
    real = onnx_ops.compress

    def watched(*args: Any, validated: Any, **kwargs: Any) -> Any:
        def hook() -> None:
            seen.append(_allocated(folder))  # the unpacked files and the job's own model, the archive gone
            validated()

        return real(*args, validated=hook, **kwargs)  # the real compression, its hook observed

    monkeypatch.setattr(onnx_ops, "compress", watched)
    monkeypatch.setenv("TMPDIR", str(folder / "tmp"))  # as the job's process sets it: its copy in the job folder
    monkeypatch.setattr("tempfile.tempdir", None)
    assert job_process._run(folder, _ARGS) == job_process.EXIT_OK, (folder / "error.json").read_text()
    data = len(files["net.onnx.data"])
    assert len(seen) == 1 and seen[0] < 1.2 * data, (seen, data)  # copied: twice the weights
    assert not (folder / "model").exists() and not (folder / "input.onnx").exists()
    x = np.random.default_rng(0).standard_normal((4, _SIZES[0])).astype(np.float32)
    got, want = (
        ort.InferenceSession(m, providers=["CPUExecutionProvider"]).run(None, {"x": x})[0].ravel()
        for m in ((folder / "output.onnx").read_bytes(), models.mlp(_SIZES).SerializeToString())
    )
    assert float(got @ want / (np.linalg.norm(got) * np.linalg.norm(want))) > 0.99


def _given(tmp_path: Path) -> Path:
    folder = tmp_path / "given"
    folder.mkdir()
    for name, data in _external((64, 256, 256, 10)).items():
        (folder / name).write_bytes(data)
    return folder / "net.onnx"


def test_moved_data_files_are_checked_as_copied_ones_and_named_by_the_job(tmp_path: Path) -> None:
    given = _given(tmp_path)
    copied, moved = tmp_path / "copied", tmp_path / "moved"
    copied.mkdir()
    moved.mkdir()
    copy = job_model.from_file(given, copied, Limits())
    inode = (given.parent / "net.onnx.data").stat().st_ino
    job = job_model.from_file(given, moved, Limits(move_external_data=True))
    assert job.stats == copy.stats and job.path.parent == moved
    assert sorted(p.name for p in given.parent.iterdir()) == ["net.onnx"]  # the data file went, not copied
    [data] = [p for p in moved.iterdir() if p.name != "original.onnx"]
    assert data.stat().st_ino == inode
    for tensor in job.graph.graph.initializer:
        if tensor.external_data:
            entries = {e.key: e.value for e in tensor.external_data}
            assert set(entries) == {"location", "offset", "length"} and entries["location"] == data.name
    ours = onnx.load(job.path)  # the job's own model file refers to the moved file
    assert len(ours.graph.initializer) == len(models.mlp((64, 256, 256, 10)).graph.initializer)


def test_a_link_among_the_data_files_is_refused_and_nothing_is_moved(tmp_path: Path) -> None:
    given = _given(tmp_path)
    elsewhere = tmp_path / "elsewhere.data"
    (given.parent / "net.onnx.data").rename(elsewhere)
    (given.parent / "net.onnx.data").symlink_to(elsewhere)
    work = tmp_path / "work"
    work.mkdir()
    with pytest.raises(InvalidModelError, match="symbolic link"):
        job_model.from_file(given, work, Limits(move_external_data=True))
    assert list(work.iterdir()) == [] and elsewhere.exists() and (given.parent / "net.onnx.data").is_symlink()
