"""The latency comparison: the interval's statistics, the verdict, and right answers on a busy host.

The timing tests load the CPU on purpose (spinning processes started here) and assert only what the method
promises there: the ratio of two models of known relative cost lies in the reported interval (within a
tolerance for ONNX Runtime's per-call overhead) and the verdict follows it; two copies of one model give "no
measurable change". They never assert a wall-clock figure.
"""

from __future__ import annotations

import contextlib
import subprocess
import sys
from collections.abc import Iterator

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnx_ops.evaluate import Runner, compare_latency
from onnx_ops.timing import TimingSettings, median_interval, speed_text, verdict

_WIDTH, _BATCH = 768, 256  # one layer is ~300 MFLOP: ONNX Runtime's per-call overhead is ~1% of it
_SETTINGS = TimingSettings(warmup=3, min_pairs=20, seconds=30.0, target_width=0.1)


def _chain(layers: int, seed: int = 0) -> onnx.ModelProto:
    """x[N, W] -> MatMul(W_i) for i < layers, each layer its own weight: compute and memory traffic both scale
    with the number of layers (a shared weight would stay in cache, which a busy host makes cost less alike)."""
    rng = np.random.default_rng(seed)
    weights = [(rng.standard_normal((_WIDTH, _WIDTH)) / np.sqrt(_WIDTH)).astype(np.float32) for _ in range(layers)]
    nodes, previous = [], "x"
    for i in range(layers):
        output = "y" if i == layers - 1 else f"h{i}"
        nodes.append(helper.make_node("MatMul", [previous, f"W{i}"], [output], name=f"mm{i}"))
        previous = output
    graph = helper.make_graph(
        nodes,
        f"chain{layers}",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", _WIDTH])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", _WIDTH])],
        [numpy_helper.from_array(w, f"W{i}") for i, w in enumerate(weights)],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


@contextlib.contextmanager
def _busy(processes: int) -> Iterator[None]:
    """`processes` child processes spinning on the CPU for as long as the block runs."""
    spinners = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(processes)]
    try:
        yield
    finally:
        for spinner in spinners:
            spinner.kill()
        for spinner in spinners:
            spinner.wait()


def _feed() -> dict[str, np.ndarray]:
    return {"x": np.random.default_rng(1).standard_normal((_BATCH, _WIDTH)).astype(np.float32)}


def test_median_interval_uses_the_binomial_order_statistics():
    values = np.arange(1.0, 11.0)  # n = 10: [x(2), x(9)] covers 1 - 2 * 11/1024 = 0.979; [x(3), x(8)] only 0.891
    mid, low, high, coverage = median_interval(values[::-1])
    assert (mid, low, high) == (5.5, 2.0, 9.0) and coverage == pytest.approx(1 - 22 / 1024)
    mid, low, high, coverage = median_interval(np.arange(1.0, 6.0))  # too few for 95%: [min, max], 1 - 2/32
    assert (low, high) == (1.0, 5.0) and coverage == pytest.approx(0.9375)
    many = np.random.default_rng(0).normal(2.0, 0.1, 400)
    mid, low, high, coverage = median_interval(many)
    assert low < 2.0 < high and high - low < 0.05 and coverage >= 0.95


@pytest.mark.parametrize(
    ("low", "high", "mid", "expected"),
    [
        (0.50, 0.55, 0.52, "faster"),
        (1.80, 2.00, 1.90, "slower"),
        (0.90, 1.10, 0.97, "no measurable change"),  # the interval includes 1
        (1.01, 1.04, 1.03, "no measurable change"),  # excludes 1, but under the smallest reported change
        (1.05, 1.09, 1.07, "no measurable change"),
        (0.30, 1.20, 0.50, "no measurable change"),  # a median of 0.5 means nothing with this interval
    ],
)
def test_verdict_needs_an_interval_that_excludes_one(low, high, mid, expected):
    assert verdict(low, high, mid, 0.1) == expected


