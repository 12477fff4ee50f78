"""Per-layer sparsity allocation against uniform, with the recovery of bench/recovery.py.

The same models, calibration inputs and evaluation as ``python -m bench.recovery``, with variants whose prune
step spreads the same overall 50% over the layers differently (``allocation`` of the prune step: owl or
measured, see onnx_ops/passes/_prune_allocation.py), each followed by ``distill``. Besides the table, prints
each variant's per-layer sparsity and the overall fraction pruned (the weights zeroed over all pruned weights).

Run:  python -m bench.prune_allocation [--only KEY ...] [--variants NAME ...] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from typing import Any

from bench import recovery, tasks
from bench.recovery_data import CALIBRATION
from onnx_ops.report import Report

ACTIVATION = {**recovery.PRUNE, "criterion": "activation"}
VARIANTS: dict[str, list[dict[str, Any]]] = {
    "magnitude": [recovery.PRUNE],
    "activation + distill": [ACTIVATION, {"kind": "distill"}],
    "owl + distill": [{**ACTIVATION, "allocation": "owl"}, {"kind": "distill"}],
    "measured + distill": [{**ACTIVATION, "allocation": "measured"}, {"kind": "distill"}],
}


def run(keys: list[str], variants: list[str]) -> dict[str, dict[str, Any]]:
    """These variants of every model; prints one line per variant as it finishes, with its cut against magnitude."""
    results: dict[str, dict[str, Any]] = {}
    for key in keys:
        task = tasks.BUILDERS[key]()
        calibration = CALIBRATION[key](task)
        results[key] = row = {}
        for variant in variants:
            row[variant] = found = measure(task, calibration, VARIANTS[variant])
            plain = row.get("magnitude", {}).get("gap")
            cut = f"{plain / found['gap']:.2f}x" if plain and found["gap"] else "-"
            real = found.get("gap_real_tokens")
            print(
                f"{key:20} {variant:24} 1-cos {found['gap']:.4g} (real tokens {real})"
                f" gaps {json.dumps({k: round(v, 5) for k, v in found['gaps'].items()})} cut {cut}"
                f" pruned {found['prune_achieved']} {found['seconds']:.0f} s",
                flush=True,
            )
    return results


def measure(task: tasks.Task, calibration: tasks.Feeds, steps: list[dict[str, Any]]) -> dict[str, Any]:
    """bench/recovery.py's figures of these steps, with the prune step's from the compression's report."""
    found, report = recovery.measure(task, calibration, steps)
    return found | prune_figures(report)


def prune_figures(report: Report) -> dict[str, Any]:
    """The prune step's overall fraction pruned, per-layer sparsity and allocation notes, from its report."""
    prune = next(s for s in report.steps if s.kind == "prune")
    return {
        "prune_achieved": prune.summary.get("achieved_sparsity"),
        "prune_layers": [(layer.name, layer.sparsity) for layer in prune.layers],
        "prune_summary": {
            k: v for k, v in prune.summary.items() if k in ("model_error_alone", "outlier_ratio", "layer_error_refit")
        },
    }


def main() -> None:
    """Command line entry point."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", nargs="*", default=None, help="model keys (default: all)")
    parser.add_argument("--variants", nargs="*", choices=list(VARIANTS), default=list(VARIANTS), help="default: all")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    keys = args.only or [k for k in tasks.BUILDERS if k in CALIBRATION]
    results = run(keys, args.variants)
    for key, row in results.items():
        for variant in args.variants:
            print(f"{key} / {variant}: overall fraction pruned {row[variant]['prune_achieved']}")
            for name, sparsity in row[variant]["prune_layers"]:
                print(f"    {sparsity:.4f}  {name}")
            for what, entries in row[variant]["prune_summary"].items():
                print(f"    {what}: " + "; ".join(entries))
    if args.json:
        args.json.write_text(json.dumps(results, indent=1, default=float))


if __name__ == "__main__":
    main()
