"""Peak memory and time of the data-aware passes on the 400 MB transformer of bench/memory.py, beside the job's budget.

Usage, from the repository root:

    python -m bench.distill_memory [--model enc400] [--jobs distill svd] [--samples 16] [--blocks N] [--dir DIR]

Jobs, each through the library in a child process of its own (compress with calibration data, then the
evaluation, saving the model and the report), as the service's job runs them:

* ``distill``: ``prune`` 50% unstructured (MatMul/Gemm) then ``distill`` (sequential ridge refit of the kept
  weights to the original model's layer outputs: activation capture of teacher and student, X^T X per layer);
* ``svd``: activation-aware ``svd`` keeping half of the eligible parameters (whitened by the captured input
  covariance, then refit).

``--blocks N`` limits both to the MatMuls of the first N transformer blocks: the peak comes from the copies
of the model and the ONNX Runtime sessions, which do not change, and from the largest layer's statistics and
solve, which every block has; the time is then a fraction. The model is bench/memory.py's (built with its
builder, written once to ``--dir`` and reused). Calibration data: ``--samples`` random token sequences. The
peak RSS is the child's ``ru_maxrss`` (and its peak per phase: validate, pass, measure, save, as
bench/memory.py takes them); CPU time is the child's user + system time. The budget is the service's memory
limit for a job: 8 times the upload, at least 8 GB.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from bench.memory import MODELS, SEQ, _PhasePeaks, _rss_mb, model_file

JOBS: dict[str, list[dict[str, Any]]] = {
    "distill": [{"kind": "prune", "sparsity": 0.5}, {"kind": "distill"}],
    "svd": [{"kind": "svd", "activation_aware": True, "param_ratio": 0.5}],
}
EVALUATION = {"latency_runs": 1, "warmup_runs": 0, "latency_seconds": 0, "max_samples": 2}


def budget_bytes(upload: int) -> int:
    """The job's memory limit for an upload of this size: 8 times it, at least 8 GB."""
    return max(8 * upload, 8 * 10**9)


def _calibration(model: str, samples: int, seed: int) -> dict[str, np.ndarray]:
    vocab = MODELS[model][2]
    return {"input_ids": np.random.default_rng(seed).integers(0, vocab, (samples, 1, SEQ), dtype=np.int64)}


def _steps(job: str, path: str, blocks: int) -> list[dict[str, Any]]:
    """The job's steps; with blocks > 0, limited to the MatMuls whose weights belong to the first blocks."""
    if blocks <= 0:
        return JOBS[job]
    graph = onnx.load(path, load_external_data=False).graph
    weights = {i.name for i in graph.initializer}
    prefixes = tuple(f"layer{i}." for i in range(blocks))
    nodes = [n.name for n in graph.node if n.op_type == "MatMul" and n.input[1] in weights]
    nodes = [n.name for n in graph.node if n.name in nodes and n.input[1].startswith(prefixes)]
    excluded = [n.name for n in graph.node if n.op_type == "MatMul" and n.name not in nodes]
    first = {**JOBS[job][0], "only_nodes": nodes} if job == "distill" else {**JOBS[job][0], "exclude_nodes": excluded}
    return [first, *JOBS[job][1:]]


def _child(job: str, model: str, path: str, out: str, samples: str, blocks: str) -> dict[str, object]:
    import onnx_ops.passes.quantize  # noqa: F401  (what every job imports, counted in the fixed overhead)
    from onnx_ops.pipeline import compress, save_report

    calibration, evaluation = _calibration(model, int(samples), 1), _calibration(model, 2, 2)
    plan = {"steps": _steps(job, path, int(blocks)), "evaluation": EVALUATION}
    base = _rss_mb()
    peaks = _PhasePeaks()
    result = compress(path, plan, calibration=calibration, evaluation=evaluation, progress=peaks)
    peaks.switch("save")
    result.save(out)
    save_report(result.report, out + ".json")
    peaks.switch("done")
    summaries = {s.kind: {**s.summary, "seconds": s.seconds, "skipped": len(s.skipped)} for s in result.report.steps}
    return {"phases": peaks.peaks, "base_mb": base, "size_after": Path(out).stat().st_size, "steps": summaries}


def run_child(args: list[str]) -> dict[str, Any]:
    """One job in a child process: its peak RSS (MB) and CPU seconds from wait4, the rest from what it prints."""
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "bench.distill_memory", "--child", *args], stdout=subprocess.PIPE)
    assert proc.stdout is not None
    text = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    found: dict[str, Any] = {
        "wall_s": round(time.perf_counter() - start, 1),
        "cpu_s": round(usage.ru_utime + usage.ru_stime, 1),
        "peak_mb": usage.ru_maxrss * 1024 / 1e6,
    }
    code = os.waitstatus_to_exitcode(status)
    if code != 0:
        return found | {"error": f"exit code {code}"}
    found |= json.loads(text.decode().strip().splitlines()[-1])
    # Resetting the high-water mark per phase also resets what wait4 reports: the peak is the highest phase's.
    found["peak_mb"] = max([found["peak_mb"], *found["phases"].values()])
    return found


def _row(model: str, size: int, job: str, found: dict[str, Any]) -> str:
    mb, limit = size / 1e6, budget_bytes(size) / 1e6
    peak = found["peak_mb"]
    phases = found.get("phases") or {}
    parts = " / ".join(f"{phases[p] / mb:.1f}" if p in phases else "-" for p in ("validate", "pass", "measure", "save"))
    error = f" ({found['error']})" if "error" in found else ""
    within = "yes" if peak <= limit and not error else "NO"
    return (
        f"| {model} | {mb:.0f} MB | {job} | {peak / 1000:.2f} GB{error} | {peak / mb:.1f}x | {limit / 1000:.1f} GB "
        f"| {within} | {parts} | {found['wall_s']} s | {found['cpu_s']} s |"
    )


def main(argv: list[str] | None = None) -> None:
    """Command line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="enc400", choices=list(MODELS))
    parser.add_argument("--jobs", nargs="*", default=list(JOBS), choices=list(JOBS))
    parser.add_argument("--samples", type=int, default=16, help="calibration sequences")
    parser.add_argument("--blocks", type=int, default=0, help="only the MatMuls of the first N blocks (0: all)")
    parser.add_argument("--dir", type=Path, default=Path(tempfile.gettempdir()) / "bench-memory", help="model files")
    parser.add_argument("--out", type=Path, default=None, help="also write the figures here (JSON)")
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(_child(*args.child)))
        return
    print(
        "| model | file | job | peak RSS | peak / file | budget | within | validate / pass / measure / save "
        "(x file) | wall | CPU |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    path = model_file(args.model, args.dir)
    size = path.stat().st_size
    results = []
    for job in args.jobs:
        out = str(args.dir / f"{args.model}.{job}.distill-memory.onnx")
        found = run_child([job, args.model, str(path), out, str(args.samples), str(args.blocks)])
        for leftover in (Path(out), Path(out + ".json")):
            leftover.unlink(missing_ok=True)
        settings = {"samples": args.samples, "blocks": args.blocks}
        results.append({"model": args.model, "file_bytes": size, "job": job, **settings, **found})
        print(_row(args.model, size, job, found), flush=True)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