def test_one_thread_sessions_compute_on_the_calling_thread():
    # The premise of the thread-CPU basis, checked with the session options the library uses: when work
    # leaves the calling thread, process CPU time exceeds the thread's and compare() says so in `note`.
    model = _chain(2).SerializeToString()
    timed = compare_latency(
        Runner(model, threads=1), Runner(model, threads=1), _feed(), settings=_SETTINGS, batch=_BATCH
    )
    c = timed.comparison
    assert c.basis == "thread_cpu" and c.note == "" and c.threads == 1
    assert timed.baseline.cpu_p50_ms is not None and timed.baseline.cpu_p50_ms > 0
    assert timed.baseline.throughput_per_s == pytest.approx(1000.0 / timed.baseline.p50_ms * _BATCH)


@pytest.mark.parametrize(
    ("baseline", "candidate", "expected", "direction"), [(2, 4, 2.0, "slower"), (4, 2, 0.5, "faster")]
)
def test_known_cost_ratio_is_found_under_cpu_contention(baseline, candidate, expected, direction):
    a, b = Runner(_chain(baseline), threads=1), Runner(_chain(candidate), threads=1)
    with _busy(3):
        c = compare_latency(a, b, _feed(), settings=_SETTINGS).comparison
    # The true ratio is `expected` less ONNX Runtime's per-call overhead (a few % of the cheaper model).
    assert c.ratio_low / 1.12 <= expected <= c.ratio_high * 1.12, c
    assert c.verdict == direction and not (c.ratio_low <= 1.0 <= c.ratio_high), c
    assert direction in speed_text(c) and f"{max(c.ratio, 1 / c.ratio):.1f}x" in speed_text(c)


def test_identical_models_under_cpu_contention_show_no_measurable_change():
    model = _chain(3).SerializeToString()
    with _busy(3):
        c = compare_latency(Runner(model, threads=1), Runner(model, threads=1), _feed(), settings=_SETTINGS).comparison
    assert c.verdict == "no measurable change", c
    assert speed_text(c).startswith("no measurable change")


def test_several_threads_use_process_cpu_time_and_say_so():
    model = _chain(2).SerializeToString()
    settings = TimingSettings(warmup=2, min_pairs=10, seconds=0.0)
    c = compare_latency(Runner(model, threads=2), Runner(model, threads=2), _feed(), settings=settings).comparison
    assert c.basis == "process_cpu" and c.threads == 2 and c.pairs == 10
    assert c.contention.cores >= 1 and len(c.contention.load_average) == 3


def test_too_few_pairs_never_call_a_change():
    # 4 pairs give 2 ratios: an interval of 50% coverage, however far from 1 they are.
    settings = TimingSettings(warmup=1, min_pairs=4, seconds=0.0)
    c = compare_latency(Runner(_chain(1), threads=1), Runner(_chain(4), threads=1), _feed(), settings=settings)
    assert c.comparison.pairs == 4 and c.comparison.confidence == pytest.approx(0.5)
    assert c.comparison.verdict == "no measurable change" and c.comparison.ratio > 1


_UNDER_CPU_LIMIT = """
import resource, numpy as np
from onnx import TensorProto, helper
from onnx_ops.evaluate import Runner, compare_latency
from onnx_ops.timing import TimingSettings, speed_text
resource.setrlimit(resource.RLIMIT_CPU, (3600, 3600))  # as every job process does
node = helper.make_node("Relu", ["x"], ["y"])
graph = helper.make_graph([node], "tiny", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])])
model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]).SerializeToString()
settings = TimingSettings(warmup=2, min_pairs=40, seconds=0.0)
feed = {"x": np.ones((1, 4), np.float32)}
c = compare_latency(Runner(model, threads=2), Runner(model, threads=2), feed, settings=settings).comparison
print(c.basis, c.ratio, c.verdict, speed_text(c))
"""


def test_runs_shorter_than_the_cpu_clock_tick_under_a_cpu_limit_are_timed_by_the_wall_clock():
    # With RLIMIT_CPU set, Linux samples the process-wide CPU clock from its timer accumulators, which move at
    # scheduler ticks: microsecond runs read 0 ms and the ratio was 0 ("infinitely faster").
    out = subprocess.run([sys.executable, "-c", _UNDER_CPU_LIMIT], capture_output=True, text=True, check=True)
    basis, ratio, *rest = out.stdout.split()
    assert basis in ("wall", "process_cpu") and 0 < float(ratio) < 100, out.stdout
    assert " ".join(rest).startswith("no measurable change") or "x " in " ".join(rest)
