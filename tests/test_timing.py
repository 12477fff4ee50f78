"""The latency comparison: the interval's statistics, the verdict, the CPU-time basis and its fallbacks.

Nothing here asserts a figure that depends on the host's load: whether the method finds a known cost ratio
under CPU contention is measured by `python -m bench.latency --only chain` (a timed assertion under load fails
on a loaded host sooner or later), not by a test.
"""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from bench.latency import chain as _chain
from onnx_ops.evaluate import Runner, compare_latency
from onnx_ops.timing import TimingSettings, median_interval, verdict

_WIDTH, _BATCH = 768, 256
_SETTINGS = TimingSettings(warmup=3, min_pairs=20, seconds=30.0, target_width=0.1)


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
from bench.latency import chain as _chain
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
