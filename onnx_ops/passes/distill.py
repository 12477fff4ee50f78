"""Label-free recovery of pruned MatMul/Gemm/Conv layers: closed-form refit to the original model's layer outputs.

The model before the plan is the teacher and the calibration feeds are the data. Every MatMul/Gemm/Conv
whose constant weight was pruned (zeros where the teacher's weight of the same name has none) is captured
(``onnx_ops.capture``: a Conv's input as sampled im2col patches, per group for grouped Conv) and refit by
ridge least squares with its zeros kept (``_refit``), at a ridge term chosen by two-fold cross-validation over
the calibration feeds (``_refit_cv``); a layer no refit helps on held-out feeds is left as pruned. A bias
(Gemm's C, Conv's B, or a constant Add right after a MatMul) is refit with the weights.

Sequential mode refits the layers level by level in graph order, running the student again after each
level, so a layer is fit on the inputs its already refit upstream layers produce. The teacher's side does not
change between levels: it runs once, its layer outputs kept on disk (``capture_targets``); per level only the
part of the student upstream of that level's layers runs, from a file whose weights ONNX Runtime maps and
whose refit weights are rewritten in place (``capture_files``). Layers that structured pruning shrank are
refit first, by ``_structured_refit``. Which layers are refit (pruned ones, SVD pairs, optionally the unchanged
layers downstream) and to what target is ``_refit_targets``'s; an SVD pair's factors are refit by
``_refit_factors``. Then the transformer FFN blocks whose layers were refit are tuned block-wise
(``_blockwise``), where that helps.
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path

import onnx
import onnx_ir as ir
from threadpoolctl import threadpool_limits

from onnx_ops.capture import LayerStats, OutputError, Session
from onnx_ops.capture_files import ModelFile, write_proto
from onnx_ops.capture_masks import AUTO
from onnx_ops.capture_targets import Targets
from onnx_ops.errors import PlanError
from onnx_ops.memory import release_memory
from onnx_ops.passes import _refit
from onnx_ops.passes._base import Feed, PassContext, PassLog
from onnx_ops.passes._blockwise import Block, ffn_blocks, refine
from onnx_ops.passes._layers import Linear, is_linear
from onnx_ops.passes._refit_cv import layer_choice
from onnx_ops.passes._refit_factors import refit_pair
from onnx_ops.passes._refit_targets import select, teacher_tensors
from onnx_ops.passes._structured_refit import recover_structured
from onnx_ops.plan import DistillStep

__all__ = ["DistillPass"]

logger = logging.getLogger(__name__)


class DistillPass(ir.passes.InPlacePass):
    """Refit pruned MatMul/Gemm/Conv layers to the teacher's layer outputs as one DistillStep says."""

    def __init__(self, step: DistillStep, context: PassContext) -> None:
        super().__init__()
        self.step = step
        self.context = context
        self.log = PassLog()
        self.residuals: dict[str, str] = {}
        self.pairs: dict[str, ir.Node] = {}  # second factor's layer name -> the first factor's MatMul

    def precheck(self, model: ir.Model) -> None:
        """Refuse a step without calibration data or without any MatMul/Gemm/Conv with a constant weight.

        Raises:
            PlanError: What is missing.
        """
        if not self.context.calibration:
            raise PlanError("distill needs calibration data: give a .npz with one array per model input")
        if self.context.teacher is None:
            raise PlanError("distill needs the model before the plan as its teacher")
        if not any(is_linear(node) for node in model.graph):
            raise PlanError("distill finds no MatMul, Gemm or Conv layer with a constant float weight")

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        """Refit in place; ``modified`` is False when no layer was pruned or no refit lowered the error."""
        self.precheck(model)
        teacher = self.context.teacher
        feeds = list(self.context.calibration or [])
        assert teacher is not None
        structured = recover_structured(model, teacher, feeds, self.step, self.log)  # layers that changed shape
        selected = select(model.graph, teacher_tensors(teacher), self.step, self.log)
        targets, self.residuals, self.pairs = selected.layers, selected.residuals, selected.pairs
        if not targets and structured:
            return ir.passes.PassResult(model, modified=True)
        if not targets:
            self.log.warnings.append(
                "distill found no pruned or factorized MatMul/Gemm/Conv layer to recover; the model is unchanged"
            )
            return ir.passes.PassResult(model, modified=False)
        levels = sorted({t.level for t in targets}) if self.step.sequential else [0]
        with tempfile.TemporaryDirectory(prefix="distill-", dir=self.context.workdir) as folder:
            # The teacher runs once (its layer outputs are every level's targets, kept on disk); the student is
            # written once and rerun per capture run, only the part its layers need, its changed weights
            # rewritten in place. Sessions map the weights from these files rather than copy them.
            runs = [group for level in levels for group in _refit.runs(_at(targets, level, self.step), PassLog())]
            recorded = _record(Path(folder), teacher, runs, self._blocks_of(targets), feeds, self.step)
            recorded.residuals = self.residuals
            student = ModelFile(model, Path(folder))
            # Many small solves: one BLAS thread each is far faster than threads that wait on a busy machine.
            with threadpool_limits(limits=1, user_api="blas"):
                before, refit = self._levels(recorded, student, targets, levels, feeds)
            refined = self._blocks(recorded, student, targets, feeds)
            after = recorded.output_error(Session(student.path, ()), feeds)
        kinds = [selected.kinds[t.name] for t in targets]
        self.log.summary.update(
            layers_refit=refit,
            layers_selected=[f"{kind}: {kinds.count(kind)}" for kind in sorted(set(kinds))],
            residual_targets=len(self.residuals),
            blocks_refined=refined,
            levels=len(levels),
            calibration_feeds=len(feeds),
            model_rel_error_before=before.relative,
            model_rel_error_after=after.relative,
        )
        logger.info("distill: %s", self.log.summary)
        return ir.passes.PassResult(model, modified=refit > 0)

    def _levels(
        self, recorded: Targets, student: ModelFile, targets: list[Linear], levels: list[int], feeds: list[Feed]
    ) -> tuple[OutputError, int]:
        """Capture and refit level by level; the model's output error before any refit, and the layers refit."""
        before: OutputError | None = None
        refit = 0
        number = 0  # the capture runs were recorded in this same order
        later = {id(block.down) for block in self._blocks_of(targets)}  # whose targets block refinement reads again
        for level in levels:
            # Capture runs whose statistics stay under a cap together (a layer too large for one is skipped).
            for group in _refit.runs(_at(targets, level, self.step), self.log):
                first = before is None
                names = [t.layer.input for t in group] + [self.residuals.get(t.name, "") for t in group]
                session = Session(student.path, [n for n in names if n], only_extra=not first)
                stats, error = recorded.capture(session, number, feeds, folds=_folds(feeds), model_error=first)
                del session
                if not any(id(t) in later for t in group):
                    recorded.drop(number)
                number += 1
                before = error if before is None else before
                changed = [t for t in group if self._refit(t, stats[t.layer.name])]
                refit += len(changed)
                student.update(v for t in changed for v in (t.weight, t.bias, *self._first_weight(t)))
                del stats
                if student.large:
                    release_memory()  # the session's arena and this run's statistics, before the next run's
        if before is None:  # every layer was too large to capture: the model's error as it is
            before = recorded.output_error(Session(student.path, ()), feeds)
        assert before is not None
        return before, refit

    def _blocks(self, recorded: Targets, student: ModelFile, targets: list[Linear], feeds: list[Feed]) -> int:
        """Block-wise refinement of the FFN blocks among the targets, in graph order; the blocks it improved."""
        blocks = self._blocks_of(targets) if self.step.block_steps > 0 and _folds(feeds) == 2 else []
        refined, notes = 0, list[str]()
        for block in blocks:
            x, z = block.up.layer.input, block.down.layer.output
            if recorded.group_of(block.down.layer.name) is None:
                notes.append(f"{block.name}: its output layer was not captured")
                continue
            session = Session(student.path, [x, z], only_extra=True)
            rows, origin = recorded.rows(session, [x, z], block.down.layer, feeds)
            del session
            result = refine(block, rows[x], rows[z], rows[f"teacher:{z}"], origin % 2, self.step.block_steps)
            if result.kept:
                student.update([block.up.weight, block.up.bias, block.down.weight, block.down.bias])
            refined += result.kept
            note = f"held-out relative squared error {result.before:.4g} -> {result.after:.4g} at step {result.steps}"
            notes.append(f"{block.name}: {note if result.kept else result.reason}")
        if notes:
            self.log.summary["blocks"] = notes
        return refined

    def _blocks_of(self, targets: list[Linear]) -> list[Block]:
        """The FFN blocks among the targets whose output layer is fit to its own output (not a residual sum)."""
        return [block for block in ffn_blocks(targets) if block.down.name not in self.residuals]

    def _first_weight(self, target: Linear) -> list[ir.Value | None]:
        """The first factor's weight of a low-rank pair's second factor (refit with it), else nothing."""
        first = self.pairs.get(target.name)
        return [] if first is None else [first.inputs[1]]

    def _refit(self, target: Linear, stats: LayerStats) -> int:
        """Refit one layer at its cross-validated damping (see _refit_cv); 1 if it was refit."""
        first = self.pairs.get(target.name)
        if first is not None:
            return refit_pair(target, first, stats, self.step.damping, self.log)
        choice = layer_choice(target, stats, self.step.damping)
        if choice is not None and not choice.helps:
            self.log.skip(target.name, "no refit predicted held-out calibration feeds better than the pruned layer")
            return 0
        return _refit.refit(target, stats, self.step.damping if choice is None else choice.damping, self.log)


