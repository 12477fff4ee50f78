"""The pass's own dynamic int8 path: the model quantized in place, one weight at a time (see dynamic).

Memory: the float weights leave as their int8 versions arrive. When the speed check runs, the float model is first
written to the work directory with its weights in a data file (the job's own one, referred to rather than copied,
when this is the plan's first step): ONNX Runtime's float session maps that file, the fallback variants are
quantized again from it, and the float model is read back from it if int8 is refused.

Before it, with calibration data, activation smoothing changes the float model in place (smoothing); after it,
``dynamic_rounding: gptq`` re-rounds the int8 levels against that float file (dynamic_rounding). Both apply to
ONNX Runtime's quantizer too, where it must run (smoothing before it, re-rounding in dynamic_calibrated).
"""

from __future__ import annotations

from pathlib import Path

import onnx_ir as ir
from onnx_ir.passes import common

from onnx_ops import job_files
from onnx_ops.job_files import save_sharing
from onnx_ops.passes._base import release_proto
from onnx_ops.passes.quantize import dynamic, dynamic_rounding, embeddings, smoothing
from onnx_ops.passes.quantize.ort import _DYNAMIC_OPS, _MIN_OPSET_DYNAMIC, _MIN_OPSET_STATIC, _pick
from onnx_ops.passes.quantize.selection import _Selection, _session_file

__all__: list[str] = []  # package-private: the pass in onnx_ops.passes.quantize is the interface

_FLOAT_FILE = "quantize_float.onnx"


