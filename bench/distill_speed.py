"""Time of the distill step on the real models: wall and CPU time, and the share spent in the refit solves.

For each model, one job through the library: ``prune`` 50% unstructured (MatMul/Gemm/Conv, |W| times the
input norm per output row, as bench/recovery.py's "activation + distill") then ``distill`` with the
calibration inputs of bench/recovery_data.py. The distill step's wall and process CPU time (every thread,
ONNX Runtime's included) are taken from the job's progress callback at the step's start and end; the refit
share is the time spent inside ``onnx_ops.passes._refit.refit`` (wrapped here with a timer, nothing else
changed), so the rest is capture (running teacher and student over the calibration feeds).

Run:  python -m bench.distill_speed [--only rapidocr_rec ddddocr_ocr] [--samples N] [--json PATH]

Side by side: ``--trees BEFORE AFTER [--repeats 3]`` runs each model's job in a child process per source tree
(a checkout of the code before and one after a change; PYTHONPATH set to it), the trees interleaved, and prints
each tree's distill CPU time (median, [min, max]) and its model error after distill (the outputs to compare).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import io
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench import tasks
from bench.recovery import PRUNE
from bench.recovery_data import CALIBRATION
from onnx_ops import compress
from onnx_ops.passes import _refit

STEPS: list[dict[str, Any]] = [{**PRUNE, "criterion": "activation"}, {"kind": "distill"}]


class _Clock:
    """Wall and CPU time between the progress stages of one step, and inside a wrapped function."""

    def __init__(self, step: str) -> None:
        self.step = step
        self.start: tuple[float, float] | None = None
        self.end: tuple[float, float] | None = None
        self.inner = [0.0, 0.0]

    @staticmethod
    def now() -> tuple[float, float]:
        return time.perf_counter(), time.process_time()

    def __call__(self, stage: str, fraction: float) -> None:
        inside = stage.startswith(self.step)
        if inside and self.start is None:
            self.start = self.now()
        elif not inside and self.start is not None and self.end is None:
            self.end = self.now()

    def timed(self, function: Callable[..., int]) -> Callable[..., int]:
        @functools.wraps(function)
        def wrapper(*args: Any, **kwargs: Any) -> int:
            wall, cpu = self.now()
            try:
                return function(*args, **kwargs)
            finally:
                self.inner[0] += time.perf_counter() - wall
                self.inner[1] += time.process_time() - cpu

        return wrapper

    def figures(self) -> dict[str, float]:
        assert self.start is not None and self.end is not None, "the distill step did not report its progress"
        return {
            "wall_s": self.end[0] - self.start[0],
            "cpu_s": self.end[1] - self.start[1],
            "refit_wall_s": self.inner[0],
            "refit_cpu_s": self.inner[1],
        }


def measure(key: str, samples: int = 0) -> dict[str, Any]:
    """Prune + distill one real model (on its first `samples` calibration samples, or all); times and report."""
    task = tasks.BUILDERS[key]()
    calibration = CALIBRATION[key](task)
    if samples > 0:
        calibration = {name: array[:samples] for name, array in calibration.items()}
    plan = {
        "steps": STEPS,
        "input_shapes": task.input_shapes,
        "evaluation": {"latency_runs": 1, "warmup_runs": 0, "latency_seconds": 0, "max_samples": 2},
    }
    clock = _Clock(f"step {len(STEPS)}/{len(STEPS)}: distill")
    original = _refit.refit
    _refit.refit = clock.timed(original)  # type: ignore[assignment]
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            evaluation = {name: array[:2] for name, array in task.evaluation.items()}
            result = compress(task.model_bytes(), plan, calibration=calibration, evaluation=evaluation, progress=clock)
    finally:
        _refit.refit = original  # type: ignore[assignment]
    step = next(s for s in result.report.steps if s.kind == "distill")
    return {
        **clock.figures(),
        "calibration_samples": len(next(iter(calibration.values()))),
        "layers_refit": step.summary.get("layers_refit"),
        "model_rel_error_before": step.summary.get("model_rel_error_before"),
        "model_rel_error_after": step.summary.get("model_rel_error_after"),
    }


def _in_child(tree: Path, key: str, samples: int) -> dict[str, Any]:
    """measure(key) in a child process that imports onnx_ops (and bench) from `tree`; its figures."""
    env = {**os.environ, "PYTHONPATH": str(tree)}
    command = [sys.executable, "-m", "bench.distill_speed", "--child", key, str(samples)]
    done = subprocess.run(command, env=env, cwd=tree, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        return {"error": done.stderr.strip().splitlines()[-1:] or [f"exit code {done.returncode}"]}
    found: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return found


def compare(trees: list[Path], keys: list[str], repeats: int, samples: int) -> dict[str, Any]:
    """Each model's distill in each source tree, the trees interleaved `repeats` times; CPU seconds and spread."""
    results: dict[str, Any] = {}
    for key in keys:
        runs: dict[str, list[dict[str, Any]]] = {str(tree): [] for tree in trees}
        for _ in range(repeats):
            for tree in trees:
                runs[str(tree)].append(_in_child(tree, key, samples))
        results[key] = runs
        for name, found in runs.items():
            cpu = [r["cpu_s"] for r in found if "cpu_s" in r]
            errors = [r["model_rel_error_after"] for r in found if "cpu_s" in r]
            spread = f"median {statistics.median(cpu):7.1f} [{min(cpu):.1f}, {max(cpu):.1f}]" if cpu else "failed"
            print(f"{key:14} {name:40} CPU s {spread}  error after {errors}", flush=True)
    return results


def main() -> None:
    """Command line entry point."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", nargs="*", default=["rapidocr_rec", "ddddocr_ocr"], help="model keys")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    parser.add_argument("--trees", nargs="*", type=Path, default=[], help="source trees to compare side by side")
    parser.add_argument("--repeats", type=int, default=3, help="with --trees: runs of each tree, interleaved")
    parser.add_argument("--samples", type=int, default=0, help="only the first N calibration samples (0: all)")
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(args.child[0], int(args.child[1]))))
        return
    if args.trees:
        compared = compare(args.trees, args.only, args.repeats, args.samples)
        if args.json:
            args.json.write_text(json.dumps(compared, indent=1) + "\n")
        return
    columns = f"{'wall s':>8} {'cpu s':>8} {'refit wall':>11} {'refit cpu':>10} {'layers':>7} {'model error':>22}"
    print(f"{'model':16} {columns}")
    results = {}
    for key in args.only:
        row = results[key] = measure(key, args.samples)
        error = f"{row['model_rel_error_before']:.3g} -> {row['model_rel_error_after']:.3g}"
        print(
            f"{key:16} {row['wall_s']:8.1f} {row['cpu_s']:8.1f} {row['refit_wall_s']:11.1f} "
            f"{row['refit_cpu_s']:10.1f} {row['layers_refit']!s:>7} {error:>22}",
            flush=True,
        )
    if args.json:
        args.json.write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
