"""The web form: pages that post into the same job creation as the API, a job page, and a token login.

The plan builder's widgets are generated from the pydantic plan models (`Plan`, its step models and
`EvaluationOptions`), so every schema field shows up in the form with its default, choices and description
without anyone editing a template. A static script turns the widgets into plan JSON; without JavaScript the
same form takes plan JSON typed into its textarea.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import functools
import json
import math
import re
import secrets
import types
import typing
from pathlib import Path
from typing import Any, Literal

import jinja2
from fastapi import APIRouter, FastAPI, Request, Response
from fastapi.responses import HTMLResponse, RedirectResponse
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, ValidationError
from pydantic.fields import FieldInfo
from python_multipart.multipart import MultipartParser, parse_options_header
from starlette.types import Message

from onnx_ops.html_report import fold_ratio, latency_headline
from onnx_ops.plan import Plan, Step
from onnx_ops.report import Report
from service import api
from service.deps import TOKEN_COOKIE, QueueDep, SettingsDep, token_ok
from service.errors import ApiError
from service.jobs import Job, JobNotFoundError, JobState, JobStore
from service.settings import Settings

__all__ = ["PRESETS", "Widget", "display_fraction", "figures", "mount_static", "router", "stage_text", "step_forms"]

router = APIRouter(include_in_schema=False)

_HERE = Path(__file__).parent
_DEFAULT_PLAN = {"steps": [{"kind": "quantize", "mode": "dynamic"}]}
_PLAN_CAPTURE_BYTES = 128 * 1024  # the plan field is at most 64 KiB and comes first in the form
_RECENT_JOBS = 100

# (title, short explanation, plan). Checked against the Plan schema by the tests.
PRESETS: tuple[tuple[str, str, dict[str, Any]], ...] = (
    ("Quantize: dynamic int8", "int8 weights, about 4x smaller; no data needed", _DEFAULT_PLAN),
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
)


# --- widgets from the plan schema -------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Widget:
    """One form control for one field of a plan model.

    Attributes:
        name: The field's name in the plan JSON.
        kind: select (a Literal), multi (a list of Literals), bool, int, float, list (comma-separated text),
            or shapes (input name to shape).
        default: The field's default as JSON data.
        description: The field's description from the schema.
        choices: The allowed values of select and multi widgets.
        optional: The field may be left unset (None).
        minimum: Lower bound from the schema (ge or gt).
        maximum: Upper bound from the schema (le or lt).
        only: (field, value) when the description says the field is used only with that value of a sibling.
    """

    name: str
    kind: str
    default: Any
    description: str = ""
    choices: tuple[str, ...] = ()
    optional: bool = False
    minimum: float | None = None
    maximum: float | None = None
    only: tuple[str, str] | None = None

    @property
    def label(self) -> str:
        """The field name as words."""
        return self.name.replace("_", " ")

    @property
    def default_json(self) -> str:
        """The default as JSON, for the script to compare against."""
        return json.dumps(self.default)

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


def _bounds(info: FieldInfo) -> tuple[float | None, float | None]:
    low = high = None
    for meta in info.metadata:
        low = getattr(meta, "ge", None) if getattr(meta, "ge", None) is not None else low
        low = getattr(meta, "gt", None) if getattr(meta, "gt", None) is not None else low
        high = getattr(meta, "le", None) if getattr(meta, "le", None) is not None else high
        high = getattr(meta, "lt", None) if getattr(meta, "lt", None) is not None else high
    return low, high


def _widget(name: str, info: FieldInfo) -> Widget:
    """The widget of one field; raises TypeError for a field type no widget knows (a test catches that)."""
    annotation, optional = _unwrap_optional(info.annotation)
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    choices: tuple[str, ...] = ()
    if origin is Literal:
        kind, choices = "select", tuple(map(str, args))
    elif origin is list and typing.get_origin(args[0]) is Literal:
        kind, choices = "multi", tuple(map(str, typing.get_args(args[0])))
    elif origin is list:
        kind = "list"
    elif origin is dict:
        kind = "shapes"
    elif annotation in (bool, int, float):
        kind = annotation.__name__
    else:
        raise TypeError(f"the plan field {name!r} has a type the web form has no widget for: {annotation}")
    low, high = _bounds(info)
    default = info.get_default(call_default_factory=True)
    return Widget(name, kind, default, info.description or "", choices, optional, low, high)


_ONLY = re.compile(r"^([\w:]+) only:\s*")


def _with_relevance(widgets: list[Widget]) -> tuple[Widget, ...]:
    """Tie fields described as "<value> only: ..." to the sibling select that offers that value."""
    selects = [w for w in widgets if w.kind == "select"]
    out = []
    for w in widgets:
        match = _ONLY.match(w.description)
        owner = next((s for s in selects if match and match.group(1) in s.choices and s is not w), None)
        if match and owner is not None:
            # The field is hidden unless it applies, so the "x only:" prefix would only repeat that.
            rest = w.description[match.end() :]
            w = dataclasses.replace(w, only=(owner.name, match.group(1)), description=rest[:1].upper() + rest[1:])
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
def _plan_form() -> tuple[tuple[Widget, ...], tuple[tuple[str, str, tuple[Widget, ...]], ...]]:
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


# --- templates and formatting -----------------------------------------------------------------------------


def _fmt_bytes(n: float) -> str:
    if abs(n) < 1024:
        return f"{n:.0f} B"
    power = min(int(math.log(abs(n), 1024)), 3)
    return f"{n / 1024**power:.3g} {('KiB', 'MiB', 'GiB')[power - 1]}"


def _fmt_time(ts: float | None) -> str:
    if ts is None:
        return ""
    return datetime.datetime.fromtimestamp(ts, datetime.UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def _iso(ts: float | None) -> str:
    return "" if ts is None else datetime.datetime.fromtimestamp(ts, datetime.UTC).isoformat()


@functools.cache
def _env() -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(_HERE / "templates"),
        autoescape=True,  # always: model names and error messages come from users
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters.update(bytes=_fmt_bytes, time=_fmt_time, iso=_iso, tojson_compact=json.dumps)
    return env


def _page(name: str, settings: Settings, status: int = 200, **context: Any) -> HTMLResponse:
    html = _env().get_template(name).render(token_enabled=settings.token is not None, **context)
    return HTMLResponse(html, status_code=status, headers={"Cache-Control": "no-store"})


def _not_found(settings: Settings) -> HTMLResponse:
    return _page("not_found.html", settings, status=404)


def _login_redirect(request: Request, settings: Settings) -> RedirectResponse | None:
    """A redirect to the login page when a token is configured and the request lacks it."""
    return None if token_ok(request, settings) else RedirectResponse("/login", status_code=303)


# --- the form ---------------------------------------------------------------------------------------------


def _form_page(
    settings: Settings,
    store: JobStore,
    *,
    plan_text: str | None = None,
    error: ApiError | None = None,
) -> HTMLResponse:
    top, groups = _plan_form()
    return _page(
        "index.html",
        settings,
        status=error.status if error else 200,
        steps=step_forms(),
        plan_widgets=top,
        plan_groups=groups,
        presets=PRESETS,
        plan_text=plan_text if plan_text is not None else json.dumps(_DEFAULT_PLAN, indent=2),
        error=error,
        jobs=store.list()[:_RECENT_JOBS],
        max_model_mb=settings.max_model_mb,
        max_data_mb=settings.max_data_mb,
    )


@router.get("/", response_class=HTMLResponse)
def index(request: Request, settings: SettingsDep, queue: QueueDep) -> Response:
    """The upload form and the list of earlier jobs."""
    return _login_redirect(request, settings) or _form_page(settings, queue.store)


class _PlanCapture:
    """Keep the first bytes of a request body so the plan can be shown again when the upload is refused.

    `create_job` consumes the body as a stream; this sits between it and the server, copying what passes
    until the cap. The form puts the plan before the files, so it is in that first part.
    """

    def __init__(self, request: Request) -> None:
        self._outer = request
        self._head = bytearray()
        self.request = Request(request.scope, self._receive)

    async def _receive(self) -> Message:
        message = await self._outer.receive()
        room = _PLAN_CAPTURE_BYTES - len(self._head)
        if message["type"] == "http.request" and room > 0:
            self._head.extend(message.get("body", b"")[:room])
        return message

    def plan(self) -> str | None:
        """The plan field's text, if it arrived whole within the captured bytes."""
        _, params = parse_options_header(self._outer.headers.get("content-type", ""))
        boundary = params.get(b"boundary")
        if not boundary:
            return None
        found: dict[str, str] = {}
        state: dict[str, Any] = {"field": bytearray(), "value": bytearray(), "name": "", "data": bytearray()}

        def header_end() -> None:
            if bytes(state["field"]).lower() == b"content-disposition":
                state["name"] = parse_options_header(bytes(state["value"]))[1].get(b"name", b"").decode()
            state["field"], state["value"] = bytearray(), bytearray()

        def part_end() -> None:
            if state["name"] == "plan":
                found["plan"] = bytes(state["data"]).decode("utf-8", "replace")
            state["name"], state["data"] = "", bytearray()

        callbacks = {
            "on_header_field": lambda d, s, e: state["field"].extend(d[s:e]),
            "on_header_value": lambda d, s, e: state["value"].extend(d[s:e]),
            "on_header_end": header_end,
            "on_part_data": lambda d, s, e: state["data"].extend(d[s:e]) if state["name"] == "plan" else None,
            "on_part_end": part_end,
        }
        # A body cut off by the capture or malformed by the client simply has no plan to show again.
        with contextlib.suppress(Exception):
            MultipartParser(boundary, callbacks).write(bytes(self._head))  # type: ignore[arg-type]
        return found.get("plan")


