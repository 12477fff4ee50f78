"""Our passes next to NNCF, AMD Quark, onnxsim and AIMET at matched settings, on the same real models and data.

Each peer runs in its own virtual environment (bench/peers_runners, created and reused under a cache folder) and
writes its compressed model; every model, ours and theirs, is then measured here by the same code: size, the share
of zero float weights, the output cosine against the fp32 model on held-out inputs (not the calibration inputs),
the task score, and the CPU-time latency ratio with its interval (onnx_ops.timing: one thread, interleaved pairs).

Run:  python -m bench.peers [--only MODEL|PEER|GROUP|ours ...] [--cache DIR] [--timeout 900] [--no-install]
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
import json
import logging
import tempfile
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
from onnx import numpy_helper

from bench import tasks
from bench.peers_report import HEADER, Row, line, verdicts
from bench.peers_runners import PEERS, Peer, PeerError, cache_folder, ensure_env, run_setting
from onnx_ops import CompressionError, compress
from onnx_ops.agreement import agreement
from onnx_ops.evaluate import Runner, compare_latency
from onnx_ops.timing import TimingSettings

logger = logging.getLogger(__name__)

# Our plans by matched group; add a plan here and it is run and compared with the peers' settings of its group.
OURS: dict[str, dict[str, list[dict[str, Any]]]] = {
    "int8": {
        # With the calibration data the bench gives every tool, the default dynamic int8 smooths activations.
        "int8 default": [{"kind": "quantize"}],
        "int8 dynamic, smoothing all": [{"kind": "quantize", "smoothing": "all"}],
        "int8 dynamic, no smoothing": [{"kind": "quantize", "smoothing": "off"}],
        "int8 static": [{"kind": "quantize", "mode": "static"}],
    },
    "prune 50%": {
        "prune 50%": [{"kind": "prune", "sparsity": 0.5}],
        "prune 50% + distill": [{"kind": "prune", "sparsity": 0.5}, {"kind": "distill"}],
        "prune 50% activation + distill": [
            {"kind": "prune", "sparsity": 0.5, "criterion": "activation"},
            {"kind": "distill"},
        ],
    },
    "int4": {
        "int4 rtn": [{"kind": "int4"}],
        "int4 gptq": [{"kind": "int4", "method": "gptq"}],
    },
}
GROUPS = ["int8", "prune 50%", "int4", "kmeans 4-bit"]
UNCHANGED = 1e-9  # 1 - worst cosine below this: the model computes what the fp32 model does
MODELS = ["rapidocr_cls", "rapidocr_rec", "minilm_l3"]  # the default run: real models with task scores
OURS_ONLY = "ours"  # in --only without a peer's name: our settings alone (e.g. to rerun them after a change)


def zero_share(model: onnx.ModelProto) -> float | None:
    """Share of exact zeros among the float weights of 256 elements or more (initializers and Constant nodes)."""
    tensors = list(model.graph.initializer)
    tensors += [a.t for n in model.graph.node if n.op_type == "Constant" for a in n.attribute if a.name == "value"]
    zeros = total = 0
    for tensor in tensors:
        if tensor.data_type in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16):
            array = numpy_helper.to_array(tensor)
            if array.size >= 256:
                zeros, total = zeros + int(np.count_nonzero(array == 0)), total + array.size
    return zeros / total if total else None


class Meter:
    """Measures compressed versions of one task's model against the fp32 model, all with the same code."""

    def __init__(self, task: tasks.Task, workdir: Path, seconds: float) -> None:
        self.task = task
        self.fp32 = task.model_bytes()
        self.fp32_path = workdir / f"{task.key}.onnx"
        self.fp32_path.write_bytes(self.fp32)
        self.calibration_path = workdir / f"{task.key}.calibration.npz"
        np.savez(self.calibration_path, **task.calibration)  # type: ignore[arg-type]
        self.timing = TimingSettings(seconds=seconds)
        self.baseline = Runner(self.fp32, threads=1)
        self.feeds = task.samples(task.evaluation)
        self.reference = [self.baseline.run(feed) for feed in self.feeds]
        self.score_fp32 = task.score(self.reference) if task.score else None  # type: ignore[arg-type]
        self.held_out = not _overlap(task.calibration, task.evaluation)

    def row(self, group: str, tool: str, setting: str, build: Callable[[], tuple[onnx.ModelProto, str]]) -> Row:
        """Build one compressed model (a failure becomes the row's error) and measure it."""
        row = Row(self.task.key, group, tool, setting, score_fp32=self.score_fp32)
        start = time.perf_counter()
        try:
            model, row.note = build()
        except (PeerError, CompressionError) as e:
            row.error = str(getattr(e, "message", None) or e).splitlines()[0][:300]
            return row
        row.seconds = time.perf_counter() - start
        try:
            self._measure(model, row)
        except CompressionError as e:  # ONNX Runtime cannot load or run it, or an output changed shape
            row.error = e.message.splitlines()[0][:300]
        return row

    def _measure(self, model: onnx.ModelProto, row: Row) -> None:
        data = model.SerializeToString()
        row.size_ratio, row.zeros = len(data) / len(self.fp32), zero_share(model)
        candidate = Runner(data, threads=1, what="compressed model")
        outputs = [candidate.run(feed) for feed in self.feeds]
        measured = agreement(self.baseline.output_names, self.reference, outputs)
        worst = min(measured, key=lambda a: a.cosine_mean if a.cosine_mean is not None else a.cosine)
        row.cosine_mean = worst.cosine_mean if worst.cosine_mean is not None else worst.cosine
        row.cosine_min = worst.cosine_min if worst.cosine_min is not None else worst.cosine
        # Identical outputs, or differences of float rounding only (a graph rewrite such as an opset upgrade).
        row.unchanged = all(a.max_abs_err == 0 for a in measured) or 1 - row.cosine_min < UNCHANGED
        if self.task.score is not None:
            row.score = self.task.score(outputs)  # type: ignore[arg-type]
        timed = compare_latency(self.baseline, candidate, self.feeds[0], settings=self.timing).comparison
        row.latency_ratio, row.latency_low, row.latency_high = timed.ratio, timed.ratio_low, timed.ratio_high
        row.latency_basis = timed.basis

    def ours(self, steps: list[dict[str, Any]]) -> tuple[onnx.ModelProto, str]:
        """Our library on a plan, with the task's calibration data (ours and the peers' see the same)."""
        plan = {
            "steps": steps,
            "input_shapes": self.task.input_shapes,
            "evaluation": {"latency_runs": 1, "warmup_runs": 0, "threads": 1, "max_samples": 4},
        }
        with contextlib.redirect_stdout(io.StringIO()):
            result = compress(self.fp32_path, plan, calibration=self.task.calibration)
        return result.model, ""

    def peer(self, python: Path, peer: Peer, setting: str, timeout: float) -> tuple[onnx.ModelProto, str]:
        """One setting of a peer, run in its environment."""
        out = self.fp32_path.with_name(f"{self.task.key}.{peer.name}.{setting.replace(' ', '_')}.onnx")
        out.unlink(missing_ok=True)
        _, note = run_setting(python, peer, setting, self.fp32_path, self.calibration_path, _family(self.task), out,
                              timeout)  # fmt: skip
        return onnx.load(out), note


