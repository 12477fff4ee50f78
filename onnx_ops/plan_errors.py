"""Plan validation errors in the words of the plan: which step, which field, and what was probably meant.

pydantic says ``steps.0.quantize.mod: Extra inputs are not permitted``; a user needs
``unknown field 'mod' in step 1 (quantize); did you mean 'mode'?``. ``explain`` turns each of pydantic's
errors into such a sentence, with a close match from the fields, kinds or values the plan allows.
"""

from __future__ import annotations

import difflib
import re
import typing
from typing import Any

from pydantic import BaseModel, ValidationError
from pydantic_core import ErrorDetails

from onnx_ops.plan import EvaluationOptions, Plan, Step

__all__ = ["explain"]

# Every step kind of the plan's union -> its model, in the union's order.
_STEPS: dict[str, type[BaseModel]] = {
    typing.get_args(model.model_fields["kind"].annotation)[0]: model
    for model in typing.get_args(typing.get_args(Step)[0])
}
_QUOTED = re.compile(r"'([^']*)'")
_MAX_INPUT = 40  # characters of a refused value quoted back


def explain(error: ValidationError) -> str:
    """One line naming every problem of a plan, each as "<where>: <what>" with a suggestion when one is close."""
    return "; ".join(dict.fromkeys(_one(detail) for detail in error.errors()))


def _one(detail: ErrorDetails) -> str:
    loc = detail["loc"]
    kind, ctx = detail["type"], detail.get("ctx") or {}
    where, model = _where(loc)
    if kind == "extra_forbidden" and loc:
        field = str(loc[-1])
        return f"unknown field {field!r} {_in(where)}{_suggest(field, list(model.model_fields) if model else [])}"
    if kind == "union_tag_invalid":
        tag = str(ctx.get("tag", ""))
        return f"{where}: unknown kind {tag!r}{_suggest(tag, list(_STEPS))} (kinds: {', '.join(_STEPS)})"
    if kind == "union_tag_not_found":
        return f"{where}: a step needs a 'kind' ({', '.join(_STEPS)})"
    if kind == "missing" and loc:
        return f"{where} needs the field {str(loc[-1])!r}"
    if kind == "model_type" and not loc:
        return "the plan must be a JSON object with a 'steps' list"
    if kind == "json_invalid":
        return f"the plan is not valid JSON ({ctx.get('error', detail['msg'])})"
    message = str(detail["msg"]).removeprefix("Value error, ")
    if kind == "literal_error":
        allowed = _QUOTED.findall(str(ctx.get("expected", "")))
        message = message.replace("Input should be", "should be") + _got(detail.get("input"))
        message += _suggest(str(detail.get("input")), allowed)
    elif kind != "value_error" and "input" in detail and loc:
        message = message.replace("Input should be", "should be") + _got(detail.get("input"))
    if loc and model is not None and str(loc[-1]) in model.model_fields:
        return f"field {str(loc[-1])!r} {_in(where)}: {message}"
    if len(loc) >= 2 and isinstance(loc[-1], int) and model is not None and str(loc[-2]) in model.model_fields:
        return f"item {loc[-1] + 1} of field {str(loc[-2])!r} {_in(where)}: {message}"
    return message if not loc else f"{where}: {message}"


def _where(loc: tuple[int | str, ...]) -> tuple[str, type[BaseModel] | None]:
    """The part of the plan an error location points at, in words, and the model that validates it."""
    if len(loc) >= 2 and loc[0] == "steps" and isinstance(loc[1], int):
        step = f"step {loc[1] + 1}"
        if len(loc) >= 3 and str(loc[2]) in _STEPS:
            return f"{step} ({loc[2]})", _STEPS[str(loc[2])]
        return step, None
    if loc and loc[0] == "evaluation":
        return "evaluation", EvaluationOptions
    if loc and loc[0] == "input_shapes":
        return "input_shapes", None
    return "the plan", Plan


def _in(where: str) -> str:
    return "of the plan" if where == "the plan" else f"in {where}"


def _suggest(word: str, choices: list[str]) -> str:
    close = difflib.get_close_matches(word, choices, n=1, cutoff=0.6)
    return f"; did you mean {close[0]!r}?" if close and close[0] != word else ""


def _got(value: Any) -> str:
    if isinstance(value, dict | list):
        return ""
    text = repr(value)
    text = text if len(text) <= _MAX_INPUT else text[:_MAX_INPUT] + "..."
    return f", got {text}" + (" (text)" if isinstance(value, str) else "")
