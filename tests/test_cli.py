"""The onnx-compress command, run as a user runs it."""

from __future__ import annotations

import json
import os
import pty
import re
import signal
import subprocess
import sys

import numpy as np
import onnx
import onnxruntime as ort

import models

FAST = {"latency_runs": 3, "warmup_runs": 1, "latency_seconds": 0.0}  # no 10 s of timing per command


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
    assert proc.stderr.splitlines()[-1].startswith("error (invalid_model):") and "Traceback" not in proc.stderr
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


def _in_a_terminal(*args: str) -> tuple[int, str]:
    """Run the CLI with stdout and stderr on a pseudo-terminal, as a user at a shell does; (exit code, output)."""
    pid, fd = pty.fork()
    if pid == 0:  # the child: exec at once, nothing else
        os.execv(sys.executable, [sys.executable, "-m", "onnx_ops.cli", *map(str, args)])
    chunks = []
    while True:
        try:
            chunk = os.read(fd, 65536)
        except OSError:  # EIO: the child closed the terminal
            break
        if not chunk:
            break
        chunks.append(chunk)
    os.close(fd)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status), b"".join(chunks).decode(errors="replace")


def _static_args(tmp_path):
    """Arguments of a static quantization of a small CNN with 12 calibration samples."""
    onnx.save(models.conv_net(), tmp_path / "m.onnx")
    images = np.random.default_rng(0).standard_normal((12, 3, 16, 16)).astype(np.float32)
    np.savez(tmp_path / "calib.npz", image=images)
    plan = json.dumps({"steps": [{"kind": "quantize", "mode": "static"}], "evaluation": FAST})
    calibration = tmp_path / "calib.npz"
    return ["compress", tmp_path / "m.onnx", tmp_path / "o.onnx", "--plan", plan, "--calibration", calibration]


def test_progress_is_a_bar_that_moves_on_a_terminal(tmp_path):
    code, out = _in_a_terminal(*_static_args(tmp_path))
    assert code == 0, out
    frames = [f for f in out.split("\r") if f.startswith("\x1b[2K[")]  # each redraw: erase the line, draw the bar
    percents = [int(m) for f in frames for m in re.findall(r"\]\s+(\d+)% ", f)]
    assert len(set(percents)) > 2 and percents == sorted(percents), percents
    assert any("calibration batch" in f and "/12" in f for f in frames)  # ONNX Runtime's calibration, counted
    assert any("measuring: compressed model on sample 12/12" in f for f in frames)
    assert "cosine" in out.rsplit("\x1b[2K", 1)[-1]  # the summary follows the erased bar


def test_progress_without_a_terminal_is_plain_lines_and_quiet_silences_it(tmp_path):
    args = _static_args(tmp_path)
    proc = _cli(*args)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stderr.splitlines()
    assert "\r" not in proc.stderr and "[  0%] validate" in lines and "[ 98%] measured" in lines
    assert any(re.fullmatch(r"\[\s*\d+%\] quantize: calibration batch 0/12", line) for line in lines)
    assert _cli(*args, "-q").stderr == ""


def test_verbose_shows_our_steps_and_only_double_verbose_shows_other_libraries(tmp_path):
    args = _static_args(tmp_path)
    verbose = _cli("-v", *args, "-q").stderr
    assert "INFO quantized 3 weights" in verbose and "initializers from graph inputs" not in verbose
    assert "initializers from graph inputs" in _cli("-vv", *args, "-q").stderr  # onnx_ir's own log line


def test_positional_output_like_onnxslim_and_olive(tmp_path):
    onnx.save(models.mlp(), tmp_path / "m.onnx")
    plan = json.dumps({"steps": [{"kind": "prune"}], "evaluation": FAST})
    for args in (
        ["compress", "m.onnx", "a.onnx"],
        ["m.onnx", "b.onnx"],
        ["-q", "m.onnx", "-o", "c.onnx"],
        ["-q", "--plan", plan, "m.onnx", "d.onnx"],
    ):
        proc = subprocess.run(
            [sys.executable, "-m", "onnx_ops.cli", *args, "--plan", plan], cwd=tmp_path, capture_output=True, text=True
        )
        assert proc.returncode == 0, (args, proc.stderr)
        onnx.checker.check_model(str(tmp_path / args[-1]))
    proc = _cli("compress", tmp_path / "m.onnx", tmp_path / "x.onnx", "-o", tmp_path / "y.onnx")
    assert proc.returncode == 2 and "two outputs given" in proc.stderr
    proc = _cli("compress", tmp_path / "m.onnx")
    assert proc.returncode == 2 and "give where to write the compressed model" in proc.stderr


def test_default_plan_is_dynamic_int8_and_is_said(tmp_path):
    onnx.save(models.mlp(), tmp_path / "m.onnx")
    proc = _cli(tmp_path / "m.onnx", tmp_path / "o.onnx", "-q")
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.startswith('plan: {"steps": [{"kind": "quantize", "mode": "dynamic"}]} (the default')
    ops = {node.op_type for node in onnx.load(str(tmp_path / "o.onnx")).graph.node}
    assert "DynamicQuantizeLinear" in ops


def test_output_to_a_closed_pipe_ends_quietly(tmp_path):
    onnx.save(models.conv_net(), tmp_path / "m.onnx")
    read, write = os.pipe()
    os.close(read)  # the reader is gone before the first byte, as with `| head` after its lines
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "onnx_ops.cli", "inspect", str(tmp_path / "m.onnx")],
            stdout=write,
            stderr=subprocess.PIPE,
            text=True,
        )
    finally:
        os.close(write)
    assert proc.stderr == "" and proc.returncode == 128 + signal.SIGPIPE


def test_plan_typo_says_what_was_meant(tmp_path):
    onnx.save(models.mlp(), tmp_path / "m.onnx")
    proc = _cli(
        tmp_path / "m.onnx", tmp_path / "o.onnx", "--plan", '{"steps": [{"kind": "quantize", "mod": "static"}]}'
    )
    assert proc.returncode == 2
    assert proc.stderr.strip() == (
        "error (invalid_plan): invalid plan: unknown field 'mod' in step 1 (quantize); did you mean 'mode'?"
    )