@router.post("/jobs", response_class=HTMLResponse)
async def submit(request: Request, settings: SettingsDep, queue: QueueDep) -> Response:
    """Create a job from the form (multipart: model, plan, calibration, evaluation) and go to its page."""
    if (denied := _login_redirect(request, settings)) is not None:
        return denied
    capture = _PlanCapture(request)
    try:
        job = await api.create_job(capture.request, settings, queue)
    except ApiError as e:
        page = _form_page(settings, queue.store, plan_text=capture.plan(), error=e)
        page.headers.update(e.headers)
        return page
    return RedirectResponse(f"/jobs/{job.id}", status_code=303)


# --- the job page -----------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Figure:
    """One headline figure of a finished job."""

    key: str
    title: str
    value: str
    detail: str
    tone: str = "same"


def _pct(x: float | None) -> str:
    return "n/a" if x is None or not math.isfinite(x) else f"{x * 100:.1f}%"


def figures(report: Report) -> list[Figure]:
    """The figures a person deciding whether to use the result looks at first."""
    b, a = report.before, report.after
    size, size_tone = fold_ratio(b.size_bytes, a.size_bytes, "smaller", "larger")
    gz, gz_tone = fold_ratio(b.gzip_bytes, a.gzip_bytes, "smaller", "larger")
    _, lat, lat_detail, lat_tone = latency_headline(report)
    items = [
        Figure("size", "Size on disk", size, f"{_fmt_bytes(b.size_bytes)} → {_fmt_bytes(a.size_bytes)}", size_tone),
        Figure("gzip", "Size zipped", gz, f"{_fmt_bytes(b.gzip_bytes)} → {_fmt_bytes(a.gzip_bytes)}", gz_tone),
        Figure("latency", "Latency", lat, lat_detail, lat_tone),
        Figure("parameters", "Parameters", f"{b.parameters:,} → {a.parameters:,}", "weights and constants"),
        Figure("zeros", "Zero weights", f"{_pct(b.zero_fraction)} → {_pct(a.zero_fraction)}", "of all parameters"),
    ]
    outs = report.agreement.outputs
    if outs:
        cos = min(o.cosine for o in outs)
        top1 = [o.top1_agreement for o in outs if o.top1_agreement is not None]
        detail = "1.0 means identical outputs" + (f"; same top-1 class {_pct(min(top1))}" if top1 else "")
        items.append(Figure("cosine", "Output similarity", f"{cos:.5g}", detail, "bad" if cos < 0.99 else "same"))
    acc = report.agreement.accuracy
    if acc is not None:
        tone = "bad" if acc.drop_points > 1 else "same"
        detail = f"on {acc.samples} labelled samples"
        items.append(Figure("accuracy", "Task accuracy", f"{_pct(acc.before)} → {_pct(acc.after)}", detail, tone))
    return items


