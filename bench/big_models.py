"""Models past 2 GiB end to end: a transformer-shaped model with external data, compressed by the CLI and the service.

Builds the model with onnx.helper, writing each weight straight into its data file (64 KiB-aligned), so building
it holds one tensor at a time. Then (each part optional):

- ``cli``: ``onnx-compress compress model.onnx out.onnx`` (dynamic int8, the default plan) under
  ``/usr/bin/time -v``: peak RSS and wall time of the whole process;
- ``service``: ``onnx-compress serve`` with its default limits (a fresh data directory), the model sent as an
  uncompressed tar bundle, the job polled to its end, the result downloaded (a .zip when it has external data)
  and loaded by ONNX Runtime from its unpacked folder; the job process's peak RSS (VmHWM) read from /proc.

Everything is written under ``--dir`` (default: the system temp folder) and deleted afterwards; each part reports
the most disk its files took at once (``disk_peak_gb``, besides the model built). Check free space first: the CLI
run needs about 1.5x the model's size on disk in all (the 10 GB model: 5.1 GB besides it; the command line reads
the model's data files where they are), the service run about 1.25x besides it at its peak: the tar's blocks
are freed as the job unpacks it, its data files are moved (not copied) into the job's folder, and the passes and
the result then add to that one copy (the 1 GB model: 1.33 GB at most, 2.14 GB when the job copied them).
Before that the 2.5 GB model took 5.36 GB at most.

Run:  python -m bench.big_models --gb 2.5 [--parts cli service] [--dir /tmp]
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import math
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Self

import numpy as np
from onnx import TensorProto, helper

MIB = 1 << 20
_ALIGN = 1 << 16
# Shapes per size: (hidden, ffn, layers, vocab); about 12 * hidden^2 parameters a layer plus the embedding.
_SHAPES = {2.5: (2048, 8192, 12, 32000), 10.0: (4096, 16384, 12, 32000)}


def shape_for(gb: float) -> tuple[int, int, int, int]:
    """(hidden, ffn, layers, vocab) of a model of about `gb` GB: a known size, or layers scaled (hidden 2048, or
    512 below 1 GB)."""
    if gb in _SHAPES:
        return _SHAPES[gb]
    hidden, ffn, vocab = (2048, 8192, 32000) if gb >= 1 else (512, 2048, 8000)
    per_layer = 4 * (4 * hidden * hidden + 2 * hidden * ffn)
    return hidden, ffn, max(1, round((gb * 1e9 - 4 * vocab * hidden) / per_layer)), vocab


class _Writer:
    """Writes weights one by one into one data file and makes the TensorProtos that refer to them."""

    def __init__(self, data: Path, seed: int = 0) -> None:
        self.file = data.open("wb")
        self.location = data.name
        self.rng = np.random.default_rng(seed)

    def weight(self, name: str, shape: tuple[int, ...], scale: float = 0.02) -> TensorProto:
        offset = -(-self.file.tell() // _ALIGN) * _ALIGN
        self.file.seek(offset)
        rows = shape[0]
        step = max(1, (64 * MIB) // (4 * math.prod(shape[1:]) or 1))
        for start in range(0, rows, step):  # a chunk of rows at a time: never the whole tensor twice
            block = self.rng.standard_normal((min(step, rows - start), *shape[1:]), dtype=np.float32)
            block *= scale
            self.file.write(block.tobytes())
        tensor = TensorProto(name=name, data_type=TensorProto.FLOAT, dims=list(shape))
        tensor.data_location = TensorProto.EXTERNAL
        length = 4 * math.prod(shape)
        for key, value in (("location", self.location), ("offset", str(offset)), ("length", str(length))):
            entry = tensor.external_data.add()
            entry.key, entry.value = key, value
        return tensor

    def close(self) -> None:
        self.file.close()


def build(folder: Path, gb: float, seq: int = 16) -> Path:
    """A pre-LayerNorm encoder of about `gb` GB in `folder` (model.onnx and model.onnx.data); its path."""
    hidden, ffn, layers, vocab = shape_for(gb)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "model.onnx"
    writer = _Writer(folder / "model.onnx.data")
    inits = [writer.weight("embedding", (vocab, hidden))]
    nodes = [helper.make_node("Gather", ["embedding", "input_ids"], ["h0"], name="embed")]
    small = [  # inline: LayerNorm scales and biases, attention scaling
        helper.make_tensor("ln_scale", TensorProto.FLOAT, [hidden], np.ones(hidden, np.float32)),
        helper.make_tensor("ln_bias", TensorProto.FLOAT, [hidden], np.zeros(hidden, np.float32)),
        helper.make_tensor("attn_scale", TensorProto.FLOAT, [], [1.0 / math.sqrt(hidden)]),
    ]
    x = "h0"
    for i in range(layers):
        p = f"l{i}."
        inits += [writer.weight(p + w, (hidden, hidden)) for w in ("q", "k", "v", "o")]
        inits += [writer.weight(p + "up", (hidden, ffn)), writer.weight(p + "down", (ffn, hidden))]
        nodes += [
            helper.make_node("LayerNormalization", [x, "ln_scale", "ln_bias"], [p + "n1"], name=p + "ln1", axis=-1),
            *[helper.make_node("MatMul", [p + "n1", p + w], [p + w + "_out"], name=p + w) for w in ("q", "k", "v")],
            helper.make_node("Transpose", [p + "k_out"], [p + "kt"], name=p + "kt", perm=[0, 2, 1]),
            helper.make_node("MatMul", [p + "q_out", p + "kt"], [p + "scores"], name=p + "scores"),
            helper.make_node("Mul", [p + "scores", "attn_scale"], [p + "scaled"], name=p + "scale"),
            helper.make_node("Softmax", [p + "scaled"], [p + "probs"], name=p + "softmax", axis=-1),
            helper.make_node("MatMul", [p + "probs", p + "v_out"], [p + "ctx"], name=p + "ctx"),
            helper.make_node("MatMul", [p + "ctx", p + "o"], [p + "attn"], name=p + "o"),
            helper.make_node("Add", [x, p + "attn"], [p + "r1"], name=p + "res1"),
            helper.make_node("LayerNormalization", [p + "r1", "ln_scale", "ln_bias"], [p + "n2"], name=p + "ln2"),
            helper.make_node("MatMul", [p + "n2", p + "up"], [p + "u"], name=p + "up"),
            helper.make_node("Sigmoid", [p + "u"], [p + "sig"], name=p + "sig"),
            helper.make_node("Mul", [p + "u", p + "sig"], [p + "act"], name=p + "silu"),
            helper.make_node("MatMul", [p + "act", p + "down"], [p + "d"], name=p + "down"),
            helper.make_node("Add", [p + "r1", p + "d"], [p + "out"], name=p + "res2"),
        ]
        x = p + "out"
    writer.close()
    graph = helper.make_graph(
        nodes,
        "big_encoder",
        [helper.make_tensor_value_info("input_ids", TensorProto.INT64, [1, seq])],
        [helper.make_tensor_value_info(x, TensorProto.FLOAT, [1, seq, hidden])],
        inits + small,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    path.write_bytes(model.SerializeToString())  # small: every weight is a reference
    return path


def _files_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.parent.iterdir() if p.is_file())


def _peak_from_time(stderr: str) -> tuple[float, float]:
    """(peak RSS in GB, wall seconds) from `/usr/bin/time -v`'s report."""
    rss = re.search(r"Maximum resident set size \(kbytes\): (\d+)", stderr)
    wall = re.search(r"Elapsed \(wall clock\) time \(h:mm:ss or m:ss\): ([\d:.]+)", stderr)
    seconds = 0.0
    if wall:
        for part in wall.group(1).split(":"):
            seconds = seconds * 60 + float(part)
    return (int(rss.group(1)) * 1024 / 1e9 if rss else float("nan")), seconds


