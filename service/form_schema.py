"""The plan builder's widgets, generated from the pydantic plan models, and the form's presets.

Every schema field of `Plan`, its step models and `EvaluationOptions` becomes one widget with its default,
choices, bounds and description, so the form follows the schema without anyone editing a template. Choices and
defaults are kept as JSON values of their own type (the 8 of `Literal[8, 4]` stays a number), and the page
carries them as JSON, so the script writes plans with the types the server expects.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import re
import types
import typing
from typing import Any, Literal

from pydantic import BaseModel
from pydantic.fields import FieldInfo

from onnx_ops.plan import Plan, Step

__all__ = ["DEFAULT_PLAN", "PRESETS", "StepForm", "Widget", "plan_form", "step_forms"]

DEFAULT_PLAN: dict[str, Any] = {"steps": [{"kind": "quantize", "mode": "dynamic"}]}

# (title, short explanation, plan). Checked against the Plan schema by the tests.
PRESETS: tuple[tuple[str, str, dict[str, Any]], ...] = (
    ("Quantize: dynamic int8", "int8 weights, about 4x smaller; no data needed", DEFAULT_PLAN),
    (
        "Prune 50%",
        "zero half the weights (smaller when zipped, same speed)",
        {"steps": [{"kind": "prune", "method": "unstructured", "sparsity": 0.5}]},
    ),
    ("Prune 2:4", "keep 2 of every 4 weights", {"steps": [{"kind": "prune", "method": "n:m", "n": 2, "m": 4}]}),
    (
        "Structured prune 30% + dynamic int8",
        "remove 30% of neurons, then int8: smaller and faster",
        {"steps": [{"kind": "prune", "method": "structured", "sparsity": 0.3}, {"kind": "quantize"}]},
    ),
    (
        "Structured prune 30% + static int8",
        "needs a calibration .npz",
        {
            "steps": [
                {"kind": "prune", "method": "structured", "sparsity": 0.3},
                {"kind": "quantize", "mode": "static", "per_channel": True},
            ]
        },
    ),
    ("SVD (99% energy)", "low-rank factorization of large matrices", {"steps": [{"kind": "svd", "energy": 0.99}]}),
    (
        "k-means 4-bit weights",
        "about 8x smaller weights, decoded once when the model loads: same speed",
        {"steps": [{"kind": "cluster", "bits": 4}]},
    ),
    (
        "Simplify graph + dynamic int8",
        "fold BatchNormalization into Conv and drop no-op nodes first",
        {"steps": [{"kind": "optimize"}, {"kind": "quantize", "mode": "dynamic"}]},
    ),
)


@dataclasses.dataclass(frozen=True)
class Widget:
    """One form control for one field of a plan model.

    Attributes:
        name: The field's name in the plan JSON.
        kind: select (a Literal, or an optional bool), multi (a list of Literals), bool, int, float, list
            (comma-separated text), or shapes (input name to shape).
        default: The field's default as JSON data.
        description: The field's description from the schema.
        choices: The allowed values of select and multi widgets, as JSON values of their own type.
        optional: The field may be left unset (None); a select then offers "not set".
        minimum: Lower bound from the schema (ge or gt).
        maximum: Upper bound from the schema (le or lt).
        min_exclusive: The lower bound is gt (the value must be above it).
        max_exclusive: The upper bound is lt (the value must be below it).
        only: (field, value) when the description says the field is used only with that value of a sibling.
    """

    name: str
    kind: str
    default: Any
    description: str = ""
    choices: tuple[Any, ...] = ()
    optional: bool = False
    minimum: float | None = None
    maximum: float | None = None
    min_exclusive: bool = False
    max_exclusive: bool = False
    only: tuple[str, Any] | None = None

    @property
    def label(self) -> str:
        """The field name as words."""
        return self.name.replace("_", " ")

    @property
    def default_json(self) -> str:
        """The default as JSON, for the script to compare against."""
        return json.dumps(self.default)

    @property
    def options(self) -> list[tuple[str, str]]:
        """(JSON value, label) of each choice of a select, "not set" (null) first when the field is optional."""
        values = ([None] if self.optional and self.kind == "select" else []) + list(self.choices)
        return [(json.dumps(v), "not set" if v is None else json.dumps(v).strip('"')) for v in values]

    @property
    def text_default(self) -> str:
        """The default as the text a text or number input shows."""
        if self.default is None:
            return ""
        if self.kind == "list":
            return ", ".join(self.default)
        if self.kind == "shapes":
            return "; ".join(f"{k}: {', '.join(map(str, v))}" for k, v in self.default.items())
        return str(self.default)


@dataclasses.dataclass(frozen=True)
class StepForm:
    """The widgets of one step kind."""

    kind: str
    summary: str
    widgets: tuple[Widget, ...]


def _unwrap_optional(annotation: Any) -> tuple[Any, bool]:
    """`X | None` -> (X, True); anything else -> (annotation, False)."""
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        if len(args) == 1:
            return args[0], True
    return annotation, False


def _bounds(info: FieldInfo) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for meta in info.metadata:
        for attr, key, exclusive in (("ge", "minimum", False), ("gt", "minimum", True)):
            if getattr(meta, attr, None) is not None:
                out |= {key: getattr(meta, attr), "min_exclusive": exclusive}
        for attr, key, exclusive in (("le", "maximum", False), ("lt", "maximum", True)):
            if getattr(meta, attr, None) is not None:
                out |= {key: getattr(meta, attr), "max_exclusive": exclusive}
    return out


def _widget(name: str, info: FieldInfo) -> Widget:
    """The widget of one field; raises TypeError for a field type no widget knows (a test catches that)."""
    annotation, optional = _unwrap_optional(info.annotation)
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    choices: tuple[Any, ...] = ()
    if origin is Literal:
        kind, choices = "select", args
    elif annotation is bool and optional:
        kind, choices = "select", (True, False)  # a checkbox cannot say "not set"
    elif origin is list and typing.get_origin(args[0]) is Literal:
        kind, choices = "multi", typing.get_args(args[0])
    elif origin is list:
        kind = "list"
    elif origin is dict:
        kind = "shapes"
    elif annotation in (bool, int, float):
        kind = annotation.__name__
    else:
        raise TypeError(f"the plan field {name!r} has a type the web form has no widget for: {annotation}")
    default = info.get_default(call_default_factory=True)
    return Widget(name, kind, default, info.description or "", choices, optional, **_bounds(info))


_ONLY = re.compile(r"^([\w:+]+) only:\s*")


def _with_relevance(widgets: list[Widget]) -> tuple[Widget, ...]:
    """Tie fields described as "<value> only: ..." to the sibling select that offers that value."""
    selects = [w for w in widgets if w.kind == "select"]
    out = []
    for w in widgets:
        match = _ONLY.match(w.description)
        word = match.group(1) if match else None
        owner = next((s for s in selects if s is not w and word in [str(c) for c in s.choices]), None)
        if match and owner is not None:
            value = next(c for c in owner.choices if str(c) == word)
            # The field is hidden unless it applies, so the "x only:" prefix would only repeat that.
            rest = w.description[match.end() :]
            w = dataclasses.replace(w, only=(owner.name, value), description=rest[:1].upper() + rest[1:])
        out.append(w)
    return tuple(out)


def _model_widgets(model: type[BaseModel], skip: frozenset[str] = frozenset({"kind"})) -> tuple[Widget, ...]:
    return _with_relevance([_widget(n, f) for n, f in model.model_fields.items() if n not in skip])


def _summary(model: type[BaseModel]) -> str:
    return (model.__doc__ or "").strip().splitlines()[0]


@functools.cache
def step_forms() -> tuple[StepForm, ...]:
    """One form per step kind of the plan's discriminated union, in the schema's order."""
    union = typing.get_args(Step)[0]
    forms = []
    for model in typing.get_args(union):
        kind = typing.get_args(model.model_fields["kind"].annotation)[0]
        forms.append(StepForm(kind, _summary(model), _model_widgets(model)))
    return tuple(forms)


@functools.cache
def plan_form() -> tuple[tuple[Widget, ...], tuple[tuple[str, str, tuple[Widget, ...]], ...]]:
    """Plan-level widgets (e.g. input_shapes) and nested option groups (e.g. evaluation), from `Plan`."""
    top, groups = [], []
    for name, info in Plan.model_fields.items():
        if name == "steps":
            continue
        annotation = info.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            groups.append((name, _summary(annotation), _model_widgets(annotation, frozenset())))
        else:
            top.append(_widget(name, info))
    return tuple(top), tuple(groups)
