"""Peak memory of each pass and the evaluation on transformer-shaped models, beside ONNX Runtime's quantizer.

Usage, from the repository root:

    python -m bench.memory [--models enc100 enc400 dec350] [--passes quantize svd prune ort] [--dir DIR]

``enc1g`` (an encoder of about 1 GB) is also available. The models are built with ``onnx.helper`` (BERT-style
layers: LayerNorm, 12-head attention, a GELU feed-forward; linear weights of low rank plus noise so that SVD has
something to do), written once to ``--dir`` and reused. Each job runs in its own child process through the library
exactly as the CLI runs it (compress with the evaluation, save the model and the report); the peak RSS is the
child's ``ru_maxrss`` (as ``/usr/bin/time -v`` reports it). Inside the child the peak is also taken per phase
(validate, pass, measure, save): Linux resets the high-water mark when "5" is written to /proc/self/clear_refs.
``ort`` is plain ``onnxruntime.quantization.quantize_dynamic`` on the same file, in a child of its own.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

SEQ = 128
# name: (hidden size, layers, vocabulary, decoder: a language-model head over the vocabulary)
MODELS: dict[str, tuple[int, int, int, bool]] = {
    "enc100": (512, 6, 12000, False),
    "enc400": (768, 12, 30522, False),
    "dec350": (768, 2, 50257, True),
    "enc1g": (1024, 18, 30522, False),
}
PLANS = {
    "quantize": {"kind": "quantize", "mode": "dynamic"},
    "svd": {"kind": "svd", "energy": 0.99},
    "prune": {"kind": "prune", "sparsity": 0.5},
    "cluster": {"kind": "cluster", "bits": 4},
    "int4": {"kind": "int4"},
    "fp16": {"kind": "fp16"},
}
_PHASES = ((0.05, "validate"), (0.75, "pass"), (2.0, "measure"))  # upper bound of the progress fraction


class _Builder:
    """Nodes and initializers of one graph, named in order."""

    def __init__(self, seed: int) -> None:
        self.rng = np.random.default_rng(seed)
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self.count = 0

    def const(self, array: np.ndarray, name: str) -> str:
        self.inits.append(numpy_helper.from_array(array, name))
        return name

    def op(self, op_type: str, inputs: list[str], **attrs: object) -> str:
        self.count += 1
        out = f"{op_type.lower()}_{self.count}"
        self.nodes.append(helper.make_node(op_type, inputs, [out], name=f"{op_type}_{self.count}", **attrs))
        return out

    def linear(self, x: str, k: int, n: int, name: str) -> str:
        """x @ W + b, W of rank k/8 plus 5% noise (what SVD at energy 0.99 finds worth factorizing)."""
        r = max(1, min(k, n) // 8)
        a = self.rng.standard_normal((k, r), dtype=np.float32)
        b = self.rng.standard_normal((r, n), dtype=np.float32)
        w = a @ b
        w *= np.float32(1.0 / np.sqrt(r))
        w += self.rng.standard_normal((k, n), dtype=np.float32) * np.float32(0.05)
        w *= np.float32(1.0 / np.sqrt(k))
        y = self.op("MatMul", [x, self.const(w, f"{name}.weight")])
        return self.op("Add", [y, self.const(np.zeros(n, np.float32), f"{name}.bias")])

    def layer_norm(self, x: str, d: int, name: str) -> str:
        scale = self.const(np.ones(d, np.float32), f"{name}.scale")
        return self.op("LayerNormalization", [x, scale, self.const(np.zeros(d, np.float32), f"{name}.shift")], axis=-1)

    def block(self, x: str, d: int, i: int) -> str:
        heads, p = 12 if d % 12 == 0 else 8, f"layer{i}"
        h = self.layer_norm(x, d, f"{p}.ln1")
        split = self.const(np.array([0, 0, heads, d // heads], np.int64), f"{p}.heads")
        q, k, v = (self.op("Reshape", [self.linear(h, d, d, f"{p}.{n}"), split]) for n in "qkv")
        q = self.op("Transpose", [q], perm=[0, 2, 1, 3])
        k = self.op("Transpose", [k], perm=[0, 2, 3, 1])
        v = self.op("Transpose", [v], perm=[0, 2, 1, 3])
        scores = self.op("Mul", [self.op("MatMul", [q, k]), self.const(np.float32(d // heads) ** -0.5, f"{p}.s")])
        att = self.op("Transpose", [self.op("MatMul", [self.op("Softmax", [scores], axis=-1), v])], perm=[0, 2, 1, 3])
        att = self.op("Reshape", [att, self.const(np.array([0, 0, d], np.int64), f"{p}.merge")])
        x = self.op("Add", [x, self.linear(att, d, d, f"{p}.o")])
        h = self.linear(self.layer_norm(x, d, f"{p}.ln2"), d, 4 * d, f"{p}.ffn1")
        erf = self.op("Erf", [self.op("Mul", [h, self.const(np.float32(2**-0.5), f"{p}.r2")])])
        gelu = self.op("Mul", [h, self.op("Add", [erf, self.const(np.float32(1.0), f"{p}.one")])])
        gelu = self.op("Mul", [gelu, self.const(np.float32(0.5), f"{p}.half")])
        return self.op("Add", [x, self.linear(gelu, 4 * d, d, f"{p}.ffn2")])


def build(name: str, seed: int = 0) -> onnx.ModelProto:
    """The named transformer-shaped model: token ids [1, SEQ] -> hidden states, or logits for the decoder."""
    d, layers, vocab, decoder = MODELS[name]
    b = _Builder(seed)
    table = (b.rng.standard_normal((vocab, d), dtype=np.float32) * np.float32(0.02)).astype(np.float32)
    x = b.op("Gather", [b.const(table, "embedding"), "input_ids"], axis=0)
    del table
    for i in range(layers):
        x = b.block(x, d, i)
    x = b.layer_norm(x, d, "final_ln")
    width = vocab if decoder else d
    if decoder:
        x = b.linear(x, d, vocab, "lm_head")
    b.nodes[-1].output[0] = "output"
    graph = helper.make_graph(
        b.nodes,
        name,
        [helper.make_tensor_value_info("input_ids", TensorProto.INT64, [1, SEQ])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, [1, SEQ, width])],
        b.inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def model_file(name: str, folder: Path) -> Path:
    """The model written once to folder (built on first use, in a child process).

    Building in this process would leave it gigabytes large, and a child forked from it inherits that resident
    size as the start of its own peak (the kernel carries it over exec into ``ru_maxrss``).
    """
    path = folder / f"{name}.onnx"
    if not path.is_file():
        folder.mkdir(parents=True, exist_ok=True)
        subprocess.run([sys.executable, "-m", "bench.memory", "--child", "build", name, str(path)], check=True)
    return path


def _child_build(name: str, out: str) -> dict[str, object]:
    path = Path(out)
    tmp = path.with_suffix(".tmp")
    onnx.save(build(name), tmp)
    tmp.replace(path)
    return {}


def _peak_mb() -> float:
    """This process's resident high-water mark since the last reset, in MB (10^6 bytes)."""
    with open("/proc/self/status", encoding="ascii") as f:
        line = next(line for line in f if line.startswith("VmHWM:"))
    return int(line.split()[1]) * 1024 / 1e6


