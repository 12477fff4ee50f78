"""Time SvdFactorizePass on a BERT-base-sized stack of MatMuls (12 layers x 4x768x768, 768x3072, 3072x768).

Usage, from the repository root:

    python -m bench.svd_speed [--layers 12] [--algorithm auto] [--spectra random power exp]

Weights are random Gaussian (flat spectrum: energy 0.99 keeps nearly full rank, so nothing pays and every matrix is
skipped) or W = U diag(s) V^T with s_i = 1/i (power) or s_i = exp(-i/40) (exp), closer to trained layers.
The model is built in memory; only the pass is timed.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx_ir as ir

from onnx_ops.passes._base import PassContext
from onnx_ops.passes.svd import SvdFactorizePass
from onnx_ops.plan import SvdStep

HIDDEN, FFN = 768, 3072


def _shapes(layers: int) -> list[tuple[int, int]]:
    return [(HIDDEN, HIDDEN)] * 4 * layers + [(HIDDEN, FFN), (FFN, HIDDEN)] * layers


def _weight(rng: np.random.Generator, k: int, n: int, spectrum: str) -> np.ndarray:
    if spectrum == "random":
        return (rng.standard_normal((k, n)) / np.sqrt(k)).astype(np.float32)
    m = min(k, n)
    i = np.arange(1, m + 1)
    s = 1.0 / i if spectrum == "power" else np.exp(-i / 40.0)
    u = np.linalg.qr(rng.standard_normal((k, m)))[0]
    v = np.linalg.qr(rng.standard_normal((n, m)))[0]
    return ((u * s) @ v.T).astype(np.float32)


def build(layers: int, spectrum: str, seed: int = 0) -> ir.Model:
    """A chain x -> MatMul -> MatMul ... over [batch, seq, hidden] activations, like a transformer's linears."""
    rng = np.random.default_rng(seed)
    x = ir.val("x", ir.DataType.FLOAT, ["batch", "seq", HIDDEN])
    graph = ir.Graph([x], [], nodes=[], opset_imports={"": 17}, name=f"bert_{spectrum}")
    h = x
    for i, (k, n) in enumerate(_shapes(layers)):
        w = _weight(rng, k, n, spectrum)
        wv = ir.val(f"W{i}", ir.DataType.FLOAT, [k, n], const_value=ir.tensor(w, name=f"W{i}"))
        graph.register_initializer(wv)
        node = ir.node("MatMul", [h, wv], name=f"mm{i}")
        graph.append(node)
        h = node.outputs[0]
    h.name, h.dtype = "y", ir.DataType.FLOAT
    graph.outputs.append(h)
    return ir.Model(graph, ir_version=8)


def run(model: ir.Model, step: SvdStep, label: str) -> float:
    """Run the pass once, print one line of figures, and return its wall time."""
    params = sum(v.const_value.size for v in model.graph.initializers.values())
    svd = SvdFactorizePass(step, PassContext(workdir=Path(tempfile.gettempdir())))
    start = time.perf_counter()
    svd(model)
    seconds = time.perf_counter() - start
    s = svd.log.summary
    done, count = s["matrices_factorized"], s["matrices_factorized"] + s["matrices_skipped"]
    algorithms = sorted({(c.note or "").rsplit("(", 1)[-1].rstrip(")") for c in svd.log.layers})
    print(
        f"{label:<32} {seconds:5.1f} s  factorized {done:>2}/{count:<2}  params {params / 1e6:5.2f}M -> "
        f"{(params - s['params_saved']) / 1e6:5.2f}M  worst rel err {s['worst_rel_error']:.4f}  {'/'.join(algorithms)}"
    )
    if svd.log.skipped:
        print(f"{'':<32} skipped, e.g. {svd.log.skipped[0].name}: {svd.log.skipped[0].reason}")
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--algorithm", choices=["auto", "exact", "randomized"], default="auto")
    parser.add_argument("--spectra", nargs="+", choices=["random", "power", "exp"], default=["random", "power", "exp"])
    args = parser.parse_args()
    shapes = _shapes(args.layers)
    print(
        f"{args.layers} layers, {len(shapes)} matrices, {sum(k * n for k, n in shapes) / 1e6:.1f}M weights, "
        f"{os.cpu_count()} cpus, algorithm={args.algorithm}"
    )
    worst = 0.0
    for spectrum in args.spectra:
        for rule in ({"energy": 0.99}, {"rank_ratio": 0.25}):
            step = SvdStep(**rule, algorithm=args.algorithm)  # type: ignore[arg-type]
            name, value = next(iter(rule.items()))
            worst = max(worst, run(build(args.layers, spectrum), step, f"{spectrum} spectrum, {name} {value}"))
    print(f"slowest run: {worst:.1f} s")


if __name__ == "__main__":
    main()
