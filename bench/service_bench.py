"""The service's own figures: HTTP job time against the library call, API memory during a 1 GiB upload, job memory.

Starts `onnx-compress serve` as a subprocess on a free loopback port with its data directory in a temporary
folder, talks to it with the standard library's http.client (streamed, chunked bodies) and samples the resident
memory of the API process and of its job processes with psutil.

Run:  python -m bench.service_bench [--upload-gib 1] [--repeats 3]
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import io
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from onnx_ops import compress

MIB = 1 << 20
Model = tuple[bytes, dict[str, Any], dict[str, np.ndarray] | None]  # model bytes, plan, evaluation arrays


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def server(data_dir: Path, *, worker: bool = True, env: dict[str, str] | None = None) -> Iterator[tuple[int, int]]:
    """A running `onnx-compress serve`; yields (port, pid)."""
    port = _free_port()
    exe = Path(sys.executable).with_name("onnx-compress")
    command = [str(exe), "serve", "--port", str(port), "--data-dir", str(data_dir)]
    command += [] if worker else ["--no-worker"]
    full_env = {**os.environ, "COMPRESS_MIN_FREE_DISK_MB": "0", **(env or {})}
    proc = subprocess.Popen(command, env=full_env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while True:
            with contextlib.suppress(OSError, http.client.HTTPException):
                if _request(port, "GET", "/healthz")[0] == 200:
                    break
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("the server did not start")
            time.sleep(0.2)
        yield port, proc.pid
    finally:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _request(port: int, method: str, path: str) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    try:
        conn.request(method, path)
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def _multipart(boundary: str, fields: dict[str, str], files: dict[str, Iterator[bytes]]) -> Iterator[bytes]:
    for name, value in fields.items():
        yield f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n'.encode()
    for name, chunks in files.items():
        yield (
            f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"; filename="{name}.bin"\r\n'
            "Content-Type: application/octet-stream\r\n\r\n"
        ).encode()
        yield from chunks
        yield b"\r\n"
    yield f"--{boundary}--\r\n".encode()


def post_job(port: int, fields: dict[str, str], files: dict[str, Iterator[bytes]]) -> tuple[int, dict[str, Any]]:
    """POST /api/jobs with a chunked, streamed multipart body; (status, JSON answer)."""
    boundary = uuid.uuid4().hex
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    try:
        conn.putrequest("POST", "/api/jobs")
        conn.putheader("Content-Type", f"multipart/form-data; boundary={boundary}")
        conn.putheader("Transfer-Encoding", "chunked")
        conn.endheaders()
        try:
            for chunk in _multipart(boundary, fields, files):
                if chunk:
                    conn.send(b"%x\r\n%s\r\n" % (len(chunk), chunk))
            conn.send(b"0\r\n\r\n")
        except (BrokenPipeError, ConnectionResetError):
            pass  # refused mid-body: the answer is still there to read
        response = conn.getresponse()
        body = response.read()
        return response.status, json.loads(body or b"{}")
    finally:
        conn.close()


class PeakRss:
    """Samples the resident memory of a process (and optionally its children) every few milliseconds."""

    def __init__(self, pid: int, children: bool = False, interval: float = 0.01) -> None:
        import psutil  # only here: the helpers above serve bench.big_models without it

        self.process = psutil.Process(pid)
        self.children = children
        self.interval = interval
        self.baseline = self.process.memory_info().rss
        self.peak = self.baseline
        self.child_peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        import psutil

        while not self._stop.is_set():
            with contextlib.suppress(psutil.Error):
                self.peak = max(self.peak, self.process.memory_info().rss)
                if self.children:
                    for child in self.process.children(recursive=True):
                        with contextlib.suppress(psutil.Error):
                            self.child_peak = max(self.child_peak, child.memory_info().rss)
            time.sleep(self.interval)

    def __enter__(self) -> PeakRss:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def upload_memory(gib: float) -> dict[str, Any]:
    """Peak RSS growth of the API process while `gib` GiB of model bytes stream in."""
    total = int(gib * (1 << 30))
    chunk = os.urandom(MIB)

    def body() -> Iterator[bytes]:
        sent = 0
        while sent < total:
            piece = chunk[: min(MIB, total - sent)]
            sent += len(piece)
            yield piece

    cap_mb = int(gib * 1024) + 64
    with (
        tempfile.TemporaryDirectory(prefix="bench-serve-") as tmp,
        server(
            Path(tmp), worker=False, env={"COMPRESS_MAX_MODEL_MB": str(cap_mb), "COMPRESS_UPLOAD_TIMEOUT_S": "1200"}
        ) as (port, pid),
    ):
        _request(port, "GET", "/api/jobs")  # warm the routes before the baseline
        start = time.perf_counter()
        with PeakRss(pid) as rss:
            status, answer = post_job(port, {"plan": json.dumps({"steps": [{"kind": "quantize"}]})}, {"model": body()})
        seconds = time.perf_counter() - start
    return {
        "upload_mib": total // MIB,
        "status": status,
        "answer": answer.get("state") or answer.get("error", {}).get("code"),
        "api_rss_before_mib": round(rss.baseline / MIB, 1),
        "api_rss_peak_mib": round(rss.peak / MIB, 1),
        "api_rss_growth_mib": round((rss.peak - rss.baseline) / MIB, 1),
        "seconds": round(seconds, 1),
        "mib_per_s": round(total / MIB / seconds, 1),
    }


def _wait_job(port: int, job_id: str, timeout: float = 1800) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        body = _request(port, "GET", f"/api/jobs/{job_id}")[1]
        job = json.loads(body)
        if job["state"] in ("succeeded", "failed"):
            return dict(job)
        time.sleep(0.05)
    raise TimeoutError(job_id)


def _npz(arrays: dict[str, np.ndarray]) -> bytes:
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)  # type: ignore[arg-type]
    return buffer.getvalue()


def _cli_seconds(tmp: Path, data: bytes, plan: dict[str, Any], evaluation: bytes | None) -> float:
    """Wall time of `onnx-compress compress` in a fresh process: the library plus Python's start-up."""
    (tmp / "cli.onnx").write_bytes(data)
    command = [str(Path(sys.executable).with_name("onnx-compress")), "compress", str(tmp / "cli.onnx"), "-o",
               str(tmp / "cli.out.onnx"), "--plan", json.dumps(plan)]  # fmt: skip
    if evaluation is not None:
        (tmp / "cli.eval.npz").write_bytes(evaluation)
        command += ["--eval", str(tmp / "cli.eval.npz")]
    start = time.perf_counter()
    subprocess.run(command, check=True, capture_output=True)
    return time.perf_counter() - start