class _OwnDynamic(_Selection):
    """Dynamic int8 of MatMul and Gather by the pass itself, and its preparations (a mixin of QuantizePass).

    The preparations: activation smoothing with calibration data, the opset that 4-bit embeddings need.
    """

    _embeddings_4bit: bool
    _prepared = False  # smoothing or the 4-bit opset changed the float model: the caller's file is not it

    def _stage(self, text: str, fraction: float) -> None:
        """Report where the pass is (its own share of the job's progress)."""
        if self.context.progress is not None:
            self.context.progress.stage(text, fraction)

    def _own_plan(self, work: ir.Model) -> dynamic.Plan | None:
        """What the pass quantizes itself, or None (the reason in the summary) when ONNX Runtime's quantizer must."""
        if self._static:
            return None
        if self.step.preprocess == "on":
            self.log.summary["quantizer"] = "onnxruntime: preprocess 'on' asks for its quant_pre_process"
            return None
        needed = _MIN_OPSET_STATIC if self._per_channel else _MIN_OPSET_DYNAMIC
        opset = work.opset_imports.get("", 1)
        if opset < needed:
            self.log.summary["quantizer"] = f"onnxruntime: opset {opset} needs raising to {needed}"
            return None
        selected = self._selected(work, self._wanted, [])
        dynamic.infer_types(work, selected)
        found = dynamic.plan(work, selected, _DYNAMIC_OPS)
        if isinstance(found, str):
            self.log.summary["quantizer"] = f"onnxruntime: {found}"
            return None
        self.log.summary["quantizer"] = "own (onnxruntime's quantize_dynamic graph, built weight by weight)"
        self.log.summary.update(opset_before=opset, opset=f"{opset} (unchanged)")
        self.log.summary["preprocess"] = "not needed: the pass quantizes MatMul and Gather itself"
        return found

    def _raise_for_4bit(self, model: ir.Model) -> None:
        """Convert `model` in place to the opset 4-bit Gather needs, or keep its tables for int8 if that fails."""
        try:
            upgraded, done = embeddings.at_gather_opset(model)
        except Exception as e:
            self._embeddings_4bit = False
            self._wanted.add("Gather")
            self.log.warnings.append(f"embedding tables kept in int8: 4-bit needs opset 21 ({self._clean(e)})")
            return
        self.log.summary["embeddings_opset"] = done
        _adopt(model, upgraded)
        self._prepared = True

    def _smooth(self, model: ir.Model) -> None:
        """Activation smoothing of the float model in place, strengths chosen from statistics (see smoothing)."""
        feeds = _pick(self.context.calibration or [], self.step.calibration_samples)
        floats = [node.name or "" for node in model.graph if node.op_type not in self._wanted]  # not quantized
        found = smoothing.groups(model, [*self.step.exclude_nodes, *floats])
        if not found:
            self.log.summary["smoothing"] = "no MatMul with a constant weight to smooth"
            return
        self._stage("activation statistics for smoothing", 0.02)
        try:
            share = self.context.unchanged_source is not None
            stats = smoothing.statistics(model, list(found), feeds, self.context.workdir, share=share)
            grid = smoothing.Grid(64.0 if self.step.reduce_range else 127.0, self._per_channel)
            outcome = smoothing.smooth(model, found, stats, grid=grid, wide=self.step.smoothing == "all")
        except Exception as e:
            self.log.warnings.append(f"activation smoothing failed, not used: {self._clean(e)}")
            return
        self.log.summary.update(outcome.summary())
        self._prepared = True

    def _selected(self, model: ir.Model, wanted: set[str], excluded: list[str]) -> list[ir.Node]:
        """The nodes ONNX Runtime would be asked to quantize: a wanted type it handles, not excluded."""
        skip = {*self.step.exclude_nodes, *excluded}
        return [n for n in model.graph if n.op_type in wanted & _DYNAMIC_OPS and n.name not in skip]

    def _quantize_own(self, model: ir.Model, found: dynamic.Plan) -> None:
        step = self.step
        columns = model.opset_imports.get("", 1) >= _MIN_OPSET_STATIC  # DequantizeLinear's axis: opset 13
        settings = dynamic.Settings(self._per_channel, step.reduce_range, step.weight_type, columns)
        self.log.layers = dynamic.apply(model, found, settings)
        release_proto(model)

    def _float_file(self, work: ir.Model) -> Path:
        """The float model as a file ONNX Runtime maps, with no second copy of weights the job has on disk.

        On the plan's first step: a file in the work directory referring to the job's own data file, or, when
        the job reads the caller's files where they are (Limits.share_external_data), the caller's model file.
        """
        source, path = self.context.unchanged_source, self.context.workdir / _FLOAT_FILE
        if source is None:
            return _session_file(work, path)
        if self._prepared or source.resolve().parent == self.context.workdir.resolve():
            return save_sharing(work, path)  # changed weights are new tensors, written; the others referred to
        return source

    def _load_float(self, float_file: Path) -> ir.Model:
        """The float model again, weights mapped from `float_file`'s data files, as `work` was before quantizing."""
        if float_file != self.context.source:
            return ir.load(float_file)
        model = job_files.load_ir(float_file)  # the caller's file: made what run_steps and `call` made of it
        common.LiftConstantsToInitializersPass(lift_all_constants=True, size_limit=0)(model)
        common.RemoveInitializersFromInputsPass()(model)
        common.NameFixPass()(model)
        return model

    def _dynamic_own(self, work: ir.Model, found: dynamic.Plan) -> ir.Model | None:
        """Quantize `work` in place; returns the model to keep (`work`, a fallback variant) or None for float.

        When None is returned, `work` is the float model again (read back from the work directory).
        """
        self._stage("quantizing the weights", 0.05)
        check = self.step.op_types is None and self.step.speed_check
        feeds = _pick(self.context.calibration or [], self.step.calibration_samples)
        gptq = bool(feeds) and self.step.dynamic_rounding == "gptq"
        float_file = self._float_file(work) if check or gptq else None
        self._quantize_own(work, found)
        if gptq and float_file is not None:  # the fallback variants of the speed check keep round-to-nearest
            self._stage("re-rounding the int8 weights (GPTQ)", 0.5)
            dynamic_rounding.round_model(float_file, work, feeds, self.log, self._clean)
        if float_file is None or not check:
            return work
        self._stage("checking speed of the int8 model", 0.8)
        layers = self.log.layers

        def requantize(wanted: set[str], excluded: list[str], index: int) -> ir.Model:
            variant = self._load_float(float_file)  # weights mapped from the data file, read one at a time
            selected = self._selected(variant, wanted, excluded)
            dynamic.infer_types(variant, selected)
            planned = dynamic.plan(variant, selected, _DYNAMIC_OPS)
            assert not isinstance(planned, str), planned  # a subset of a plan that applied
            self._quantize_own(variant, planned)
            return variant

        kept, reason = self._checked(self._load_float(float_file), requantize, work, float_file=float_file)
        if kept is None:
            self.log.layers = []
            restored = _in_memory(self._load_float(float_file))
            work.graph = restored.graph
            self._left_float = {node.name or "": reason for node in work.graph}
            return None
        if kept is not work:
            _in_memory(kept)
        else:
            self.log.layers = layers
        return kept


def _adopt(model: ir.Model, result: ir.Model) -> ir.Model:
    """Make `model` the result: its graph, opsets and functions become the result's."""
    if result is not model:
        model.graph = result.graph
        model.ir_version = result.ir_version
        model.functions.clear()
        model.functions.update(result.functions)
    return model


def _in_memory(model: ir.Model) -> ir.Model:
    """Read every weight still in a data file of the work directory into memory (the directory goes away)."""
    for graph in model.graphs():
        for value in graph.initializers.values():
            if isinstance(value.const_value, ir.ExternalTensor):
                tensor = value.const_value
                value.const_value = ir.tensor(tensor.numpy().copy(), name=value.name)
                tensor.release()
    return model