def _at(targets: list[Linear], level: int, step: DistillStep) -> list[Linear]:
    """The targets refit at one level (all of them when the step is not sequential)."""
    return [t for t in targets if t.level == level or not step.sequential]


def _record(
    folder: Path,
    teacher: onnx.ModelProto,
    runs: list[list[Linear]],
    blocks: list[Block],
    feeds: list[Feed],
    step: DistillStep,
) -> Targets:
    """The teacher's targets of every capture run (and of skipped block outputs), from one run per feed."""
    groups = [[t.layer for t in group] for group in runs]
    captured = {la.name for group in groups for la in group}
    extra = [b.down.layer for b in blocks if b.down.layer.name not in captured]
    groups += [extra] if extra else []
    session = Session(write_proto(teacher, folder / "teacher.onnx"), [la.output for g in groups for la in g])
    mask = AUTO if step.rows == "real" else None  # "all": padded positions (attention mask 0) are fit too
    recorded = Targets.record(session, groups, feeds, folder / "targets.bin", positions=step.positions, row_mask=mask)
    del session
    release_memory()
    return recorded


def _folds(feeds: list[Feed]) -> int:
    """Two folds (even and odd feeds) for cross-validation when there are enough feeds, else one."""
    return 2 if len(feeds) >= 4 else 1
