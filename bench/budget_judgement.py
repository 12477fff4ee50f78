"""The auto budget judged on pooled cosine (before) and per sample and per output (now), on a real classifier.

Run:  python bench/budget_judgement.py [--per-type 30] [--time-budget 120] [--json out.json]
      python bench/budget_judgement.py --files /usr/share /usr/lib --no-static --time-budget 0
Needs: pip install --no-deps magika (its wheel ships the ONNX model; nothing else of it is used)

Google's Magika file-type classifier, on labelled files of 18 types generated from a seed (tests/file_types.py),
or on real files found under --files (their type from their extension), all of them used (evaluation.max_samples
raised to their number). A fixed set of quantization plans is built
with the library and each is judged against the cosine budget 0.99 twice: by the pooled output cosine (the
rule before) and by the per-sample, per-output rule of onnx_ops.auto_budget; the default plan's dominance is
shown. Then `auto` runs (quantize family, calibration given) and its choice is printed. Every figure is
measured with ONNX Runtime in this process.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from onnx_ops import CompressionError, compress, parse_plan
from onnx_ops import auto_budget as budget
from onnx_ops.evaluate import Runner
from onnx_ops.report import AutoCandidate

import file_types

PLANS: list[tuple[str, dict[str, Any]]] = [
    ("default plan", budget.default_step().model_dump(mode="json")),
    ("dynamic per-channel, MatMul only", {"kind": "quantize", "op_types": ["MatMul"]}),
    ("dynamic per-tensor, MatMul only", {"kind": "quantize", "op_types": ["MatMul"], "per_channel": False}),
    ("dynamic per-channel, Conv too", {"kind": "quantize", "op_types": ["Conv", "MatMul"]}),
    ("static qdq per-channel minmax", {"kind": "quantize", "mode": "static"}),
    ("static qdq per-tensor minmax", {"kind": "quantize", "mode": "static", "per_channel": False}),
    ("static qdq, weight layers only", {"kind": "quantize", "mode": "static", "op_types": ["Conv", "MatMul"]}),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--per-type", type=int, default=30, help="files of each of the 18 types (30: 540 files)")
    parser.add_argument("--time-budget", type=int, default=120, help="auto's time budget in seconds (0: skip)")
    parser.add_argument("--json", type=Path, help="also write the rows as JSON here")
    parser.add_argument(
        "--files", type=Path, nargs="*", help="real files under these folders instead (type from the extension)"
    )
    parser.add_argument("--no-static", action="store_true", help="leave out the static plans (they are slow)")
    args = parser.parse_args()
    path = file_types.model_path()
    if path is None:
        sys.exit("magika is not installed: pip install --no-deps magika")
    model = file_types.finite_model(path)
    data = file_types.real_files(args.files, args.per_type) if args.files else file_types.dataset(args.per_type)
    calibration = {"bytes": data["bytes"][::4][:128]}
    n = len(data["bytes"])
    evaluation = {"max_samples": n, "latency_runs": 20, "warmup_runs": 3}
    step = parse_plan({"steps": [{"kind": "auto"}]}).steps[0]
    reference = Runner(model)
    feeds = [{"bytes": data["bytes"][i : i + 1]} for i in range(n)]
    ref = [reference.run(feed) for feed in feeds]
    rows: list[dict[str, Any]] = []
    kinds = len(set(data["labels"].tolist()))
    print(f"Magika standard_v3_3, {n} labelled files of {kinds} types; budget: output cosine >= {step.min_cosine}\n")
    print("| plan | size | pooled cosine | p5 sample cosine | min sample cosine | top-1 | acc. drop | before | now |")
    print("|---|---|---|---|---|---|---|---|---|", flush=True)
    for index, (label, plan_step) in enumerate(PLANS):
        if args.no_static and plan_step.get("mode") == "static":
            continue
        try:
            result = compress(model, {"steps": [plan_step], "evaluation": evaluation}, calibration=calibration)
        except CompressionError as e:
            rows.append({"index": index, "plan": label, "error": e.message})
            print(f"| {label} | failed: {e.message[:60]} |||||||", flush=True)
            continue
        out = [Runner(result.model).run(feed) for feed in feeds]
        judged = budget.judge(step, reference.output_names, ref, out, data["labels"].reshape(n, 1))
        candidate = AutoCandidate(
            index=index, label=label, steps=[plan_step], status="measured", seconds=0.0,
            size_bytes=result.model.ByteSize(), **judged.fields(),  # type: ignore[arg-type]
        )  # fmt: skip
        rows.append({
            "index": index, "plan": label, "size_ratio": candidate.size_bytes / model.ByteSize(),
            "pooled_cosine": judged.cosine, "p5_sample_cosine": judged.cosine_p5,
            "min_sample_cosine": result.report.agreement.outputs[0].cosine_min, "top1": judged.agreement,
            "accuracy_drop": judged.accuracy_drop, "before_rule": judged.cosine >= step.min_cosine,
            "now_rule": judged.meets, "misses": judged.misses, "candidate": candidate,
        })  # fmt: skip
        _print_row(rows[-1], rows[0].get("candidate"))
    if args.time_budget:
        plan = {"steps": [{"kind": "auto", "families": ["quantize"], "time_budget_s": args.time_budget}],
                "evaluation": evaluation}  # fmt: skip
        auto = compress(model, plan, evaluation=data, calibration=calibration).report.auto
        assert auto is not None
        print(f"\nauto ({auto.status}): {auto.message}")
    if args.json:
        args.json.write_text(json.dumps([{k: v for k, v in r.items() if k != "candidate"} for r in rows], indent=1))


def _print_row(r: dict[str, Any], default: AutoCandidate | None) -> None:
    beaten = default is not None and budget.dominates(default, r["candidate"])
    now = ("within" if r["now_rule"] else "outside") + (", beaten by the default plan" if beaten else "")
    drop = "-" if r["accuracy_drop"] is None else f"{r['accuracy_drop']:+.2f}"
    print(
        f"| {r['plan']} | {r['size_ratio']:.3f} | {r['pooled_cosine']:.5f} | {r['p5_sample_cosine']:.5f} | "
        f"{r['min_sample_cosine']:.5f} | {r['top1']:.4f} | {drop} | {'within' if r['before_rule'] else 'outside'} "
        f"| {now} |",
        flush=True,
    )


if __name__ == "__main__":
    main()
