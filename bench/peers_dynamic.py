"""Calibrated dynamic int8 on MiniLM: time, peak memory and held-out cosine of two source trees in one run.

Each setting of each tree is compressed in a child process of its own (``PYTHONPATH`` set to the tree), so the
peak RSS is that job's alone; the parent measures every compressed model with the same code, on the task's
evaluation inputs (not the calibration inputs), as bench.peers does: mean cosine of the worst output.

Run:  python -m bench.peers_dynamic --trees BEFORE_TREE AFTER_TREE [--settings default all off] [--rounds 1]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import onnxruntime as ort

from bench import tasks
from onnx_ops.agreement import agreement

SETTINGS = {
    "default": {"kind": "quantize"},
    "all": {"kind": "quantize", "smoothing": "all"},
    "off": {"kind": "quantize", "smoothing": "off"},
    "gptq": {"kind": "quantize", "smoothing": "all", "dynamic_rounding": "gptq"},
}

# Run in the child with the tree's own onnx_ops and bench.tasks: compress, then print time and memory as JSON.
_CHILD = """
import json, sys, time
from bench import tasks
from onnx_ops import compress

def peak_mb():  # VmHWM: this address space's peak (ru_maxrss would carry the parent's over exec)
    line = next(l for l in open("/proc/self/status") if l.startswith("VmHWM:"))
    return int(line.split()[1]) / 1024

step, out = json.loads(sys.argv[1]), sys.argv[2]
task = tasks.minilm()
plan = {"steps": [step], "input_shapes": task.input_shapes,
        "evaluation": {"latency_runs": 1, "warmup_runs": 0, "threads": 1, "max_samples": 4}}
before = peak_mb()
wall, cpu = time.perf_counter(), time.process_time()
result = compress(task.model, plan, calibration=task.calibration)
wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
out_bytes = result.model.SerializeToString()
open(out, "wb").write(out_bytes)
summary = result.report.steps[0].summary
print(json.dumps({"seconds": wall, "cpu_seconds": cpu, "peak_before_mb": before, "peak_mb": peak_mb(),
                  "quantizer": str(summary.get("quantizer")), "smoothing": str(summary.get("smoothing"))}))
"""


def run_child(tree: Path, setting: str, out: Path) -> dict[str, object]:
    """Compress MiniLM with one setting by the tree's code in a child process; its figures."""
    env = dict(os.environ, PYTHONPATH=str(tree))
    done = subprocess.run(
        [sys.executable, "-c", _CHILD, json.dumps(SETTINGS[setting]), str(out)],
        env=env, cwd=tree, capture_output=True, text=True, check=False,
    )  # fmt: skip
    if done.returncode:
        return {"error": done.stderr.strip().splitlines()[-1][:300] if done.stderr.strip() else "failed"}
    return dict(json.loads(done.stdout.strip().splitlines()[-1]))


def held_out_cosine(task: tasks.Task, path: Path) -> float:
    """Mean cosine of the worst output against the fp32 model on the evaluation inputs (as bench.peers)."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    fp32 = ort.InferenceSession(task.model_bytes(), options, providers=["CPUExecutionProvider"])
    int8 = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    feeds = task.samples(task.evaluation)
    names = [o.name for o in fp32.get_outputs()]
    measured = agreement(names, [fp32.run(None, f) for f in feeds], [int8.run(None, f) for f in feeds])
    return min(a.cosine_mean if a.cosine_mean is not None else a.cosine for a in measured)


def main(argv: list[str] | None = None) -> list[dict[str, object]]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trees", nargs="+", type=Path, required=True, help="source trees (before, after)")
    parser.add_argument("--settings", nargs="+", choices=list(SETTINGS), default=["default", "all"])
    parser.add_argument("--rounds", type=int, default=1, help="runs of every (tree, setting), interleaved")
    args = parser.parse_args(argv)
    task = tasks.minilm()
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        for round_index in range(args.rounds):
            for setting in args.settings:
                for tree in args.trees:
                    out = Path(folder) / f"{tree.name}.{setting}.{round_index}.onnx"
                    row: dict[str, object] = {"tree": str(tree), "setting": setting, "round": round_index}
                    row |= run_child(tree.resolve(), setting, out)
                    if "error" not in row:
                        row["held_out_cosine"] = held_out_cosine(task, out)
                    rows.append(row)
                    print(json.dumps(row), flush=True)
    return rows


if __name__ == "__main__":
    main()
