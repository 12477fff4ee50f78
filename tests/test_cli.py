"""The onnx-compress command, run as a user runs it."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import onnx
import onnxruntime as ort

import models

FAST = {"latency_runs": 3, "warmup_runs": 1}


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "onnx_ops.cli", *map(str, args)], capture_output=True, text=True)


def test_compress_writes_model_and_reports(tmp_path):
    onnx.save(models.mlp(), tmp_path / "m.onnx")
    plan = tmp_path / "plan.json"
    plan.write_text(json.dumps({"steps": [{"kind": "prune", "sparsity": 0.5}], "evaluation": FAST}))
    x = np.random.default_rng(0).standard_normal((10, 64)).astype(np.float32)
    np.savez(tmp_path / "eval.npz", x=x, labels=np.zeros(10, np.int64))
    proc = _cli(
        "compress",
        tmp_path / "m.onnx",
        "-o",
        tmp_path / "small.onnx",
        "--plan",
        plan,
        "--eval",
        tmp_path / "eval.npz",
        "--report",
        tmp_path / "r.json",
        "--report-html",
        tmp_path / "r.html",
    )
    assert proc.returncode == 0, proc.stderr
    assert "gzip" in proc.stdout and "accuracy" in proc.stdout
    ort.InferenceSession(str(tmp_path / "small.onnx"), providers=["CPUExecutionProvider"])
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["schema_version"] == "1.2" and report["data"]["source"] == "evaluation"
    assert report["after"]["zero_fraction"] > 0.3
    assert "<svg" in (tmp_path / "r.html").read_text()


def test_inline_plan_and_input_shape(tmp_path):
    onnx.save(models.lstm(), tmp_path / "m.onnx")
    plan = json.dumps({"steps": [{"kind": "prune", "min_elements": 0}], "evaluation": FAST})
    proc = _cli("compress", tmp_path / "m.onnx", "-o", tmp_path / "o.onnx", "--plan", plan, "--input-shape", "x=3,1,16")
    assert proc.returncode == 0, proc.stderr


def test_bad_model_gives_one_line_error_and_no_traceback(tmp_path):
    (tmp_path / "m.onnx").write_text("this is not a model")
    proc = _cli("compress", tmp_path / "m.onnx", "-o", tmp_path / "o.onnx", "--plan", '{"steps":[{"kind":"prune"}]}')
    assert proc.returncode == 2
    assert proc.stderr.startswith("error (invalid_model):") and "Traceback" not in proc.stderr
    assert not (tmp_path / "o.onnx").exists()


def test_bad_plan_is_refused(tmp_path):
    onnx.save(models.mlp(), tmp_path / "m.onnx")
    proc = _cli(
        "compress",
        tmp_path / "m.onnx",
        "-o",
        tmp_path / "o.onnx",
        "--plan",
        '{"steps":[{"kind":"quantize"},{"kind":"svd"}]}',
    )
    assert proc.returncode == 2 and "quantize must be the last step" in proc.stderr


def test_plan_schema_documents_every_step():
    proc = _cli("plan-schema")
    schema = json.loads(proc.stdout)
    assert {"PruneStep", "SvdStep", "QuantizeStep"} <= set(schema["$defs"])
    assert "description" in schema["$defs"]["PruneStep"]["properties"]["method"]


def test_inspect_lists_inputs(tmp_path):
    onnx.save(models.conv_net(), tmp_path / "m.onnx")
    proc = _cli("inspect", tmp_path / "m.onnx")
    info = json.loads(proc.stdout)
    assert info["inputs"][0]["name"] == "image" and info["op_counts"]["Conv"] == 2
