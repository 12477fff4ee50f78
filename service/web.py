"""The web form: pages that post into the same job creation as the API, a job page, and a token login.

The plan builder's widgets come from the pydantic plan models (service/form_schema.py); a static script turns
them into plan JSON of the types the schema expects and asks /form/plan-check whether the upload would accept it
before any file is sent. Without JavaScript the same form takes plan JSON typed into its textarea.
"""

from __future__ import annotations

import datetime
import functools
import json
from pathlib import Path
from typing import Any

import jinja2
from fastapi import APIRouter, FastAPI, Request, Response
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, RedirectResponse
from fastapi.staticfiles import StaticFiles

from onnx_ops.plan import FINAL_KINDS
from service import api, auth
from service.deps import QueueDep, SettingsDep, token_ok
from service.errors import ApiError
from service.form_capture import PlanCapture
from service.form_schema import DEFAULT_PLAN, PRESETS, Widget, plan_form, step_forms
from service.job_view import display_fraction, figures, fmt_bytes, outcome, read_report, stage_text
from service.jobs import JobNotFoundError
from service.plan_check import MAX_CHECK_BYTES, check_plan
from service.queue import JobQueue
from service.settings import Settings

__all__ = ["PRESETS", "Widget", "display_fraction", "figures", "mount_static", "router", "stage_text", "step_forms"]

router = APIRouter(include_in_schema=False)

_HERE = Path(__file__).parent
_RECENT_JOBS = 100


# --- templates and formatting -----------------------------------------------------------------------------


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
    env.filters.update(bytes=fmt_bytes, time=_fmt_time, iso=_iso, tojson_compact=json.dumps)
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
    queue: JobQueue,
    *,
    plan_text: str | None = None,
    error: ApiError | None = None,
) -> HTMLResponse:
    top, groups = plan_form()
    store = queue.store
    jobs = []
    for job in store.list()[:_RECENT_JOBS]:
        view = api.JobOut.of(job, store)
        jobs.append((job, outcome(store, job, view.stage, view.progress)))
    return _page(
        "index.html",
        settings,
        status=error.status if error else 200,
        steps=step_forms(),
        plan_widgets=top,
        plan_groups=groups,
        presets=PRESETS,
        final_kinds=FINAL_KINDS,
        plan_text=plan_text if plan_text is not None else json.dumps(DEFAULT_PLAN, indent=2),
        error=error,
        jobs=jobs,
        max_model_mb=settings.max_model_mb,
        max_data_mb=settings.max_data_mb,
    )


@router.get("/", response_class=HTMLResponse)
def index(request: Request, settings: SettingsDep, queue: QueueDep) -> Response:
    """The upload form and the list of earlier jobs."""
    return _login_redirect(request, settings) or _form_page(settings, queue)


@router.post("/form/plan-check")
async def plan_check(request: Request, settings: SettingsDep) -> Response:
    """What the upload would answer to a plan ({"plan": text, "files": [chosen file fields]}), before the upload."""
    if _login_redirect(request, settings) is not None:
        return JSONResponse({"error": {"code": "unauthorized", "message": "log in first"}}, status_code=401)
    body = bytearray()
    async for chunk in request.stream():
        body.extend(chunk)
        if len(body) > MAX_CHECK_BYTES:
            message = f"a plan check is at most {MAX_CHECK_BYTES >> 10} KiB"
            return JSONResponse({"error": {"code": "too_large", "message": message}}, status_code=413)
    try:
        data = json.loads(body)
        plan, files = data["plan"], data.get("files", [])
        if not isinstance(plan, str) or not isinstance(files, list):
            raise TypeError
    except (ValueError, KeyError, TypeError):
        message = 'send {"plan": "<the plan as JSON text>", "files": ["model", ...]}'
        return JSONResponse({"error": {"code": "invalid_request", "message": message}}, status_code=422)
    return JSONResponse(check_plan(plan, [str(f) for f in files], settings))


@router.post("/jobs", response_class=HTMLResponse)
async def submit(request: Request, settings: SettingsDep, queue: QueueDep) -> Response:
    """Create a job from the form (multipart: model, plan, calibration, evaluation) and go to its page."""
    if (denied := _login_redirect(request, settings)) is not None:
        return denied
    capture = PlanCapture(request)
    try:
        job = await api.create_job(capture.request, settings, queue)
    except ApiError as e:
        page = _form_page(settings, queue, plan_text=capture.plan(), error=e)
        page.headers.update(e.headers)
        return page
    return RedirectResponse(f"/jobs/{job.id}", status_code=303)


# --- the job page -----------------------------------------------------------------------------------------


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
    report = read_report(queue.store, job)
    return _page(
        "job.html",
        settings,
        job=view,
        report=report,
        figures=figures(report) if report else [],
        bar=display_fraction(view.state.value, view.progress),
        stage=stage_text(view.state.value, view.stage),
        download=view.model_download if report else None,
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
    """Check the token (a small urlencoded field, nothing else is read) and start a server-side session."""
    if settings.token is None:
        return RedirectResponse("/", status_code=303)
    gate: auth.Auth = request.app.state.auth
    try:
        session_id = await auth.log_in(request, gate)
    except ApiError as e:
        if e.code != "too_many_attempts":
            raise
        page = _page("login.html", settings, status=e.status, error=f"Too many wrong tokens: {e.message}.")
        page.headers.update(e.headers)
        return page
    if session_id is None:
        return _page("login.html", settings, status=401, error="That token is not right.")
    response = RedirectResponse("/", status_code=303)
    auth.set_session_cookie(response, request, session_id, gate)
    return response


@router.post("/logout")
def logout(request: Request) -> Response:
    """End the session on the server and forget its cookie."""
    response = RedirectResponse("/login", status_code=303)
    auth.log_out(request, response, request.app.state.auth)
    return response


@router.get("/favicon.ico", include_in_schema=False)
def favicon() -> FileResponse:
    """The site icon (an SVG; browsers also find it through the pages' link rel=icon)."""
    return FileResponse(_HERE / "static" / "favicon.svg", media_type="image/svg+xml")


def mount_static(app: FastAPI) -> None:
    """Serve the form's CSS and JS from the package."""
    app.mount("/static", StaticFiles(directory=_HERE / "static"), name="static")