def _report(store: JobStore, job: Job) -> Report | None:
    if job.state != JobState.succeeded:
        return None
    try:
        return Report.model_validate_json((store.path(job.id) / "report.json").read_bytes())
    except (OSError, ValidationError):
        return None  # deleted or expired; the page says so


def display_fraction(state: str, fraction: float) -> float:
    """Overall progress for the bar (the job process reports fractions of the whole job that only grow)."""
    if state in ("succeeded", "failed"):
        return 1.0
    if state == "queued":
        return 0.0
    return min(max(fraction, 0.0), 1.0)


_STAGE_TEXT = {
    "validate": "checking the model",
    "evaluate": "measuring both models (latency and accuracy)",
    "measured": "writing the results",
    "writing results": "writing the results",
    "done": "finishing",
}


def stage_text(state: str, stage: str | None) -> str:
    """What the job is doing, in words (app.js has the same table for updates)."""
    if state == "queued":
        return "waiting for a worker"
    return _STAGE_TEXT.get(stage or "", stage or "starting")


@router.get("/jobs/{job_id}", response_class=HTMLResponse)
def job_page(job_id: str, request: Request, settings: SettingsDep, queue: QueueDep) -> Response:
    """A job's state and progress; its figures, report and download when it has succeeded."""
    if (denied := _login_redirect(request, settings)) is not None:
        return denied
    try:
        job = queue.store.get(job_id)
    except JobNotFoundError:
        return _not_found(settings)
    view = api.JobOut.of(job, queue.store)
    report = _report(queue.store, job)
    output = queue.store.path(job.id) / "output.onnx"
    return _page(
        "job.html",
        settings,
        job=view,
        report=report,
        figures=figures(report) if report else [],
        bar=display_fraction(view.state.value, view.progress),
        stage=stage_text(view.state.value, view.stage),
        output_bytes=output.stat().st_size if report and output.exists() else None,
        plan_json=json.dumps(job.plan, indent=2),
    )


