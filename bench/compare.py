"""Our passes and chained plans next to plain ONNX Runtime quantization, onnxslim and ORT's transformer optimizer.

For every real model (bench/tasks.py): size and gzip ratios, latency ratios against the fp32 model (one thread
and ONNX Runtime's default threads, both models interleaved in one process), the worst output cosine on the
evaluation inputs, and the task score where the inputs have ground truth.

Run:  python -m bench.compare [--only KEY ...] [--runs 40]
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gzip
import io
import logging
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort

from bench import tasks
from onnx_ops import CompressionError, compress
from onnx_ops.evaluate import Runner, agreement, measure_latency

logger = logging.getLogger(__name__)

OURS: dict[str, list[dict[str, Any]]] = {
    "prune 50%": [{"kind": "prune", "sparsity": 0.5}],
    "structured 30%": [{"kind": "prune", "method": "structured", "sparsity": 0.3}],
    "svd energy 0.95": [{"kind": "svd", "energy": 0.95, "min_elements": 0}],
    "int8 dynamic": [{"kind": "quantize"}],
    "int8 static": [{"kind": "quantize", "mode": "static"}],
}
# Chained plans end with our int8 step in the mode that did best alone on that model.
CHAINS: dict[str, list[dict[str, Any]]] = {
    "prune 50% + int8": [{"kind": "prune", "sparsity": 0.5}],
    "structured 20% + int8": [{"kind": "prune", "method": "structured", "sparsity": 0.2}],
    "svd energy 0.98 + int8": [{"kind": "svd", "energy": 0.98, "min_elements": 0}],
}
# "Accurate enough": task score within 1 point and cosine >= 0.98 where the task has a score, else cosine >= 0.99.
COSINE_BUDGET, SCORED_COSINE_FLOOR, SCORE_BUDGET = 0.99, 0.98, 1.0
BLOCKS = 3


@dataclasses.dataclass
class Row:
    """One model variant, measured against the fp32 model."""

    model: str
    variant: str
    tool: str  # "ours" or the competitor's name
    size_ratio: float | None = None
    gzip_ratio: float | None = None
    latency_ratio_1t: float | None = None
    latency_ratio_default: float | None = None
    fp32_ms_1t: float | None = None
    cosine: float | None = None
    score: float | None = None
    score_fp32: float | None = None
    seconds: float | None = None
    error: str | None = None
    note: str = ""

    @property
    def accurate(self) -> bool:
        """Within the accuracy budget (see SCORE_BUDGET and the cosine thresholds)."""
        if self.error or self.cosine is None:
            return False
        if self.score is not None and self.score_fp32 is not None:
            return self.score >= self.score_fp32 - SCORE_BUDGET and self.cosine >= SCORED_COSINE_FLOOR
        return self.cosine >= COSINE_BUDGET


class Bench:
    """Measures variants of one task's model against its fp32 original."""

    def __init__(self, task: tasks.Task, runs: int, workdir: Path) -> None:
        self.task = task
        self.runs = runs
        self.workdir = workdir
        self.fp32 = task.model_bytes()
        self.fp32_path = workdir / f"{task.key}.onnx"
        self.fp32_path.write_bytes(self.fp32)
        self.fp32_gzip = len(gzip.compress(self.fp32, 6))
        self.baselines = {threads: Runner(self.fp32, threads=threads) for threads in (1, 0)}
        self.eval_feeds = task.samples(task.evaluation)
        self.reference = [self.baselines[1].run(feed) for feed in self.eval_feeds]
        self.score_fp32 = task.score(self.reference) if task.score else None  # type: ignore[arg-type]

    def measure(self, variant: str, tool: str, build: Callable[[], onnx.ModelProto]) -> Row:
        """Build the variant (timed) and measure it; a failure becomes a row with the error."""
        row = Row(self.task.key, variant, tool, score_fp32=self.score_fp32)
        start = time.perf_counter()
        try:
            model = build()
        except Exception as e:  # a refused plan or a crashing competitor is a result too
            row.error = f"{type(e).__name__}: {getattr(e, 'message', None) or e}"[:200]
            return row
        row.seconds = time.perf_counter() - start
        data = model.SerializeToString()
        row.size_ratio = len(data) / len(self.fp32)
        row.gzip_ratio = len(gzip.compress(data, 6)) / self.fp32_gzip
        try:
            candidates = {threads: Runner(data, threads=threads, what="compressed model") for threads in (1, 0)}
            outputs = [candidates[1].run(feed) for feed in self.eval_feeds]
            names = self.baselines[1].output_names
            cosines = [a.cosine for a in agreement(names, self.reference, outputs) if a.cosine is not None]
        except CompressionError as e:  # e.g. an output that changed shape
            row.error = e.message[:200]
            return row
        row.cosine = min(cosines) if cosines else None
        if self.task.score is not None:
            row.score = self.task.score(outputs)  # type: ignore[arg-type]
        feed = self.eval_feeds[0]
        for threads in (1, 0):
            ratios, fp32_ms = [], []
            for _ in range(BLOCKS):  # the median of a few interleaved blocks: other processes come and go
                baseline, candidate = self.baselines[threads], candidates[threads]
                before, after = measure_latency(baseline, candidate, feed, runs=self.runs, warmup=2)
                ratios.append(after.p50_ms / before.p50_ms)
                fp32_ms.append(before.p50_ms)
            if threads == 1:
                row.latency_ratio_1t, row.fp32_ms_1t = float(np.median(ratios)), float(np.median(fp32_ms))
            else:
                row.latency_ratio_default = float(np.median(ratios))
        return row

    def ours(self, steps: list[dict[str, Any]]) -> onnx.ModelProto:
        """Run our library on a plan."""
        plan = {
            "steps": steps,
            "input_shapes": self.task.input_shapes,
            "evaluation": {"latency_runs": 1, "warmup_runs": 0, "threads": 1, "max_samples": 4},
        }
        static = any(s.get("mode") == "static" for s in steps)
        with contextlib.redirect_stdout(io.StringIO()):
            result = compress(
                self.fp32_path,
                plan,
                calibration=self.task.calibration if static else None,
                evaluation={k: v[:4] for k, v in self.task.evaluation.items()},
            )
        return result.model

    def ort_dynamic(self) -> onnx.ModelProto:
        """onnxruntime.quantization.quantize_dynamic with its defaults."""
        from onnxruntime.quantization import quantize_dynamic

        out = self.workdir / f"{self.task.key}.ort_dynamic.onnx"
        quantize_dynamic(str(self.fp32_path), str(out))
        return onnx.load(out)

    def ort_static(self) -> onnx.ModelProto:
        """onnxruntime.quantization.quantize_static with its defaults and the same calibration data as ours."""
        from onnxruntime.quantization import CalibrationDataReader, quantize_static

        feeds = iter(self.task.samples(self.task.calibration))

        class Reader(CalibrationDataReader):  # type: ignore[misc]
            def get_next(self) -> dict[str, np.ndarray] | None:
                return next(feeds, None)

        out = self.workdir / f"{self.task.key}.ort_static.onnx"
        with contextlib.redirect_stdout(io.StringIO()):
            quantize_static(str(self.fp32_path), str(out), Reader())
        return onnx.load(out)

    def onnxslim(self) -> onnx.ModelProto:
        """onnxslim.slim with its defaults."""
        import onnxslim

        with contextlib.redirect_stdout(io.StringIO()):
            model = onnxslim.slim(onnx.load(self.fp32_path))
        assert isinstance(model, onnx.ModelProto)
        return model

    def ort_transformer_optimizer(self, then_quantize: bool = False) -> onnx.ModelProto:
        """onnxruntime.transformers.optimizer.optimize_model (model_type bert), optionally then quantize_dynamic."""
        from onnxruntime.transformers.optimizer import optimize_model

        # opt_level 0: the Python fusions only (level 1+ first runs ORT's optimizer, whose code imports torch).
        optimized = optimize_model(str(self.fp32_path), model_type="bert", num_heads=0, hidden_size=0, opt_level=0)
        if not then_quantize:
            return optimized.model  # type: ignore[no-any-return]
        from onnxruntime.quantization import quantize_dynamic

        source, out = self.workdir / "optimized.onnx", self.workdir / "optimized.int8.onnx"
        optimized.save_model_to_file(str(source))
        # Fused com.microsoft nodes defeat ORT's type inference; it asks for a default tensor type then.
        quantize_dynamic(str(source), str(out), extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT})
        return onnx.load(out)