def run_cli(model: Path, work: Path) -> dict[str, Any]:
    """The CLI with the default plan under /usr/bin/time -v; figures of the run and of what it wrote.

    The job's temp folder is put under `work` (TMPDIR), so the disk the run takes is measured there.
    """
    out = work / "out" / "model.int8.onnx"
    out.parent.mkdir(parents=True, exist_ok=True)
    (work / "tmp").mkdir()
    report = work / "out" / "report.json"
    exe = [sys.executable, "-m", "onnx_ops.cli", "compress", str(model), str(out), "--report", str(report), "-q"]
    env = {**os.environ, "TMPDIR": str(work / "tmp")}
    with _PeakDisk(work) as disk:
        done = subprocess.run(["/usr/bin/time", "-v", *exe], capture_output=True, text=True, check=False, env=env)
    peak, wall = _peak_from_time(done.stderr)
    figures: dict[str, Any] = {
        "exit": done.returncode,
        "peak_rss_gb": round(peak, 2),
        "wall_s": round(wall, 1),
        "disk_peak_gb": round(disk.peak / 1e9, 2),  # the run's files besides the model given
    }
    if done.returncode != 0:
        figures["stderr_tail"] = done.stderr[-1500:]
        return figures
    data = json.loads(report.read_text())
    figures |= {
        "output_files": sorted(p.name for p in out.parent.iterdir() if p.name != "report.json"),
        "output_bytes": _files_bytes(out) - report.stat().st_size,
        "report_size_before": data["before"]["size_bytes"],
        "report_size_after": data["after"]["size_bytes"],
        "agreement": {o["name"]: round(o["cosine"], 5) for o in data["agreement"]["outputs"]},
        "gzip_before_after": [data["before"]["gzip_bytes"], data["after"]["gzip_bytes"]],
        "gzip_estimated": data["before"].get("gzip_estimated"),
        "steps_s": [round(step["seconds"], 1) for step in data["steps"]],
        "job_total_s": round(data["total_seconds"], 1),
        "speed_check": data["steps"][0]["summary"].get("speed_check"),
        "latency_ratio": data["latency"]["ratio"] if data.get("latency") else None,
    }
    figures["ort_loads_output"] = _ort_runs(out)
    return figures


