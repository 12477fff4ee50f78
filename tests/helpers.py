"""Numerical checks against ONNX Runtime shared by the tests, and a scripted timer for timing-driven decisions."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from onnx_ops.report import Contention, LatencyComparison
from onnx_ops.timing import TimingSettings, verdict

_MIN_CHANGE = TimingSettings().min_change


def run(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    """Run a model on CPU with ONNX Runtime and return all outputs."""
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, feeds)


def random_feeds(
    model: onnx.ModelProto, batch: int = 4, seed: int = 0, dims: dict[str, int] | None = None
) -> dict[str, np.ndarray]:
    """Standard-normal float inputs; symbolic dims take `dims[name]` or `batch`."""
    rng = np.random.default_rng(seed)
    feeds = {}
    init_names = {i.name for i in model.graph.initializer}
    for inp in model.graph.input:
        if inp.name in init_names:
            continue
        shape = [
            d.dim_value if d.HasField("dim_value") else (dims or {}).get(d.dim_param, batch)
            for d in inp.type.tensor_type.shape.dim
        ]
        feeds[inp.name] = rng.standard_normal(shape).astype(np.float32)
    return feeds


def assert_outputs_close(
    new: onnx.ModelProto, ref: onnx.ModelProto, atol: float, feeds: dict[str, np.ndarray] | None = None
) -> float:
    """Assert every output of `new` is within atol of `ref` on the same inputs; return the max abs error."""
    feeds = feeds or random_feeds(ref)
    got, want = run(new, feeds), run(ref, feeds)
    assert len(got) == len(want)
    worst = 0.0
    for g, w in zip(got, want, strict=True):
        assert g.shape == w.shape
        err = float(np.max(np.abs(g.astype(np.float64) - w)))
        worst = max(worst, err)
    assert worst <= atol, f"max abs error {worst} > {atol}"
    return worst


# Evaluation options of tests that assert no latency figure: a few timed pairs and no time budget to go on
# (the default times at least 50 pairs and goes on for up to 10 s until the interval is narrow).
NO_LATENCY = {"latency_runs": 3, "warmup_runs": 1, "latency_seconds": 0.0}


def scripted_comparison(ratio: float, spread: float = 0.02) -> LatencyComparison:
    """A timing result with this median ratio and an interval of +-spread, as the timer would report it.

    Tests of decisions taken on a timing (fall back, keep, choose) script the timer with these: a real timing's
    verdict on a loaded host is a draw, and a test's pass/fail must not be. Timing itself is tested in
    tests/test_timing.py and measured by `python -m bench.latency`.
    """
    low, high = ratio * (1 - spread), ratio * (1 + spread)
    contention = Contention(load_average=[0.0, 0.0, 0.0], cores=2, wall_over_cpu=1.0, wall_p90_over_p50=1.1, busy=False)
    return LatencyComparison(
        method="interleaved pairs", basis="thread_cpu", threads=1, pairs=40, ratio=ratio, ratio_low=low,
        ratio_high=high, confidence=0.95, wall_ratio=ratio, wall_ratio_low=low, wall_ratio_high=high,
        verdict=verdict(low, high, ratio, _MIN_CHANGE), min_change=_MIN_CHANGE, target_width=0.1, reached_target=True,
        contention=contention,
    )  # fmt: skip


def script_search_timing(monkeypatch: pytest.MonkeyPatch, ratio: float = 1.0) -> list[float]:
    """Make every timing of the auto search (candidates, confirmations, head-to-heads) report `ratio`.

    ONNX Runtime still builds and runs every candidate; only the timer is replaced. Returns a list that grows by
    one entry per timing asked for.
    """
    from onnx_ops import auto, auto_choose

    asked: list[float] = []

    def timed(*args: object, **kwargs: object) -> SimpleNamespace:
        asked.append(ratio)
        return SimpleNamespace(comparison=scripted_comparison(ratio))

    monkeypatch.setattr(auto, "compare_latency", timed)
    monkeypatch.setattr(auto_choose, "compare_latency", timed)
    return asked
