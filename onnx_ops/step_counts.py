"""One reconciled set of counts per step, for the report page: what each node's weights became, by op type.

A quantize step records its work in three places that count different things: ``layers`` (one per changed weight,
computed in int8 or only stored as int8), ``skipped`` (groups such as ``Conv x9``, nodes whose weights were left
as they were) and warnings or summary figures counting nodes left in float (computed in float, whatever their
storage). Read apart they seem to disagree ("Skipped: Conv x9", "left 53 Conv in float", "weights changed 45");
this table puts them side by side, so that 53 = 44 stored + 9 untouched shows.
"""

from __future__ import annotations

import dataclasses
import re

from onnx_ops.report import StepResult

__all__ = ["OpCounts", "opset_text", "skipped_nodes", "step_counts"]

_GROUP = re.compile(r"^(?P<op>.+) x(?P<count>\d+)$")  # how passes name a group of skipped nodes: "Conv x9"
_STORED = "int8 storage"  # the note of a weight stored as int8 and computed in float


@dataclasses.dataclass(frozen=True)
class OpCounts:
    """Nodes of one op type by what the step did to their weights."""

    op_type: str
    computed: int  # nodes whose weights are computed in int8 (or otherwise changed by the step)
    stored: int  # nodes whose weights are stored as int8 and computed in float
    untouched: int  # nodes skipped: weights left as they were

    @property
    def in_float(self) -> int:
        """Nodes computed in float: stored as int8 or untouched."""
        return self.stored + self.untouched


def skipped_nodes(step: StepResult) -> int:
    """How many nodes the step skipped (a group "Conv x9" counts 9)."""
    return sum(_group(s.name)[1] for s in step.skipped)


def step_counts(step: StepResult) -> list[OpCounts]:
    """Per op type: nodes whose weights changed (computed in int8, or stored as int8) and nodes skipped."""
    computed: dict[str, set[str]] = {}
    stored: dict[str, set[str]] = {}
    for layer in step.layers:
        table = stored if (layer.note or "").startswith(_STORED) else computed
        table.setdefault(layer.op_type, set()).add(layer.name)
    untouched: dict[str, int] = {}
    for item in step.skipped:
        op, count = _group(item.name)
        if op is not None:
            untouched[op] = untouched.get(op, 0) + count
    ops = sorted(computed.keys() | stored.keys() | untouched.keys())
    return [OpCounts(op, len(computed.get(op, ())), len(stored.get(op, ())), untouched.get(op, 0)) for op in ops]


def opset_text(step: StepResult) -> str | None:
    """The opset change in words when the summary's two opset figures would seem to disagree, else None.

    The quantize step raises the opset of the model it hands to ONNX Runtime's quantizer; when the int8 result is
    not kept (the speed check kept float compute), the model keeps its own opset.
    """
    summary = step.summary
    said, after = summary.get("opset"), summary.get("opset_after")
    match = re.match(r"upgraded (\d+) -> (\d+)", said) if isinstance(said, str) else None
    if match is None or not isinstance(after, int) or int(match.group(2)) == after:
        return None
    return (
        f"opset {after} in the result: it was raised {match.group(1)} -> {match.group(2)} for ONNX Runtime's "
        "quantizer, whose int8 model was not kept"
    )


def _group(name: str) -> tuple[str | None, int]:
    match = _GROUP.match(name)
    return (match.group("op"), int(match.group("count"))) if match else (None, 1)
