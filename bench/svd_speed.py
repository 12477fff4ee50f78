"""Time SvdFactorizePass on a BERT-base-sized stack of MatMuls (12 layers x 4x768x768, 768x3072, 3072x768).

Usage, from the repository root:

    python -m bench.svd_speed [--layers 12] [--algorithms auto exact] [--spectra trained minilm]

Spectra (W = U diag(s) V^T with random orthogonal U, V):

* trained: a Gaussian matrix's singular values (the Marchenko-Pastur bulk of a trained layer's noise) times
  i^-0.3, so energy 0.9 keeps about 240 of 768 and energy 0.99 about 500, as in trained BERT-base layers;
* minilm: the real spectra of paraphrase-MiniLM-L3-v2's attention and FFN matrices (when its package is
  installed), stretched to the BERT-base shapes;
* random (flat: nothing pays, every matrix is skipped), power (s_i = 1/i) and exp (s_i = exp(-i/40)),
  idealised spectra for reference.

The model is built in memory; only the pass is timed, by wall clock and by the process's CPU time (all threads).
"""

from __future__ import annotations

import argparse
import functools
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
SPECTRA = ("trained", "minilm", "random", "power", "exp")
RULES = ({"energy": 0.9}, {"energy": 0.99}, {"rank_ratio": 0.25})


def _shapes(layers: int) -> list[tuple[int, int]]:
    return [(HIDDEN, HIDDEN)] * 4 * layers + [(HIDDEN, FFN), (FFN, HIDDEN)] * layers


def _minilm_profiles() -> dict[str, np.ndarray]:
    """Singular values of MiniLM-L3's square and FFN matrices, each scaled to s_1 = 1 (empty if not installed)."""
    import onnx

    from tests import real_models

    path = real_models.locate("minilm_l3")
    if path is None:
        return {}
    profiles: dict[str, list[np.ndarray]] = {"square": [], "ffn": []}
    for tensor in onnx.load(path).graph.initializer:
        if len(tensor.dims) == 2 and min(tensor.dims) >= 256:
            s = np.linalg.svd(onnx.numpy_helper.to_array(tensor).astype(np.float64), compute_uv=False)
            profiles["square" if tensor.dims[0] == tensor.dims[1] else "ffn"].append(s / s[0])
    return {kind: np.mean(values, axis=0) for kind, values in profiles.items() if values}


def _values(rng: np.random.Generator, k: int, n: int, spectrum: str, profiles: dict[str, np.ndarray]) -> np.ndarray:
    m = min(k, n)
    i = np.arange(1, m + 1)
    if spectrum == "power":
        return 1.0 / i
    if spectrum == "exp":
        return np.exp(-i / 40.0)
    if spectrum == "minilm":
        profile = profiles["square" if k == n else "ffn"]
        return np.interp(i / m, np.arange(1, len(profile) + 1) / len(profile), profile)
    return _bulk(m, max(k, n)) * i**-0.3


@functools.cache
def _bulk(m: int, n: int) -> np.ndarray:
    """Singular values of an m x n Gaussian matrix (one draw per shape: the spectrum, not its noise, matters)."""
    rng = np.random.default_rng(m * n)
    return np.linalg.svd(rng.standard_normal((m, n)) / np.sqrt(n), compute_uv=False)


def _weight(rng: np.random.Generator, k: int, n: int, spectrum: str, profiles: dict[str, np.ndarray]) -> np.ndarray:
    if spectrum == "random":
        return (rng.standard_normal((k, n)) / np.sqrt(k)).astype(np.float32)
    s = _values(rng, k, n, spectrum, profiles)
    u, v = _orthonormal(k, min(k, n)), _orthonormal(n, min(k, n))
    u, v = u[rng.permutation(k)] * rng.choice([-1.0, 1.0], k)[:, None], v[rng.permutation(n)]  # still orthonormal
    return ((u * s) @ v.T).astype(np.float32)