def _ort_runs(path: Path) -> bool:
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    shape = [d if isinstance(d, int) else 1 for d in session.get_inputs()[0].shape]
    (out,) = session.run(None, {session.get_inputs()[0].name: np.zeros(shape, np.int64)})
    return bool(np.isfinite(out).all())


def _tar_chunks(folder: Path, chunk: int = 4 * MIB) -> Iterator[bytes]:
    """An uncompressed tar of the folder's files, streamed: each header, then the file in chunks, then padding."""
    for path in sorted(folder.iterdir()):
        info = tarfile.TarInfo(path.name)
        info.size = path.stat().st_size
        info.mode = 0o644
        yield info.tobuf(format=tarfile.PAX_FORMAT)
        with path.open("rb") as f:
            while data := f.read(chunk):
                yield data
        yield bytes(-info.size % tarfile.BLOCKSIZE)
    yield bytes(2 * tarfile.BLOCKSIZE)  # the end-of-archive marker


def _chunked(parts: Iterator[bytes], size: int = 4 * MIB) -> Iterator[bytes]:
    for part in parts:
        for start in range(0, len(part), size):
            yield part[start : start + size]


def run_service(model: Path, work: Path) -> dict[str, Any]:
    """The model as a tar bundle through `onnx-compress serve` with default limits; figures of the job."""
    from bench.service_bench import _request, post_job, server

    plan = json.dumps({"steps": [{"kind": "quantize", "mode": "dynamic"}]})
    data_dir = work / "serve"
    env = {"COMPRESS_UPLOAD_TIMEOUT_S": "3600", "COMPRESS_MIN_FREE_DISK_MB": "1024"}  # else the defaults
    with server(data_dir, env=env) as (port, pid), _PeakJobRss(pid) as rss, _PeakDisk(work) as disk:
        start = time.perf_counter()
        status, job = post_job(port, {"plan": plan}, {"model": _chunked(_tar_chunks(model.parent))})
        if status != 202:
            return {"status": status, "answer": job}
        uploaded = time.perf_counter() - start
        while job["state"] not in ("succeeded", "failed"):  # once a second: the job has the cores
            time.sleep(1.0)
            job = json.loads(_request(port, "GET", f"/api/jobs/{job['id']}")[1])
        seconds = time.perf_counter() - start
        figures: dict[str, Any] = {
            "state": job["state"],
            "error": job.get("error"),
            "upload_s": round(uploaded, 1),
            "job_s": round(seconds - uploaded, 1),
            "job_peak_rss_gb": round(rss.peak / 1e9, 2),
            "api_peak_rss_gb": round(rss.own_peak / 1e9, 2),
            "memory_limit_mb": _job_memory_limit(data_dir, job["id"]),
        }
        if job["state"] != "succeeded":
            return figures
        figures["download"] = job.get("model_download")
        result = work / "result"
        result.mkdir()
        archive = result / "download"
        figures["download_status"], figures["download_type"] = _download(port, job["id"], archive)
        if zipfile.is_zipfile(archive):
            with zipfile.ZipFile(archive) as z:
                z.extractall(result / "unpacked")
            figures["ort_loads_output"] = _ort_runs(result / "unpacked" / "model.onnx")
        else:
            figures["ort_loads_output"] = _ort_runs(archive)
        report = json.loads(_request(port, "GET", f"/api/jobs/{job['id']}/report")[1])
        figures["report_size_before"] = report["before"]["size_bytes"]
        figures["report_size_after"] = report["after"]["size_bytes"]
        figures["agreement"] = {o["name"]: round(o["cosine"], 5) for o in report["agreement"]["outputs"]}
        figures["api_peak_rss_gb"] = round(rss.own_peak / 1e9, 2)
    figures["disk_peak_gb"] = round(disk.peak / 1e9, 2)  # upload, job folder, result, download
    return figures