def _http_job(
    port: int, pid: int, data: bytes, plan: dict[str, Any], evaluation: bytes | None
) -> tuple[float, int, float]:
    """One job over HTTP: (seconds from upload to finished, peak RSS of the job processes, compress time inside)."""
    files = {"model": iter([data])} | ({"evaluation": iter([evaluation])} if evaluation else {})
    with PeakRss(pid, children=True) as rss:
        start = time.perf_counter()
        status, answer = post_job(port, {"plan": json.dumps(plan)}, files)
        if status != 202:
            raise RuntimeError(f"{status} {answer}")
        job = _wait_job(port, answer["id"])
        seconds = time.perf_counter() - start
    if job["state"] != "succeeded":
        raise RuntimeError(f"job {job['state']}: {job.get('error')}")
    report = json.loads(_request(port, "GET", f"/api/jobs/{answer['id']}/report")[1])
    _request(port, "GET", f"/api/jobs/{answer['id']}/model")
    _request(port, "DELETE", f"/api/jobs/{answer['id']}")
    return seconds, rss.child_peak, float(report["total_seconds"])


def job_overhead(models: dict[str, Model], repeats: int) -> list[dict[str, Any]]:
    """Per model: median HTTP job time, library compress() time and CLI time; their ratios; job peak RSS."""
    results = []
    with tempfile.TemporaryDirectory(prefix="bench-serve-") as tmp, server(Path(tmp) / "data") as (port, pid):
        for name, (data, plan, evaluation) in models.items():
            eval_npz = _npz(evaluation) if evaluation is not None else None
            http_s, library_s, cli_s, inside_s, job_peak = [], [], [], [], 0
            for repeat in range(repeats):
                # The three ways in a rotating order, so load from other processes hits each alike.
                for way in [("http", "library", "cli")[(repeat + i) % 3] for i in range(3)]:
                    if way == "library":
                        start = time.perf_counter()
                        compress(data, plan, evaluation=evaluation)
                        library_s.append(time.perf_counter() - start)
                    elif way == "cli":
                        cli_s.append(_cli_seconds(Path(tmp), data, plan, eval_npz))
                    else:
                        seconds, peak, inside = _http_job(port, pid, data, plan, eval_npz)
                        http_s.append(seconds)
                        job_peak, inside_s = max(job_peak, peak), [*inside_s, inside]
            h, lib, cli = statistics.median(http_s), statistics.median(library_s), statistics.median(cli_s)
            results.append({
                "model": name, "model_mib": round(len(data) / MIB, 1), "http_s": round(h, 2),
                "library_s": round(lib, 2), "cli_s": round(cli, 2), "compress_inside_job_s": round(
                    statistics.median(inside_s), 2), "overhead_ratio": round(h / lib, 3),
                "overhead_vs_cli": round(h / cli, 3), "job_peak_rss_mib": round(job_peak / MIB, 1),
                "job_peak_over_model_size": round(job_peak / len(data), 1),
            })  # fmt: skip
            print(f"  {name}: {results[-1]}", flush=True)
    return results


