"""The form's plan check: the answer the upload would give to a plan, before any file is sent.

The form asks it as the plan changes, so a plan the server refuses is shown as refused next to the controls
(each pydantic error by its location, to mark the step or field) instead of after an upload of the model.
"""

from __future__ import annotations

from typing import Any

from pydantic import ValidationError

from onnx_ops.plan import Plan
from service import api
from service.errors import ApiError
from service.settings import Settings

__all__ = ["MAX_CHECK_BYTES", "check_plan"]

MAX_CHECK_BYTES = 256 * 1024  # the plan field itself is at most 64 KiB
_MAX_ERRORS = 20
_MESSAGE_CHARS = 300
_FILES = frozenset({"model", "calibration", "evaluation"})


def _cut(text: str) -> str:
    return text if len(text) <= _MESSAGE_CHARS else text[: _MESSAGE_CHARS - 1] + "…"


def check_plan(plan_text: str, files: list[str], settings: Settings) -> dict[str, Any]:
    """What the upload would say of this plan with these file fields chosen.

    Returns:
        {"ok": bool, "message": the upload's refusal (None when ok), "errors": [{"loc": [...], "message": ...}],
        "calibration": what in the plan needs calibration data, in words (`Plan.calibration_user`), or None}
        where each error's loc is pydantic's (e.g. ["steps", 0, "quantize", "embedding_bits"]).
    """
    errors: list[dict[str, Any]] = []
    calibration = None
    try:
        # JSON mode, as the upload parses it: "8" is not 8
        calibration = Plan.model_validate_json(plan_text).calibration_user
    except ValidationError as e:
        for err in e.errors(include_url=False)[:_MAX_ERRORS]:
            loc = [p if isinstance(p, int) else str(p)[:100] for p in err["loc"]]
            errors.append({"loc": loc, "message": _cut(str(err["msg"]))})
    try:
        plan = api._plan(plan_text, {f for f in files if f in _FILES})
        api._check_fits_the_deadline(plan, settings)
    except ApiError as e:
        return {"ok": False, "message": _cut(e.message), "errors": errors, "calibration": calibration}
    return {"ok": True, "message": None, "errors": errors, "calibration": calibration}