def _reset_peak() -> None:
    with open("/proc/self/clear_refs", "w", encoding="ascii") as f:
        f.write("5")


class _PhasePeaks:
    """Peak RSS per phase of a job, from the progress fraction (see onnx_ops.pipeline's shares)."""

    def __init__(self) -> None:
        self.peaks: dict[str, float] = {}
        self.phase = "validate"
        _reset_peak()

    def switch(self, phase: str) -> None:
        if phase != self.phase:
            self.peaks[self.phase] = max(self.peaks.get(self.phase, 0.0), _peak_mb())
            _reset_peak()
            self.phase = phase

    def __call__(self, stage: str, fraction: float) -> None:
        self.switch(next(name for bound, name in _PHASES if fraction < bound))


def _rss_mb() -> float:
    with open("/proc/self/status", encoding="ascii") as f:
        return int(next(line for line in f if line.startswith("VmRSS:")).split()[1]) * 1024 / 1e6


def _child_job(model: str, step: str, out: str) -> dict[str, object]:
    import onnx_ops.passes.quantize  # noqa: F401  (what every job imports, counted in the fixed overhead)
    from onnx_ops.pipeline import compress, save_report

    base = _rss_mb()
    peaks = _PhasePeaks()
    result = compress(model, {"steps": [PLANS[step]]}, progress=peaks)
    peaks.switch("save")
    result.save(out)
    save_report(result.report, out + ".json")
    peaks.switch("done")
    return {"phases": peaks.peaks, "base_mb": base, "size_after": Path(out).stat().st_size}


