"""Which int8 model the pass keeps: the speed check (interleaved CPU-time ratio) and the fidelity check.

The speed check times each int8 variant against the float model in interleaved pairs on one ONNX Runtime thread
and compares the calling thread's CPU time (see onnx_ops.timing): a variant is refused only when it is
measurably slower (the 95% interval of the ratio lies above 1). A tie within noise keeps int8, which is smaller.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir

from onnx_ops.data import input_specs, resolve_shapes, synthesize
from onnx_ops.errors import CompressionError
from onnx_ops.evaluate import Runner, agreement, compare_latency
from onnx_ops.passes._base import Feed, PassLog
from onnx_ops.passes.quantize.ort import _OrtCalls, _pick
from onnx_ops.passes.quantize.storage import _WEIGHT_OPS, _has_weight
from onnx_ops.report import LatencyComparison
from onnx_ops.timing import TimingSettings

__all__: list[str] = []  # package-private: the pass in onnx_ops.passes.quantize is the interface

# One speed check: at least 10 pairs, then until the 95% interval is within 10% of the ratio or 2 s are spent.
_SPEED = TimingSettings(warmup=1, min_pairs=10, seconds=2.0, target_width=0.1)
# Below this much CPU time a run is mostly ONNX Runtime's per-call overhead: too fast to matter.
_MIN_CHECKED_MS = 0.5
_MATMUL_OPS = frozenset({"MatMul", "Gemm"})
# The fidelity check (static mode, op types left to the pass): an int8 model whose worst float output cosine
# on this many calibration samples is below _FAR_OFF is not used. Not a budget (auto has those): a floor
# against int8 that no longer computes what the model computes.
_FAR_OFF = 0.9
_FIDELITY_SAMPLES = 8
# A fallback variant of the int8 model: (op types to quantize, extra nodes to exclude, the variant's index).
Requantize = Callable[[set[str], list[str], int], ir.Model]


class _Selection(_OrtCalls):
    """The speed and fidelity checks and the fallbacks they lead to (a mixin of QuantizePass)."""

    _wanted: set[str]
    _supported: frozenset[str]
    _left_float: dict[str, str]
    _fidelity: _Fidelity | None

    def _checked(
        self, work: ir.Model, requantize: Requantize, result: ir.Model, float_file: Path | None = None
    ) -> tuple[ir.Model | None, str]:
        """The first int8 model that is faithful (static) and not slower (speed_check): ORT's, then fallbacks.

        `work` is the float model (its graph is read; its weights only by the fidelity check), `requantize` makes
        a fallback variant (op types, extra excluded nodes, index). `float_file`, when given, is `work` written to
        a file: the float session is built from it (with its weights in a data file ONNX Runtime maps them, and
        holds no serialized copy). Returns (None, why) to keep the model in float.
        """
        timing = self._timing(work, float_file) if self.step.speed_check else None
        fidelity = _Fidelity.of(work, self.context.calibration, self.log) if self._static else None
        self._fidelity = fidelity
        speeds: list[str] = []  # "<variant> <ratio>x (<interval>, <verdict>)"
        cosines: list[str] = []  # "<variant> <worst cosine> (<output>)"
        far_off: list[str] = []  # the cosines below _FAR_OFF
        fallbacks = self._fallbacks(work)
        label, wanted, excluded, candidate = "all selected types", self._wanted, list[str](), result
        index = 0
        while True:
            faithful = fidelity is None or fidelity.accepts(candidate, label, cosines)
            if not faithful:
                far_off.append(cosines[-1])
                if index == 0:  # weight layers only is the first remedy for far-off outputs
                    fallbacks = self._weight_layers_only(work) + fallbacks
            if faithful and timing is not None:
                speed = _speed_ratio(timing[0], candidate, timing[1], self.context.workdir)
                speeds.append(f"{label} {_speed_note(speed)}")
                faithful = speed.verdict != "slower"  # a tie within noise keeps int8: it is smaller
            if faithful:
                break
            if index == len(fallbacks):
                return None, self._keep_float(speeds, cosines, far_off)
            label, wanted, excluded = fallbacks[index]
            index += 1
            del candidate  # the variant before goes before the next one is made
            candidate = requantize(wanted, excluded, index)
        summary = self.log.summary
        if cosines:
            summary["fidelity_check"] = "worst output cosine on calibration samples: " + "; ".join(cosines)
        if timing is not None:
            summary["speed_check"] = f"int8/float CPU time {speeds[0].removeprefix(label).strip()} (one thread)"
        if index == 0:
            return candidate, ""
        if far_off and far_off[0] == cosines[0]:
            why = f"int8 changed the outputs too much ({far_off[0]})"
        else:
            why = f"int8 was measurably slower than float on this CPU ({speeds[0]})"
        reason = f"left in float: {why}"
        self._left_float = dict.fromkeys(excluded, reason) | {
            node.name or "": reason
            for node in work.graph
            if node.op_type in self._wanted - wanted and node.op_type in self._supported
        }
        self.log.warnings.append(f"{why.replace('int8', 'int8 with every selected type', 1)}; quantized {label}")
        if timing is not None:
            summary["speed_check"] = f"fell back to {label}: " + "; ".join(speeds)
        return candidate, ""

    def _timing(self, work: ir.Model, float_file: Path | None = None) -> tuple[Runner, Feed] | None:
        """The float model and a feed to time int8 variants against; None (and a note) when timing is moot."""
        summary = self.log.summary
        try:
            feed = self._timing_feed(work)
            float_file = float_file or _session_file(work, self.context.workdir / "quantize_float.onnx")
            baseline = Runner(float_file, threads=1, what="model")
            float_ms = _median_ms(baseline, feed)
        except CompressionError as e:  # the pipeline's own check of the result reports real failures
            summary["speed_check"] = f"skipped: {e.message}"
            return None
        if float_ms < _MIN_CHECKED_MS:
            summary["speed_check"] = (
                f"skipped: the float model runs in {float_ms:.3f} ms of CPU time, too fast to matter"
            )
            return None
        return baseline, feed

    def _keep_float(self, speeds: list[str], cosines: list[str], far_off: list[str]) -> str:
        """Record why no int8 variant was used; returns the reason for each node left in float."""
        summary = self.log.summary
        if speeds:
            summary["speed_check"] = "kept float: " + "; ".join(speeds)
        if cosines:
            summary["fidelity_check"] = "worst output cosine on calibration samples: " + "; ".join(cosines)
        if far_off and not speeds:
            self.log.warnings.append(
                f"every int8 variant tried changed the outputs too much on the calibration samples (worst output "
                f"cosine below {_FAR_OFF}: " + "; ".join(far_off) + "), so the model was left in float; try mode "
                "dynamic, auto with a budget, or name op_types to quantize anyway"
            )
            return f"left in float: int8 changed the outputs too much (worst output cosine below {_FAR_OFF})"
        self.log.warnings.append(
            "every int8 variant tried was measurably slower than the float model on this CPU ("
            + "; ".join(speeds)
            + (f"; the others changed the outputs too much: {'; '.join(far_off)}" if far_off else "")
            + "), so the model was left in float; name op_types to quantize anyway"
        )
        return "left in float: every int8 variant tried was measurably slower than float on this CPU"

    def _weight_layers_only(self, work: ir.Model) -> list[tuple[str, set[str], list[str]]]:
        present = {node.op_type for node in work.graph} & self._wanted
        weights = present & _WEIGHT_OPS
        return [("weight layers only", weights, [])] if weights and weights != present else []

    def _fallbacks(self, work: ir.Model) -> list[tuple[str, set[str], list[str]]]:
        """(label, op types, extra excluded nodes) to try, in order, after the default selection was slower."""
        options: list[tuple[str, set[str], list[str]]] = []
        depthwise = [node.name or "" for node in work.graph if node.op_type == "Conv" and _is_depthwise(node)]
        if depthwise and "Conv" in self._wanted:
            options.append((f"without {len(depthwise)} depthwise Conv", self._wanted, depthwise))
        matmuls = self._wanted & _MATMUL_OPS
        has_matmul = any(node.op_type in matmuls and _has_weight(node) for node in work.graph)
        has_others = any(node.op_type in self._wanted - matmuls for node in work.graph)
        if has_matmul and has_others:
            options.append(("MatMul/Gemm only", matmuls, []))
        return options

    def _timing_feed(self, work: ir.Model) -> Feed:
        if self.context.calibration:
            return dict(self.context.calibration[0])
        specs = input_specs(_inputs_only(work))
        shapes = resolve_shapes(specs, self.context.input_shapes)
        return synthesize(specs, shapes, 1, seed=0, max_elements=1 << 24)[0]


class _Fidelity:
    """The float model's outputs on a few calibration samples, to compare int8 variants with."""

    def __init__(self, feeds: list[Feed], names: list[str], reference: list[list[object]]) -> None:
        self.feeds, self.names, self.reference = feeds, names, reference

    @classmethod
    def of(cls, work: ir.Model, calibration: Sequence[Feed] | None, log: PassLog) -> _Fidelity | None:
        feeds = _pick(calibration or [], _FIDELITY_SAMPLES)
        try:
            runner = Runner(ir.to_proto(work), what="model")
            reference = [runner.run(feed) for feed in feeds]
        except CompressionError as e:  # the pipeline's own check of the result reports real failures
            log.summary["fidelity_check"] = f"skipped: {e.message}"
            return None
        return cls(feeds, runner.output_names, reference) if feeds else None

    def accepts(self, model: ir.Model, label: str, notes: list[str]) -> bool:
        """False when some float output's cosine is below _FAR_OFF; appends a note on what was found to notes."""
        try:
            runner = Runner(ir.to_proto(model), what="quantized model")
            found = agreement(self.names, self.reference, [runner.run(feed) for feed in self.feeds])
        except CompressionError as e:  # e.g. a changed output shape: the pipeline reports it on the result
            notes.append(f"{label}: not checked ({e.message})")
            return True
        floating = {n for n, out in zip(self.names, self.reference[0], strict=True) if _is_float_array(out)}
        worst = min((a for a in found if a.name in floating), key=lambda a: a.cosine, default=None)
        if worst is None:
            notes.append(f"{label}: no float output")
            return True
        notes.append(f"{label} {worst.cosine:.3f} ({worst.name})")
        return worst.cosine >= _FAR_OFF


