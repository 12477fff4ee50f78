"""Does structured pruning make an MLP faster in ONNX Runtime? Time it, interleaved, before and after.

Usage (from the repository root): python -m bench.structured_prune [--sparsity 0.5] [--batch 32] [--runs 300]

Builds a ReLU MLP 512-2048-2048-2048-10 (MatMul + Add + Relu, random weights) with onnx.helper, removes
``sparsity`` of the neurons of every hidden layer with MagnitudePrunePass, and times both models in one process:
after a warm-up the two sessions run alternately, so drifts in CPU clock or load hit both equally. This is done
once with intra_op_num_threads=1 and once with ONNX Runtime's default thread count.
"""

from __future__ import annotations

import argparse
import itertools
import time
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from onnx_ops.passes._base import PassContext
from onnx_ops.passes.prune import MagnitudePrunePass
from onnx_ops.plan import PruneStep

SIZES = (512, 2048, 2048, 2048, 10)


def build(seed: int = 0) -> onnx.ModelProto:
    rng = np.random.default_rng(seed)
    nodes, inits, prev = [], [], "x"
    for i, (k, n) in enumerate(itertools.pairwise(SIZES)):
        last = i == len(SIZES) - 2
        inits += [
            numpy_helper.from_array((rng.standard_normal((k, n)) * np.sqrt(2.0 / k)).astype(np.float32), f"W{i}"),
            numpy_helper.from_array((0.05 * rng.standard_normal(n)).astype(np.float32), f"b{i}"),
        ]
        out = "logits" if last else f"h{i}"
        nodes += [
            helper.make_node("MatMul", [prev, f"W{i}"], [f"mm{i}"], name=f"fc{i}"),
            helper.make_node("Add", [f"mm{i}", f"b{i}"], [f"z{i}" if not last else out], name=f"bias{i}"),
        ]
        if not last:
            nodes.append(helper.make_node("Relu", [f"z{i}"], [out], name=f"relu{i}"))
        prev = out
    graph = helper.make_graph(
        nodes,
        "mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", SIZES[0]])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", SIZES[-1]])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def prune(proto: onnx.ModelProto, sparsity: float) -> tuple[onnx.ModelProto, MagnitudePrunePass]:
    model = ir.from_proto(proto)
    step = MagnitudePrunePass(PruneStep(method="structured", sparsity=sparsity), PassContext(workdir=Path(".")))
    step.precheck(model)
    step(model)
    return ir.to_proto(model), step


def parameters(proto: onnx.ModelProto) -> int:
    return sum(int(np.prod(t.dims)) for t in proto.graph.initializer)


def session(proto: onnx.ModelProto, threads: int) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    return ort.InferenceSession(proto.SerializeToString(), options, providers=["CPUExecutionProvider"])


def interleaved(
    before: ort.InferenceSession, after: ort.InferenceSession, feed: dict[str, np.ndarray], runs: int, warmup: int
) -> tuple[np.ndarray, np.ndarray]:
    """Milliseconds per run of each session, alternating which one goes first."""
    for _ in range(warmup):
        before.run(None, feed)
        after.run(None, feed)
    times: dict[int, list[float]] = {0: [], 1: []}
    sessions = (before, after)
    for i in range(runs):
        for which in (i % 2, 1 - i % 2):
            start = time.perf_counter()
            sessions[which].run(None, feed)
            times[which].append((time.perf_counter() - start) * 1e3)
    return np.array(times[0]), np.array(times[1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sparsity", type=float, default=0.5)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--runs", type=int, default=300)
    parser.add_argument("--warmup", type=int, default=20)
    args = parser.parse_args()

    original = build()
    start = time.perf_counter()
    pruned, step = prune(original, args.sparsity)
    seconds = time.perf_counter() - start
    p0, p1 = parameters(original), parameters(pruned)
    print(f"MLP {'-'.join(map(str, SIZES))}, structured sparsity {args.sparsity}, batch {args.batch}")
    print(f"pass time: {seconds:.2f} s; summary: {step.log.summary}")
    for change in step.log.layers:
        print(f"  {change.name:5s} {change.weight:3s} {change.shape_before} -> {change.shape_after}")
    print(f"parameters: {p0:,} -> {p1:,} ({p1 / p0:.3f}x)")
    feed = {"x": np.random.default_rng(1).standard_normal((args.batch, SIZES[0])).astype(np.float32)}
    for threads in (1, 0):
        label = "intra_op_num_threads=1" if threads == 1 else "intra_op_num_threads=default"
        before, after = interleaved(session(original, threads), session(pruned, threads), feed, args.runs, args.warmup)
        b50, a50 = np.percentile(before, 50), np.percentile(after, 50)
        b90, a90 = np.percentile(before, 90), np.percentile(after, 90)
        print(
            f"{label}: p50 {b50:.3f} -> {a50:.3f} ms, p90 {b90:.3f} -> {a90:.3f} ms, "
            f"p50 ratio after/before {a50 / b50:.3f} ({args.runs} runs each, interleaved)"
        )


if __name__ == "__main__":
    main()