def _family(task: tasks.Task) -> str:
    return "transformer" if task.family == "transformer" else "cnn"


def _overlap(calibration: tasks.Feeds, evaluation: tasks.Feeds) -> bool:
    """True when some evaluation sample is also a calibration sample."""
    name = next(iter(calibration))
    seen = {np.ascontiguousarray(a).tobytes() for a in calibration[name]}
    return any(np.ascontiguousarray(a).tobytes() in seen for a in evaluation[name])


def run_model(
    task: tasks.Task,
    peers: Iterable[Peer],
    groups: Iterable[str],
    envs: Callable[[Peer], Path],
    *,
    timeout: float,
    seconds: float,
    progress: Callable[[Row], None] = lambda row: None,
) -> list[Row]:
    """Every setting of ours and of the peers in the groups on one model; `envs` gives a peer's Python."""
    rows: list[Row] = []
    peers, groups = list(peers), list(groups)
    with tempfile.TemporaryDirectory(prefix="peers-") as tmp:
        meter = Meter(task, Path(tmp), seconds)
        for group in groups:
            for setting, steps in OURS.get(group, {}).items():
                rows.append(meter.row(group, "ours", setting, lambda steps=steps: meter.ours(steps)))  # type: ignore[misc]
                progress(rows[-1])
            for peer in peers:
                for setting in [s for s, g in peer.settings.items() if g == group]:

                    def build(peer: Peer = peer, setting: str = setting) -> tuple[onnx.ModelProto, str]:
                        return meter.peer(envs(peer), peer, setting, timeout)

                    rows.append(meter.row(group, peer.name, setting, build))
                    progress(rows[-1])
        if not meter.held_out:
            for row in rows:
                row.note = "; ".join(filter(None, [row.note, "evaluation inputs overlap the calibration inputs"]))
    return rows


