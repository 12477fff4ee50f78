"""The pages that show a gzip figure mark it approximate, with the reason, when it is an estimate."""

from __future__ import annotations

import html
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

import onnx_ops.gzip_size as gzip_size
from onnx_ops import compress, save_report
from onnx_ops.html_report import render_html
from onnx_ops.plan import Plan
from onnx_ops.report import Report
from service.job_view import figures
from service.jobs import JobState, JobStore
from service.main import create_app
from service.settings import Settings

import models

_PLAN = {
    "steps": [{"kind": "quantize", "mode": "dynamic", "speed_check": False}],
    "evaluation": {"latency_runs": 3, "warmup_runs": 1},
}


def _report(monkeypatch: pytest.MonkeyPatch, estimated: bool) -> Report:
    if estimated:
        monkeypatch.setattr(gzip_size, "EXACT_BYTES", 4096)  # the small model's gzip figure becomes an estimate
    report = compress(models.mlp(), _PLAN).report
    assert report.before.gzip_estimated is estimated and report.after.gzip_estimated is estimated
    return report


def _gzip_cells(page: str) -> str:
    return page.split("<th>Gzip bytes</th>", 1)[1].split("</tr>", 1)[0]


def test_the_html_report_marks_an_estimated_gzip_figure(monkeypatch: pytest.MonkeyPatch) -> None:
    page = render_html(_report(monkeypatch, estimated=True))
    card = next(line for line in page.splitlines() if "Size gzipped" in line)
    assert 'title="Gzip size estimated (marked ~)' in card  # the reason, on hover
    value = card.split('<div class="v">', 1)[1].split("</div>", 1)[0]
    detail = card.split('<div class="d">', 1)[1].split("</div>", 1)[0]
    assert value.startswith("~") and value.endswith("x smaller")  # the ratio of two estimates
    assert detail.startswith("~") and " → ~" in detail and detail.endswith("(estimated)")
    assert _gzip_cells(page).count(">~") == 2  # both models' bytes in the statistics table
    assert 'id="gzip-note"' in page and "4,096 bytes" in page  # the reason, in words, under the table
    assert "~Gzip bytes" in page  # the size chart's label


def test_the_html_report_shows_an_exact_gzip_figure_plainly(monkeypatch: pytest.MonkeyPatch) -> None:
    page = render_html(_report(monkeypatch, estimated=False))
    assert "~" not in _gzip_cells(page) and "estimated" not in page.lower()


def test_the_job_page_marks_an_estimated_gzip_figure(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    report = _report(monkeypatch, estimated=True)
    gzip = next(f for f in figures(report) if f.key == "gzip")
    assert gzip.value.startswith("~") and gzip.detail.startswith("~") and gzip.detail.endswith("(estimated)")
    assert gzip.note.startswith("Gzip size estimated")
    assert all(not f.note for f in figures(report) if f.key != "gzip")

    settings = Settings(data_dir=tmp_path / "data", min_free_disk_mb=0, allowed_hosts=["testserver"])
    with TestClient(create_app(settings, embedded_worker=False)) as client:
        store: JobStore = client.app.state.queue.store  # type: ignore[attr-defined]
        job_id, folder = store.reserve()
        save_report(report, folder / "report.json")
        store.create(job_id, Plan.model_validate(_PLAN).model_dump(mode="json"), "m.onnx", ["model"])
        store.update(job_id, state=JobState.succeeded, started_at=1.0, finished_at=2.0)
        page = client.get(f"/jobs/{job_id}").text
    card = page.split('data-figure="gzip"', 1)[1].split('data-figure="latency"', 1)[0]
    assert f'title="{html.escape(gzip.note)}"' in card
    assert html.escape(gzip.detail) in card and f'<div class="v">{gzip.value}</div>' in card
