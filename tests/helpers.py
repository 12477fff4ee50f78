"""Numerical checks against ONNX Runtime shared by the tests."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort


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