@functools.cache
def _orthonormal(rows: int, cols: int) -> np.ndarray:
    """One random matrix with orthonormal columns per shape; each weight permutes its rows (building stays cheap)."""
    return np.linalg.qr(np.random.default_rng(rows + cols).standard_normal((rows, cols)))[0]


def build(layers: int, spectrum: str, seed: int = 0) -> ir.Model:
    """A chain x -> MatMul -> MatMul ... over [batch, seq, hidden] activations, like a transformer's linears."""
    rng = np.random.default_rng(seed)
    profiles = _minilm_profiles() if spectrum == "minilm" else {}
    if spectrum == "minilm" and not profiles:
        raise SystemExit("the minilm spectrum needs paraphrase-MiniLM-L3-v2 installed (see bench/README.md)")
    x = ir.val("x", ir.DataType.FLOAT, ["batch", "seq", HIDDEN])
    graph = ir.Graph([x], [], nodes=[], opset_imports={"": 17}, name=f"bert_{spectrum}")
    h = x
    for i, (k, n) in enumerate(_shapes(layers)):
        w = _weight(rng, k, n, spectrum, profiles)
        wv = ir.val(f"W{i}", ir.DataType.FLOAT, [k, n], const_value=ir.tensor(w, name=f"W{i}"))
        graph.register_initializer(wv)
        node = ir.node("MatMul", [h, wv], name=f"mm{i}")
        graph.append(node)
        h = node.outputs[0]
    h.name, h.dtype = "y", ir.DataType.FLOAT
    graph.outputs.append(h)
    return ir.Model(graph, ir_version=8)


def run(model: ir.Model, step: SvdStep, label: str) -> tuple[float, float]:
    """Run the pass once, print one line of figures, and return its wall and CPU seconds."""
    params = sum(v.const_value.size for v in model.graph.initializers.values())
    svd = SvdFactorizePass(step, PassContext(workdir=Path(tempfile.gettempdir())))
    wall, cpu = time.perf_counter(), time.process_time()
    svd(model)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    s = svd.log.summary
    done, count = s["matrices_factorized"], s["matrices_factorized"] + s["matrices_skipped"]
    ranks = [c.rank or 0 for c in svd.log.layers if c.shape_before == [HIDDEN, HIDDEN]]
    square = f"median rank {int(np.median(ranks))}/{HIDDEN}" if ranks else "no 768x768 factorized"
    algorithms = sorted({(c.note or "").rsplit("(", 1)[-1].rstrip(")") for c in svd.log.layers})
    print(
        f"{label:<42} {wall:6.1f} s wall {cpu:6.1f} s cpu  factorized {done:>2}/{count:<2}  {square:<22} "
        f"params {params / 1e6:5.2f}M -> {(params - s['params_saved']) / 1e6:5.2f}M  {'/'.join(algorithms)}",
        flush=True,
    )
    return wall, cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--algorithms", nargs="+", choices=["auto", "exact", "randomized"], default=["auto"])
    parser.add_argument("--spectra", nargs="+", choices=SPECTRA, default=["trained", "minilm"])
    args = parser.parse_args()
    shapes = _shapes(args.layers)
    print(
        f"{args.layers} layers, {len(shapes)} matrices, {sum(k * n for k, n in shapes) / 1e6:.1f}M weights, "
        f"{os.cpu_count()} cpus, load average {os.getloadavg()[0]:.1f}"
    )
    worst = (0.0, 0.0)
    for spectrum in args.spectra:
        for algorithm in args.algorithms:
            for rule in RULES:
                step = SvdStep(**rule, algorithm=algorithm)  # type: ignore[arg-type]
                name, value = next(iter(rule.items()))
                label = f"{spectrum}, {name} {value}, {algorithm}"
                worst = max(worst, run(build(args.layers, spectrum), step, label))
    print(f"slowest run: {worst[0]:.1f} s wall, {worst[1]:.1f} s cpu")


if __name__ == "__main__":
    main()
