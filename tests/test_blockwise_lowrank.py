"""Block-wise refinement of factorized FFN blocks after activation-aware SVD (svd's ``block_steps``)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
from onnx import numpy_helper
from onnx_ir.passes.common import LiftConstantsToInitializersPass

from onnx_ops.passes._base import PassContext
from onnx_ops.passes.svd import SvdFactorizePass
from onnx_ops.plan import SvdStep
from tests.test_blockwise import _ffn, _real_gap, _tokens


def _svd(model: onnx.ModelProto, block_steps: int) -> tuple[onnx.ModelProto, list[str]]:
    """Activation-aware SVD at rank 4 of both layers (the pass as the pipeline runs it), and its block notes."""
    tokens = _tokens(48, 1)
    feeds = [{"x": x, "attention_mask": m} for x, m in zip(tokens["x"], tokens["attention_mask"], strict=True)]
    student = ir.from_proto(model)
    LiftConstantsToInitializersPass(lift_all_constants=True, size_limit=0)(student)
    step = SvdStep(activation_aware=True, rank=4, min_elements=0, block_steps=block_steps)
    svd = SvdFactorizePass(step, PassContext(workdir=Path("."), calibration=feeds, teacher=model))
    svd(student)
    return ir.to_proto(student), svd.log.summary.get("blocks", [])


def test_factorized_block_refinement_beats_the_layer_wise_fit_on_held_out_tokens_at_the_same_ranks() -> None:
    model = _ffn()
    held_out = _tokens(16, 2)
    layer_wise, none = _svd(model, 0)
    refined, notes = _svd(model, 300)
    assert not none and len(notes) == 1 and "at step" in notes[0], notes
    assert _real_gap(model, refined, held_out) < 0.9 * _real_gap(model, layer_wise, held_out)
    before = {t.name: numpy_helper.to_array(t) for t in layer_wise.graph.initializer}
    after = {t.name: numpy_helper.to_array(t) for t in refined.graph.initializer}
    assert {n: a.shape for n, a in before.items()} == {n: a.shape for n, a in after.items()}  # same ranks
    changed = [name for name in before if "svd" in name and not np.array_equal(before[name], after[name])]
    assert len(changed) == 4, changed  # A and B of both layers
