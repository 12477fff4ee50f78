"""Time of the distill step on the real models: wall and CPU time, and the share spent in the refit solves.

For each model, one job through the library: ``prune`` 50% unstructured (MatMul/Gemm/Conv, |W| times the
input norm per output row, as bench/recovery.py's "activation + distill") then ``distill`` with the
calibration inputs of bench/recovery_data.py. The distill step's wall and process CPU time (every thread,
ONNX Runtime's included) are taken from the job's progress callback at the step's start and end; the refit
share is the time spent inside ``onnx_ops.passes._refit.refit`` (wrapped here with a timer, nothing else
changed), so the rest is capture (running teacher and student over the calibration feeds).

Run:  python -m bench.distill_speed [--only rapidocr_rec ddddocr_ocr] [--json PATH]
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import io
import json
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


def measure(key: str) -> dict[str, Any]:
    """Prune + distill one real model; the distill step's times and what it reports."""
    task = tasks.BUILDERS[key]()
    calibration = CALIBRATION[key](task)
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


def main() -> None:
    """Command line entry point."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", nargs="*", default=["rapidocr_rec", "ddddocr_ocr"], help="model keys")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = parser.parse_args()
    columns = f"{'wall s':>8} {'cpu s':>8} {'refit wall':>11} {'refit cpu':>10} {'layers':>7} {'model error':>22}"
    print(f"{'model':16} {columns}")
    results = {}
    for key in args.only:
        row = results[key] = measure(key)
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