def _child_ort(model: str, out: str) -> dict[str, object]:
    from onnxruntime.quantization import quantize_dynamic

    base = _rss_mb()
    quantize_dynamic(model, out)
    return {"phases": {}, "base_mb": base, "size_after": Path(out).stat().st_size}


def run_child(args: list[str]) -> dict[str, object]:
    """Run one job in a child process; its peak RSS from wait4, its phase peaks from what it prints.

    Resetting the high-water mark also resets what wait4 reports, so a job's peak is its highest phase peak.
    """
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "bench.memory", "--child", *args], stdout=subprocess.PIPE)
    assert proc.stdout is not None
    text = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    found: dict[str, object] = {
        "seconds": round(time.perf_counter() - start, 1),
        "peak_mb": usage.ru_maxrss * 1024 / 1e6,
    }
    if proc.returncode != 0:
        return found | {"error": f"exit code {proc.returncode}"}
    found |= json.loads(text.decode().strip().splitlines()[-1])
    phases = found["phases"]
    assert isinstance(phases, dict)
    found["peak_mb"] = max([float(found["peak_mb"]), *phases.values()])  # type: ignore[arg-type]
    return found


def _row(model: str, size: int, job: str, found: dict[str, object]) -> str:
    mb = size / 1e6
    peak = float(found["peak_mb"])  # type: ignore[arg-type]
    phases = found.get("phases") or {}
    assert isinstance(phases, dict)
    parts = " / ".join(f"{phases[p] / mb:.1f}" if p in phases else "-" for p in ("validate", "pass", "measure", "save"))
    error = f" ({found['error']})" if "error" in found else ""
    seconds, base = found["seconds"], float(found.get("base_mb", 0.0))  # type: ignore[arg-type]
    above = f"{(peak - base) / mb:.1f}x + {base:.0f} MB"
    peaks = f"{peak / 1000:.2f} GB | {peak / mb:.1f}x{error} | {above}"
    return f"| {model} | {mb:.0f} MB | {job} | {peaks} | {parts} | {seconds} s |"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="*", default=["enc100", "enc400", "dec350"], choices=list(MODELS))
    parser.add_argument("--passes", nargs="*", default=["quantize", "svd", "prune", "ort"], choices=[*PLANS, "ort"])
    parser.add_argument("--dir", type=Path, default=Path(tempfile.gettempdir()) / "bench-memory", help="model files")
    parser.add_argument("--out", type=Path, default=Path("bench/results/memory.json"))
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        kind, *rest = args.child
        jobs: dict[str, Callable[..., dict[str, object]]] = {
            "job": _child_job, "ort": _child_ort, "build": _child_build
        }  # fmt: skip
        print(json.dumps(jobs[kind](*rest)))
        return
    print(
        "| model | file | job | peak RSS | peak / file | (peak - after imports) / file + after imports "
        "| validate / pass / measure / save (x file) | time |"
    )
    print("|---|---|---|---|---|---|---|---|")
    results = []
    for name in args.models:
        path = model_file(name, args.dir)
        size = path.stat().st_size
        for job in args.passes:
            out = str(args.dir / f"{name}.{job}.out.onnx")
            child = ["ort", str(path), out] if job == "ort" else ["job", str(path), job, out]
            found = run_child(child)
            for leftover in (Path(out), Path(out + ".json")):
                leftover.unlink(missing_ok=True)
            results.append({"model": name, "file_bytes": size, "job": job, **found})
            print(_row(name, size, job, found), flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    limit = resource.getrlimit(resource.RLIMIT_AS)[0]
    args.out.write_text(json.dumps({"address_space_limit": limit, "results": results}, indent=2) + "\n")


if __name__ == "__main__":
    main()