def best_int8(rows: list[Row]) -> Row | None:
    """Our int8 row to chain after: accurate enough and fastest, else the most accurate."""
    int8 = [r for r in rows if r.tool == "ours" and r.variant.startswith("int8") and not r.error]
    good = [r for r in int8 if r.accurate]
    if good:
        return min(good, key=lambda r: r.latency_ratio_1t or 9.0)
    return max(int8, key=lambda r: (r.score or 0.0, r.cosine or 0.0), default=None)


def best_chain(rows: list[Row]) -> Row | None:
    """The smallest accurate chained plan (ties: fastest); the most accurate one when none is within budget."""
    chains = [r for r in rows if r.tool == "ours" and "+" in r.variant and not r.error]
    good = [r for r in chains if r.accurate]
    if good:
        return min(good, key=lambda r: (round(r.size_ratio or 9.0, 3), r.latency_ratio_1t or 9.0))
    return max(chains, key=lambda r: (r.score or 0.0, r.cosine or 0.0), default=None)


def run_model(task: tasks.Task, runs: int, progress: Callable[[Row], None]) -> list[Row]:
    """Every variant of one model."""
    rows: list[Row] = []

    def add(row: Row) -> None:
        rows.append(row)
        progress(row)

    with tempfile.TemporaryDirectory(prefix="bench-") as tmp:
        bench = Bench(task, runs, Path(tmp))
        for name, steps in OURS.items():
            add(bench.measure(name, "ours", lambda steps=steps: bench.ours(steps)))  # type: ignore[misc]
        int8 = best_int8(rows)
        mode = "static" if int8 is not None and int8.variant == "int8 static" else "dynamic"
        for name, steps in CHAINS.items():
            chain = [*steps, {"kind": "quantize", "mode": mode}]
            add(bench.measure(f"{name} {mode}", "ours", lambda chain=chain: bench.ours(chain)))  # type: ignore[misc]
        if task.family == "transformer":  # the embedding table holds most of the weights: try it in 4 bits
            q4 = {"kind": "quantize", "mode": mode, "embedding_bits": 4}
            add(bench.measure(f"int8 {mode}, 4-bit embeddings", "ours", lambda: bench.ours([q4])))
            for name, steps in CHAINS.items():
                chain = [*steps, q4]
                label = f"{name} {mode}, 4-bit embeddings"
                add(bench.measure(label, "ours", lambda chain=chain: bench.ours(chain)))  # type: ignore[misc]
        add(bench.measure("quantize_dynamic", "onnxruntime", bench.ort_dynamic))
        add(bench.measure("quantize_static", "onnxruntime", bench.ort_static))
        add(bench.measure("slim", "onnxslim", bench.onnxslim))
        if task.family == "transformer":
            add(bench.measure("optimize_model", "ort-transformers", bench.ort_transformer_optimizer))
            add(
                bench.measure(
                    "optimize_model + quantize_dynamic",
                    "ort-transformers",
                    lambda: bench.ort_transformer_optimizer(then_quantize=True),
                )
            )
    return rows