class _Poller:
    """Calls `poll` every `period` seconds in a thread while the `with` block runs."""

    period = 0.5

    def __init__(self) -> None:
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def poll(self) -> None:
        raise NotImplementedError

    def _run(self) -> None:
        while not self._stop.wait(self.period):
            self.poll()

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


class _PeakDisk(_Poller):
    """The largest disk use (allocated blocks) of the files under a folder, summed every 0.5 s."""

    def __init__(self, folder: Path) -> None:
        super().__init__()
        self.folder = folder
        self.peak = 0

    def poll(self) -> None:
        self.peak = max(self.peak, _allocated(self.folder))


def _allocated(folder: Path) -> int:
    total = 0
    with contextlib.suppress(OSError):
        for entry in os.scandir(folder):
            with contextlib.suppress(OSError):
                if entry.is_dir(follow_symlinks=False):
                    total += _allocated(Path(entry.path))
                else:
                    total += entry.stat(follow_symlinks=False).st_blocks * 512
    return total


class _PeakJobRss(_Poller):
    """The largest VmHWM (the kernel's peak RSS) of any descendant of a process (`peak`) and of the process itself
    (`own_peak`), read from /proc every 0.2 s."""

    period = 0.2

    def __init__(self, pid: int) -> None:
        super().__init__()
        self.pid = pid
        self.peak = 0
        self.own_peak = 0

    def poll(self) -> None:
        self.own_peak = max(self.own_peak, _hwm(self.pid))
        parents: dict[int, int] = {}
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit():
                with contextlib.suppress(OSError, ValueError, IndexError):
                    parents[int(entry.name)] = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
        for pid in parents:
            ancestor = parents.get(pid)
            while ancestor is not None and ancestor != self.pid:
                ancestor = parents.get(ancestor)
            if ancestor == self.pid:
                self.peak = max(self.peak, _hwm(pid))


def _hwm(pid: int) -> int:
    """A process's peak RSS in bytes (0 when it is gone)."""
    with contextlib.suppress(OSError):
        found = re.search(r"VmHWM:\s+(\d+) kB", Path(f"/proc/{pid}/status").read_text())
        if found:
            return int(found.group(1)) * 1024
    return 0


def _job_memory_limit(data_dir: Path, job_id: str) -> int | None:
    """The address-space limit the job's process was given, from the line it writes to its log."""
    with contextlib.suppress(OSError):
        log = (data_dir / "jobs" / job_id / "job.log").read_text(errors="replace")
        found = re.findall(r"memory limit (\d+) MB", log)
        if found:
            return int(found[-1])
    return None


def _download(port: int, job_id: str, target: Path) -> tuple[int, str]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    try:
        conn.request("GET", f"/api/jobs/{job_id}/model")
        response = conn.getresponse()
        with target.open("wb") as f:
            while chunk := response.read(4 * MIB):
                f.write(chunk)
        return response.status, response.getheader("Content-Type") or ""
    finally:
        conn.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gb", type=float, default=2.5, help="model size in GB (2.5 and 10 have fixed shapes)")
    parser.add_argument("--parts", nargs="*", default=["cli", "service"], choices=["cli", "service"])
    parser.add_argument("--dir", type=Path, default=Path(tempfile.gettempdir()))
    parser.add_argument("--keep", action="store_true", help="keep the files (default: delete them)")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="big-models-", dir=args.dir))
    try:
        start = time.perf_counter()
        model = build(work / "model", args.gb)
        hidden, ffn, layers, vocab = shape_for(args.gb)
        result: dict[str, Any] = {
            "model": {"hidden": hidden, "ffn": ffn, "layers": layers, "vocab": vocab},
            "model_bytes": _files_bytes(model),
            "build_s": round(time.perf_counter() - start, 1),
            "free_disk_gb": round(shutil.disk_usage(work).free / 1e9, 1),
        }
        print(json.dumps(result), flush=True)
        for part in args.parts:
            sub = work / part
            sub.mkdir()
            result[part] = run_cli(model, sub) if part == "cli" else run_service(model, sub)
            print(json.dumps({part: result[part]}), flush=True)
            shutil.rmtree(sub, ignore_errors=True)
        print(json.dumps(result, indent=2))
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