def _is_float_array(value: object) -> bool:
    return isinstance(value, np.ndarray) and value.dtype.kind == "f"


def _speed_ratio(baseline: Runner, quantized: ir.Model, feed: Feed, workdir: Path) -> LatencyComparison:
    """The quantized model's time over the float one's: interleaved pairs on one thread's CPU time (_SPEED)."""
    path = _session_file(quantized, workdir / "quantize_timed.onnx")
    try:
        candidate = Runner(path, threads=1, what="quantized model")
        return compare_latency(baseline, candidate, feed, settings=_SPEED).comparison
    finally:  # the disk it takes (a quarter of the float model) is free again for the files that follow
        for file in (path, path.with_name(f"{path.name}.data")):
            file.unlink(missing_ok=True)


def _session_file(model: ir.Model, path: Path) -> Path:
    """`model` written to `path` with its weights in a data file beside it, which ONNX Runtime maps.

    Written tensor by tensor (no serialized copy of the model in memory); the model is left unchanged.
    """
    ir.save(model, path, external_data=f"{path.name}.data", size_threshold_bytes=1024)
    return path


def _inputs_only(model: ir.Model) -> onnx.ModelProto:
    """A ModelProto holding only the graph inputs of `model` that a caller feeds (what input_specs reads)."""
    proto = onnx.ModelProto()
    proto.graph.input.extend(ir.serde.serialize_value(v) for v in model.graph.inputs if v.const_value is None)
    return proto


def _speed_note(c: LatencyComparison) -> str:
    """'0.62x (0.60-0.65, faster)': the ratio, its 95% interval and the verdict."""
    return f"{c.ratio:.2f}x ({c.ratio_low:.2f}-{c.ratio_high:.2f}, {c.verdict})"


def _median_ms(runner: Runner, feed: Feed, runs: int = 5) -> float:
    """Median CPU time of the calling thread per run (one-thread sessions compute on it), in ms."""
    runner.session.run(None, feed)
    times = []
    for _ in range(runs):
        start = time.thread_time()
        runner.session.run(None, feed)
        times.append((time.thread_time() - start) * 1000.0)
    return float(np.median(times))


def _is_depthwise(node: ir.Node) -> bool:
    group = node.attributes.get("group")
    return group is not None and group.as_int() > 1