def verdicts(rows: list[Row]) -> list[dict[str, Any]]:
    """Per model: our best int8 against the best plain-ORT quantization, on size, speed and accuracy."""
    out = []
    for model in dict.fromkeys(r.model for r in rows):
        mine = [r for r in rows if r.model == model]
        ours = best_int8(mine)
        theirs = [r for r in mine if r.tool == "onnxruntime" and not r.error]
        if ours is None or not theirs:
            continue
        # The ORT result a user would keep: accurate ones first, then the fastest.
        rival = min(theirs, key=lambda r: (not r.accurate, r.latency_ratio_1t or 9.0))
        out.append(
            {
                "model": model,
                "ours": ours.variant,
                "onnxruntime": rival.variant,
                "smaller_or_equal": (ours.size_ratio or 9) <= (rival.size_ratio or 9) + 0.005,
                "faster_or_equal": (ours.latency_ratio_1t or 9) <= (rival.latency_ratio_1t or 9) * 1.05,
                "as_accurate": (ours.score or 0) >= (rival.score or 0) - 0.5 if ours.score is not None
                else (ours.cosine or 0) >= (rival.cosine or 0) - 0.001,
                "not_slower_than_fp32": (ours.latency_ratio_1t or 9) <= 1.05,
                "ort_slower_than_fp32": (rival.latency_ratio_1t or 0) > 1.05,
            }
        )  # fmt: skip
    return out


def environment() -> dict[str, Any]:
    """The machine and the tool versions."""
    import platform

    from onnx_ops.evaluate import cpu_name, default_threads

    versions = {"onnxruntime": ort.__version__, "onnx": onnx.__version__, "numpy": np.__version__}
    with contextlib.suppress(ImportError):
        import onnxslim

        versions["onnxslim"] = onnxslim.__version__
    return {
        "cpu": cpu_name(),
        "cores": default_threads(),
        "python": platform.python_version(),
        "versions": versions,
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="*", default=None, help=f"models: {' '.join(tasks.BUILDERS)}")
    parser.add_argument("--runs", type=int, default=40, help="timed runs per latency ratio")
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    args = parser.parse_args()
    from bench import output

    result = {"environment": environment(), "models": run_models(args.only, args.runs)}
    output.write(result, args.out)


def run_models(only: list[str] | None, runs: int) -> dict[str, Any]:
    """Run the model benchmark and return its JSON-able result, printing each row as it comes."""
    from bench import output

    logging.basicConfig(level=logging.ERROR)
    ort.set_default_logger_severity(3)
    rows: list[Row] = []
    descriptions = {}
    print(output.HEADER)
    for key in only or tasks.BUILDERS:
        try:
            task = tasks.BUILDERS[key]()
        except (FileNotFoundError, ImportError) as e:
            print(f"{key}: skipped ({e})")
            continue
        descriptions[key] = {"description": task.description, "metric": task.metric, "notes": task.notes}
        rows += run_model(task, runs, lambda row: print(output.line(row), flush=True))
    chains = {m: best_chain([r for r in rows if r.model == m]) for m in descriptions}
    return {
        "rows": [dataclasses.asdict(r) | {"accurate": r.accurate} for r in rows],
        "descriptions": descriptions,
        "best_chain": {m: (r.variant if r else None) for m, r in chains.items()},
        "verdicts": verdicts(rows),
    }


if __name__ == "__main__":
    main()