# --- login ------------------------------------------------------------------------------------------------


@router.get("/login", response_class=HTMLResponse)
def login_page(request: Request, settings: SettingsDep) -> Response:
    """The token form (straight to the form when no token is configured)."""
    if settings.token is None:
        return RedirectResponse("/", status_code=303)
    return _page("login.html", settings, error=None)


@router.post("/login", response_class=HTMLResponse)
async def login(request: Request, settings: SettingsDep) -> Response:
    """Check the token and keep it in an HttpOnly cookie that the pages and the API accept."""
    if settings.token is None:
        return RedirectResponse("/", status_code=303)
    given = str((await request.form()).get("token", "")).strip()
    expected = settings.token.get_secret_value()
    if not secrets.compare_digest(given.encode(), expected.encode()):
        return _page("login.html", settings, status=401, error="That token is not right.")
    response = RedirectResponse("/", status_code=303)
    response.set_cookie(
        TOKEN_COOKIE,
        expected,
        httponly=True,
        samesite="strict",  # also what keeps other sites from posting jobs with this cookie
        path="/",
        secure=request.url.scheme == "https",
    )
    return response


@router.post("/logout")
def logout() -> Response:
    """Forget the token cookie."""
    response = RedirectResponse("/login", status_code=303)
    response.delete_cookie(TOKEN_COOKIE, path="/", httponly=True, samesite="strict")
    return response


def mount_static(app: FastAPI) -> None:
    """Serve the form's CSS and JS from the package."""
    app.mount("/static", StaticFiles(directory=_HERE / "static"), name="static")