def pass_times(layers: int = 12) -> list[dict[str, Any]]:
    """SVD and pruning pass wall times on a BERT-base-sized stack of MatMuls (bench/svd_speed.py's model)."""
    from bench import svd_speed
    from onnx_ops.passes._base import PassContext
    from onnx_ops.passes.prune import MagnitudePrunePass
    from onnx_ops.passes.svd import SvdFactorizePass
    from onnx_ops.plan import PruneStep, SvdStep

    steps: list[tuple[str, Any, Any]] = [
        ("svd energy 0.99", SvdFactorizePass, SvdStep(energy=0.99)),
        ("svd rank_ratio 0.25", SvdFactorizePass, SvdStep(rank_ratio=0.25)),
        ("prune unstructured 50%", MagnitudePrunePass, PruneStep(sparsity=0.5)),
        ("prune 2:4", MagnitudePrunePass, PruneStep(method="n:m")),
        ("prune structured 30%", MagnitudePrunePass, PruneStep(method="structured", sparsity=0.3)),
    ]
    out = []
    with tempfile.TemporaryDirectory() as tmp:
        for label, cls, step in steps:
            model = svd_speed.build(layers, "power")
            params = sum(v.const_value.size for v in model.graph.initializers.values() if v.const_value is not None)
            start = time.perf_counter()
            cls(step, PassContext(workdir=Path(tmp)))(model)
            seconds = time.perf_counter() - start
            values = model.graph.initializers.values()
            after = sum(int(np.count_nonzero(v.const_value.numpy())) for v in values if v.const_value is not None)
            out.append({
                "pass": label, "parameters_m": round(params / 1e6, 1), "nonzero_after_m": round(after / 1e6, 1),
                "seconds": round(seconds, 2),
            })  # fmt: skip
            print(f"  {out[-1]}", flush=True)
    return out


def default_models(bert_layers: int) -> dict[str, Model]:
    """Models for the HTTP/library comparison, each with a dynamic int8 plan and a short measurement."""
    import onnx_ir as ir

    from bench import svd_speed, tasks

    evaluation = {"latency_runs": 20, "warmup_runs": 3}
    digits = tasks.digits()
    models: dict[str, Model] = {
        "sklearn_digits_mlp": (digits.model_bytes(), {"steps": [{"kind": "quantize"}], "evaluation": evaluation}, None),
    }
    for key in ("rapidocr_rec", "minilm_l3"):
        with contextlib.suppress(FileNotFoundError):
            task = tasks.BUILDERS[key]()
            plan = {"steps": [{"kind": "quantize"}], "input_shapes": task.input_shapes, "evaluation": evaluation}
            models[key] = (task.model_bytes(), plan, {k: v[:4] for k, v in task.evaluation.items()})
    bert = onnx.ModelProto()
    bert.CopyFrom(ir.to_proto(svd_speed.build(bert_layers, "power")))
    del bert.graph.output[:]  # the builder leaves the output's shape unset, which the service's checker refuses
    bert.graph.output.append(onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["batch", "seq", 768]))
    shapes = {"x": [1, 128, svd_speed.HIDDEN]}
    models[f"bert_base_{bert_layers}_layers_matmuls"] = (
        bert.SerializeToString(),
        {"steps": [{"kind": "quantize"}], "input_shapes": shapes, "evaluation": evaluation},
        None,
    )
    return models


def run(upload_gib: float, repeats: int, bert_layers: int) -> dict[str, Any]:
    """All service figures."""
    np.random.seed(0)
    print("service: HTTP job vs library call (median of repeats), job peak RSS", flush=True)
    overhead = job_overhead(default_models(bert_layers), repeats)
    print(f"service: API memory while {upload_gib} GiB streams in", flush=True)
    upload = upload_memory(upload_gib)
    print(f"  {upload}", flush=True)
    print("passes on a BERT-base-sized model (12 layers of MatMuls, 85M weights)", flush=True)
    return {"service_overhead": overhead, "upload_memory": upload, "pass_times": pass_times()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--upload-gib", type=float, default=1.0)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--bert-layers", type=int, default=4, help="layers of the BERT-sized model sent as a job")
    args = parser.parse_args()
    print(json.dumps(run(args.upload_gib, args.repeats, args.bert_layers), indent=1))


if __name__ == "__main__":
    main()
