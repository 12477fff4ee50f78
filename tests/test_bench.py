"""Smoke test of the benchmark on one tiny model: every column is filled in and the outputs are written."""

from __future__ import annotations

import json

import numpy as np
import pytest

from bench import compare, output, tasks
from tests import models


def test_benchmark_measures_ours_and_onnxruntime_on_a_tiny_model(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(compare, "BLOCKS", 1)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((6, 1, 64)).astype(np.float32)
    task = tasks.Task("tiny_mlp", "3-layer MLP", models.mlp(), {"x": x[:3]}, {"x": x}, {"x": [1, 64]}, "top-1 %",
                      lambda outs: 100.0 * float(np.mean([o[0].argmax() == 0 for o in outs])))  # fmt: skip
    bench = compare.Bench(task, runs=3, workdir=tmp_path)
    rows = [
        bench.measure("int8 dynamic", "ours", lambda: bench.ours([{"kind": "quantize"}])),
        bench.measure("quantize_dynamic", "onnxruntime", bench.ort_dynamic),
        bench.measure("svd", "ours", lambda: bench.ours([{"kind": "svd", "op_types": ["Gemm"]}])),  # refused: no Gemm
    ]
    for row in rows[:2]:
        assert row.error is None and 0.1 < row.size_ratio < 0.5 and row.latency_ratio_1t > 0
        assert row.cosine > 0.99 and row.score is not None and row.score_fp32 is not None
    assert rows[2].error and not rows[2].accurate
    result = {"environment": compare.environment(), "models": {
        "rows": [r.__dict__ | {"accurate": r.accurate} for r in rows], "descriptions": {},
        "best_chain": {}, "verdicts": compare.verdicts(rows)}}  # fmt: skip
    output.write(result, tmp_path / "out")
    saved = json.loads((tmp_path / "out" / "latest.json").read_text())
    assert saved["models"]["verdicts"][0]["model"] == "tiny_mlp"
    assert "int8 dynamic" in (tmp_path / "out" / "latest.html").read_text()
    assert "machine:" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("score", "cosine", "accurate"), [(97.0, 0.985, True), (95.0, 0.999, False), (97.0, 0.9, False)]
)
def test_accuracy_budget(score, cosine, accurate):
    row = compare.Row("m", "v", "ours", cosine=cosine, score=score, score_fp32=97.5)
    assert row.accurate is accurate
