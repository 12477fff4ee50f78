"""The compression plan: an ordered list of steps, one schema for the library, the CLI and the service.

A plan is JSON such as::

    {"steps": [
      {"kind": "prune", "method": "unstructured", "sparsity": 0.5},
      {"kind": "svd", "energy": 0.99},
      {"kind": "quantize", "mode": "static", "format": "qdq", "per_channel": true}
    ]}

``onnx-compress plan-schema`` prints the full JSON schema with every field's description. Each step kind's
model lives in its own module (plan_prune, plan_svd, plan_distill, plan_quantize, plan_auto, plan_formats);
this one holds the union of them, the plan and its order rules, and re-exports every step model.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Annotated

from pydantic import BaseModel, Field, model_validator

from onnx_ops._plan_config import FROZEN
from onnx_ops.plan_auto import AutoStep, EvaluationOptions
from onnx_ops.plan_distill import DistillStep
from onnx_ops.plan_formats import ClusterStep, Fp16Step, Int4Step, OptimizeStep
from onnx_ops.plan_prune import PruneStep
from onnx_ops.plan_quantize import QuantizeStep
from onnx_ops.plan_svd import SvdStep

__all__ = [
    "DEFAULT_PLAN",
    "FINAL_KINDS",
    "LOSSLESS_KINDS",
    "AutoStep",
    "ClusterStep",
    "DistillStep",
    "EvaluationOptions",
    "Fp16Step",
    "Int4Step",
    "OptimizeStep",
    "Plan",
    "PruneStep",
    "QuantizeStep",
    "Step",
    "SvdStep",
]

# Steps that leave weights in a format the other passes cannot read: one of them per plan, as its last step.
FINAL_KINDS = ("quantize", "int4", "fp16", "cluster")
# Steps exact up to float round-off: distill's teacher is the model after the plan's leading ones (see teacher.py).
LOSSLESS_KINDS = ("optimize",)


Step = Annotated[
    OptimizeStep | PruneStep | SvdStep | DistillStep | QuantizeStep | Int4Step | Fp16Step | ClusterStep | AutoStep,
    Field(discriminator="kind"),
]


class Plan(BaseModel):
    """An ordered list of compression steps plus how to measure the result."""

    model_config = FROZEN

    steps: list[Step] = Field(min_length=1, max_length=16)
    input_shapes: dict[str, list[int]] = Field(
        default_factory=dict,
        description="Shape of one sample for inputs with symbolic dimensions, e.g. "
        '{"input_ids": [1, 128]}. A symbolic first (batch) dimension defaults to 1.',
    )
    evaluation: EvaluationOptions = Field(default_factory=EvaluationOptions)
    external_data: bool = Field(
        False,
        description="Write the compressed model's weights to a data file beside the .onnx (external data), as "
        "models past 2 GiB always are; the service then returns a .zip of both files.",
    )

    @model_validator(mode="after")
    def _check_order(self) -> Plan:
        kinds = [s.kind for s in self.steps]
        if "auto" in kinds and len(kinds) > 1:
            raise ValueError("auto chooses the prune, svd and quantize steps itself: it must be the only step")
        if kinds.count("quantize") > 1:
            raise ValueError("a plan can quantize only once")
        if "quantize" in kinds and kinds.index("quantize") != len(kinds) - 1:
            after = kinds[kinds.index("quantize") + 1]
            raise ValueError(
                f"quantize must be the last step: {after} after quantize would work on int8 weights "
                "that it cannot read; put prune and svd before quantize"
            )
        if "distill" in kinds and not {"prune", "svd"} & set(kinds[: kinds.index("distill")]):
            raise ValueError("distill needs a prune or svd step before it: it refits the layers they change")
        _check_teacher_order(kinds)
        final = [kind for kind in kinds if kind in FINAL_KINDS]
        if len(final) > 1:
            raise ValueError(
                f"a plan can end in only one of {', '.join(FINAL_KINDS)} (got {', '.join(final)}): each leaves "
                "weights in a format the others cannot read"
            )
        if final and kinds[-1] != final[0]:
            raise ValueError(
                f"{final[0]} must be the last step: {kinds[kinds.index(final[0]) + 1]} after {final[0]} would work "
                "on weights it cannot read; put prune and svd before it"
            )
        for name, shape in self.input_shapes.items():
            if any(d < 1 for d in shape):
                raise ValueError(f"input_shapes[{name!r}] must have positive dimensions, got {shape}")
        return self

    @property
    def needs_calibration(self) -> bool:
        """True when a step needs the user's calibration data."""
        return self.calibration_user is not None

    @property
    def calibration_user(self) -> str | None:
        """What in the plan needs calibration data, in words ("static quantization"), or None."""
        for s in self.steps:
            if isinstance(s, QuantizeStep) and s.mode == "static":
                return "static quantization"
            if isinstance(s, Int4Step) and s.method == "gptq":
                return "int4 with method gptq"
            if isinstance(s, DistillStep):
                return "distill"
            if isinstance(s, PruneStep) and s.criterion == "activation":
                return "activation-aware pruning"
            if isinstance(s, SvdStep) and s.activation_aware:
                return "svd with activation_aware"
        return None


def _check_teacher_order(kinds: Sequence[str]) -> None:
    """Refuse a lossless step between a lossy one and distill: the teacher could not mirror it (see teacher.py)."""
    if "distill" not in kinds:
        return
    last = len(kinds) - 1 - kinds[::-1].index("distill")
    lossy = next((i for i, kind in enumerate(kinds) if kind not in LOSSLESS_KINDS), len(kinds))
    late = [kind for kind in kinds[lossy:last] if kind in LOSSLESS_KINDS]
    if late:
        raise ValueError(
            f"{late[0]} must come before {kinds[lossy]} when the plan distills: distill's teacher is the model "
            f"after the plan's first lossless steps, and {late[0]} after {kinds[lossy]} renames the layers it "
            "compares; put optimize first"
        )


# The plan used when none is given: dynamic int8 quantization (about 4x smaller weights, needs no data).
DEFAULT_PLAN = '{"steps": [{"kind": "quantize", "mode": "dynamic"}]}'
