"""Pruning recovery on the real models: 50% unstructured magnitude pruning against activation-aware masks + distill.

For every real model of bench/tasks.py with MatMul/Gemm/Conv weights, side by side in one run:

* magnitude: ``prune`` 50% unstructured, smallest |W| per tensor;
* magnitude + distill: the same mask, then the label-free ``distill`` step (sequential ridge refit of the kept
  weights to the fp32 model's layer outputs);
* activation + distill: ``prune`` with ``criterion: activation`` (|W| times the input norm, per output row),
  then ``distill``;
* activation + distill, residual: the same with ``residual``: a layer whose output joins a residual stream
  (a transformer's attention output and FFN down projection) is fit to the fp32 model's sum minus the
  student's stream, so it also makes up for the error upstream layers left there;
* activation + distill, residual, all rows: the same with ``rows: all``: padded positions are fit too.

On a transformer whose inputs are padded (an attention mask), the token-level output also holds the padded
positions, which the model's user ignores (its own sentence embedding is pooled over the real tokens only):
those outputs are reported twice, as the pooled cosine over every position (``gaps``, the figure ranked) and
over the real tokens only (``gaps_real_tokens``).

All three prune the same layers: MatMul, Gemm and Conv weights with at least 256 elements (recurrent
LSTM/GRU weights are left dense: distill cannot refit them). Calibration inputs are made here and are NOT the
evaluation inputs (other words, pages, sentences and speech, rendered with other seeds); (1 - cosine) is the
worst output's pooled cosine gap on the task's evaluation inputs, and the score is the task metric against
fp32's on the same inputs.

Run:  python -m bench.recovery [--only KEY ...] [--json PATH]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np

from bench import tasks
from bench.recovery_data import CALIBRATION
from onnx_ops import compress
from onnx_ops.capture import find_row_mask
from onnx_ops.evaluate import Runner, agreement
from onnx_ops.report import Report

OPS = ["MatMul", "Gemm", "Conv"]
PRUNE: dict[str, Any] = {"kind": "prune", "method": "unstructured", "sparsity": 0.5, "op_types": OPS}
VARIANTS: dict[str, list[dict[str, Any]]] = {
    "magnitude": [PRUNE],
    "magnitude + distill": [PRUNE, {"kind": "distill"}],
    "activation + distill": [{**PRUNE, "criterion": "activation"}, {"kind": "distill"}],
    "activation + distill, residual": [{**PRUNE, "criterion": "activation"}, {"kind": "distill", "residual": True}],
    "activation + distill, residual, all rows": [
        {**PRUNE, "criterion": "activation"},
        {"kind": "distill", "residual": True, "rows": "all"},
    ],
}


def measure(task: tasks.Task, calibration: tasks.Feeds, steps: list[dict[str, Any]]) -> tuple[dict[str, Any], Report]:
    """Compress with these steps and measure the result on the task's evaluation inputs.

    Returns:
        The figures (JSON-ready) and the compression's own report (per step and per layer).
    """
    plan = {
        "steps": steps,
        "input_shapes": task.input_shapes,
        "evaluation": {"latency_runs": 1, "warmup_runs": 0, "latency_seconds": 0, "max_samples": 2},
    }
    start = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()):
        result = compress(task.model_bytes(), plan, calibration=calibration, evaluation=_first(task.evaluation, 2))
    seconds = time.perf_counter() - start
    feeds = task.samples(task.evaluation)
    fp32, candidate = Runner(task.model_bytes(), threads=1), Runner(result.model, threads=1, what="compressed model")
    reference = [fp32.run(f) for f in feeds]
    outputs = [candidate.run(f) for f in feeds]
    gaps = {a.name: 1.0 - a.cosine for a in agreement(fp32.output_names, reference, outputs) if a.cosine is not None}
    row: dict[str, Any] = {"gap": max(gaps.values()), "gaps": gaps, "seconds": seconds}
    real = real_token_gaps(fp32.output_names, feeds, reference, outputs)
    if real:
        row["gaps_real_tokens"] = real
        row["gap_real_tokens"] = max({**gaps, **real}.values())
    if task.score is not None:
        row["score"], row["score_fp32"] = task.score(outputs), task.score(reference)  # type: ignore[arg-type]
    distill = next((s for s in result.report.steps if s.kind == "distill"), None)
    if distill is not None:
        row["layers_refit"] = distill.summary.get("layers_refit")
    return row, result.report


def real_token_gaps(
    names: list[str], feeds: list[tasks.Feeds], reference: list[list[Any]], outputs: list[list[Any]]
) -> dict[str, float]:
    """1 - pooled cosine of each [batch, seq, ...] float output over the real tokens only (attention mask 1).

    Empty when the feeds have no attention mask (capture.find_row_mask) or no output is shaped [batch, seq, ...].
    """
    mask_name = find_row_mask(feeds)
    if mask_name is None:
        return {}
    sums: dict[str, list[float]] = {}
    for feed, want, got in zip(feeds, reference, outputs, strict=True):
        mask = feed[mask_name] != 0
        for name, w, g in zip(names, want, got, strict=True):
            if isinstance(w, np.ndarray) and w.dtype.kind == "f" and w.ndim > 2 and w.shape[:2] == mask.shape:
                a, b = w[mask].astype(np.float64), np.asarray(g)[mask].astype(np.float64)
                total = sums.setdefault(name, [0.0, 0.0, 0.0])
                total[0] += float(np.sum(a * b))
                total[1] += float(np.sum(a * a))
                total[2] += float(np.sum(b * b))
    return {name: 1.0 - d / max(np.sqrt(x * y), 1e-300) for name, (d, x, y) in sums.items()}


def _first(feeds: tasks.Feeds, count: int) -> tasks.Feeds:
    return {name: array[:count] for name, array in feeds.items()}


def run(keys: list[str], variants: list[str]) -> dict[str, dict[str, Any]]:
    """These variants of every model; prints one line per model as it finishes."""
    results: dict[str, dict[str, Any]] = {}
    print(header(variants))
    for key in keys:
        try:
            task = tasks.BUILDERS[key]()
            calibration = CALIBRATION[key](task)
        except (FileNotFoundError, ImportError) as e:
            print(f"{key:20} skipped: {e}")
            continue
        count = len(next(iter(calibration.values())))
        results[key] = {"calibration_samples": count, "metric": task.metric}
        for variant in variants:
            try:
                results[key][variant], _ = measure(task, calibration, VARIANTS[variant])
            except Exception as e:  # a refused plan is a result too
                results[key][variant] = {"error": f"{type(e).__name__}: {getattr(e, 'message', None) or e}"[:200]}
        print(line(key, results[key], variants), flush=True)
    return results


def header(variants: list[str]) -> str:
    """The table's header."""
    cells = "".join(f"{v:>36}" for v in variants)
    units = "   1-cos     score   secs" * len(variants)
    return f"{'model':20} {'cal':>4} {'fp32':>6}{cells} {'cut (each distill variant)':>6}\n{'':32}{units}"