def environment(peers: Iterable[Peer]) -> dict[str, Any]:
    """The machine, our tool versions and the peers' pinned requirements."""
    from onnx_ops.evaluate import cpu_name

    return {
        "cpu": cpu_name(),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "versions": {"onnxruntime": ort.__version__, "onnx": onnx.__version__, "numpy": np.__version__},
        "peers": {peer.name: list(peer.requirements) for peer in peers},
    }


def select(only: list[str] | None) -> tuple[list[str], list[Peer], list[str]]:
    """Models, peers and groups named by --only (each kind defaults to all when none of it is named)."""
    names = set(only or [])
    unknown = names - set(tasks.BUILDERS) - set(PEERS) - set(GROUPS) - {OURS_ONLY}
    if unknown:
        raise SystemExit(f"--only: unknown {', '.join(sorted(unknown))} (models: {' '.join(tasks.BUILDERS)}; "
                         f"peers: {' '.join(PEERS)}; groups: {', '.join(GROUPS)}; or {OURS_ONLY})")  # fmt: skip
    models = [m for m in tasks.BUILDERS if m in names] or MODELS
    peers = [p for n, p in PEERS.items() if n in names] or ([] if OURS_ONLY in names else list(PEERS.values()))
    groups = [g for g in GROUPS if g in names] or GROUPS
    return models, peers, groups


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the comparison, print the table and write the JSON result."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="*", default=None, help="models, peers, groups ('int8', ...); 'ours': no peer")
    parser.add_argument("--cache", default=None, help="the peers' environments (or $ONNX_COMPRESS_PEERS_CACHE)")
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds allowed to one peer setting on one model")
    parser.add_argument("--install-timeout", type=float, default=1800.0, help="seconds allowed to install one peer")
    parser.add_argument("--no-install", action="store_true", help="use the environments already there, install none")
    parser.add_argument("--seconds", type=float, default=3.0, help="timing budget of each latency ratio")
    parser.add_argument("--out", type=Path, default=Path("bench/results/peers.json"))
    args = parser.parse_args(argv)
    models, peers, groups = select(args.only)
    logging.basicConfig(level=logging.ERROR)
    ort.set_default_logger_severity(3)
    cache = cache_folder(args.cache)
    envs: dict[str, Path | PeerError] = {}

    def env(peer: Peer) -> Path:
        if peer.name not in envs:
            print(f"[{peer.name}: environment in {cache / peer.name}]", flush=True)
            try:
                envs[peer.name] = ensure_env(peer, cache, install=not args.no_install, timeout=args.install_timeout)
            except PeerError as e:
                envs[peer.name] = e
        found = envs[peer.name]
        if isinstance(found, PeerError):
            raise found
        return found

    started = time.perf_counter()
    rows: list[Row] = []

    def save(complete: bool) -> dict[str, Any]:  # after every row: a stopped run keeps what it measured
        result = {
            "environment": environment(peers),
            "complete": complete,
            "minutes": (time.perf_counter() - started) / 60,
            "rows": [dataclasses.asdict(r) for r in rows],
            "verdicts": verdicts(rows),
        }
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1, default=str))
        return result

    def progress(row: Row) -> None:
        rows.append(row)
        print(line(row), flush=True)
        save(complete=False)

    print(HEADER, flush=True)
    for key in models:
        try:
            task = tasks.BUILDERS[key]()
        except (FileNotFoundError, ImportError) as e:
            print(f"{key}: skipped ({e})")
            continue
        run_model(task, peers, groups, env, timeout=args.timeout, seconds=args.seconds, progress=progress)
    result = save(complete=True)
    print("\nours at least as accurate as the best peer that changed the model (task score, then output cosine):")
    for v in result["verdicts"]:
        print(f"  {v['model']:<13} {v['group']:<12} ours: {v['ours']} | best peer: {v['best_peer']} -> "
              f"{v['ours_at_least_as_accurate']}")  # fmt: skip
    print(f"\n{len(rows)} rows in {result['minutes']:.1f} min -> {args.out}")
    return result


if __name__ == "__main__":
    main()
