"""Which model distill recovers towards: the model as of the last lossless step before the lossy ones.

A plan may simplify the graph (``optimize``: ONNX Runtime's basic rewrites, exact up to float round-off) before it
prunes. Distill matches the student's layers to the teacher's by weight and tensor names, and those rewrites
rename and fold them (a BatchNormalization folded into the Conv before it changes that Conv's weight and output
name), so a teacher taken before them would share few layers with the student. The teacher is therefore the model
after the plan's leading lossless steps. A lossless step after a lossy one and before distill cannot be mirrored
in the teacher: plan validation refuses that order (see ``Plan``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import onnx_ir as ir

from onnx_ops.passes._base import PassContext
from onnx_ops.plan import LOSSLESS_KINDS, Step

__all__ = ["lossless_prefix", "retarget_teacher"]


def lossless_prefix(steps: Sequence[Step]) -> int:
    """How many of the plan's first steps are lossless (the teacher is the model after them)."""
    return next((i for i, step in enumerate(steps) if step.kind not in LOSSLESS_KINDS), len(steps))


def retarget_teacher(steps: Sequence[Step], index: int, model: ir.Model, passes: Sequence[Any]) -> None:
    """Before step `index` runs: when it ends the lossless prefix and a distill step follows, make `model` the teacher.

    Args:
        steps: The plan's steps.
        index: The step about to run.
        model: The model as the earlier steps left it (copied: the later steps change it in place).
        passes: The pass objects of steps `index` onwards; those that hold a context with a teacher get the copy.
    """
    if index == 0 or index != lossless_prefix(steps) or not any(s.kind == "distill" for s in steps[index:]):
        return
    teacher = ir.to_proto(model)
    for step_pass in passes:
        context = getattr(step_pass, "context", None)
        if isinstance(context, PassContext) and context.teacher is not None:
            step_pass.context = dataclasses.replace(context, teacher=teacher)