def line(key: str, row: dict[str, Any], variants: list[str]) -> str:
    """One model's line: per variant (1 - cosine), score (drop from fp32) and seconds; then the cut factor."""
    fp32 = next((v["score_fp32"] for v in row.values() if isinstance(v, dict) and "score_fp32" in v), None)
    cells = []
    for variant in variants:
        v = row[variant]
        if "error" in v:
            cells.append(f"{'failed: ' + v['error'][:27]:>36}")
            continue
        score = f"{v['score']:.1f}({v['score'] - v['score_fp32']:+.1f})" if "score" in v else "-"
        cells.append(f"{v['gap']:>11.3g} {score:>13} {v['seconds']:>6.0f}")
    plain = row.get("magnitude", {}).get("gap")
    best = [row[v]["gap"] for v in variants if "distill" in v and row[v].get("gap")]
    cut = "/".join(f"{plain / b:.1f}x" for b in best) if plain is not None and best else "     -"
    fp = f"{fp32:6.1f}" if fp32 is not None else "     -"
    return f"{key:20} {row['calibration_samples']:>4} {fp}{''.join(cells)} {cut}"


def main() -> None:
    """Command line entry point."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", nargs="*", default=None, help="model keys (default: all)")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    parser.add_argument("--variants", nargs="*", choices=list(VARIANTS), default=list(VARIANTS), help="default: all")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    keys = args.only or [k for k in tasks.BUILDERS if k in CALIBRATION]
    results = run(keys, args.variants)
    if args.json:
        args.json.write_text(json.dumps(results, indent=1, default=float))


if __name__ == "__main__":
    main()
