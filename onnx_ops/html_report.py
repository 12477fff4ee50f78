"""Render a Report as one self-contained HTML page: inline CSS, server-side SVG charts, no external assets.

Charts are computed here as lists of SVG primitives (rects, texts, lines) and drawn by the template, so every
string that reaches the page, including node and tensor names from user models, goes through Jinja's autoescape.
"""

from __future__ import annotations

import functools
import json
import math
from collections.abc import Callable, Sequence

import jinja2

from onnx_ops.auto_charts import auto_charts
from onnx_ops.gzip_text import approx, estimate_note, gzip_detail, gzip_text
from onnx_ops.report import LayerChange, Report, StepResult
from onnx_ops.report_text import fmt_bytes, fmt_count, fmt_db, fmt_num, fmt_pct, fold_ratio, short_tail, sig, wbr
from onnx_ops.step_counts import opset_text, skipped_nodes, step_counts
from onnx_ops.svg import WIDTH, Chart, Rect, Text, nice_step
from onnx_ops.timing import basis_text, speed_text

__all__ = ["LATENCY_NOISE", "fold_ratio", "latency_headline", "render_html"]

_WIDTH = WIDTH
_BASIS = {"thread_cpu": "thread CPU time", "process_cpu": "process CPU time", "wall": "wall-clock time"}
LATENCY_NOISE = 0.05  # relative latency changes below this are within what interleaved timing can resolve
_LABEL_W = 230  # left column for row labels
_ROW_H = 22
_MAX_LAYER_ROWS = 40  # past this a chart stops being readable; the full list stays in the table


def render_html(report: Report) -> str:
    """Render the report as one self-contained HTML page (inline CSS and SVG, no scripts, no external assets).

    Args:
        report: The compression report to show.

    Returns:
        The complete HTML document as a string.
    """
    template = _env().get_template("report.html")
    return template.render(
        r=report,
        headline=_headline(report),
        size_chart=_size_chart(report),
        latency_chart=_latency_chart(report),
        steps=[(step, _layer_chart(step)) for step in report.steps],
        op_rows=_op_rows(report),
        full_rank=_full_rank,
        config_json=lambda config: json.dumps(config, default=str),
        accuracy_change=_accuracy_change,
        step_counts=step_counts,
        skipped_nodes=skipped_nodes,
        opset_text=opset_text,
        auto=auto_charts(report.auto) if report.auto is not None else None,
        speed_text=speed_text,
        basis_text=basis_text,
        gzip_text=lambda stats: gzip_text(stats, fmt_bytes),
        gzip_note=estimate_note(report.before, report.after),
    )


@functools.cache
def _env() -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.PackageLoader("onnx_ops", "templates"),
        autoescape=True,  # always: node, tensor and output names come from untrusted models
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters.update(bytes=fmt_bytes, count=fmt_count, num=fmt_num, pct=fmt_pct, db=fmt_db, sig=sig, wbr=wbr)
    return env


# --- headline and tables ----------------------------------------------------------------------------------


def _headline(r: Report) -> list[dict[str, str]]:
    """The figures a person deciding whether to ship looks at first."""
    size, size_tone = fold_ratio(r.before.size_bytes, r.after.size_bytes, "smaller", "larger")
    gz, gz_tone = fold_ratio(r.before.gzip_bytes, r.after.gzip_bytes, "smaller", "larger")
    b, a = r.before, r.after
    gz_note = estimate_note(b, a)
    params = f"{(a.parameters / b.parameters - 1) * 100:+.1f}%" if b.parameters else "n/a"
    items = [
        _item("Size on disk", size, f"{fmt_bytes(b.size_bytes)} → {fmt_bytes(a.size_bytes)}", size_tone),
        _item("Size gzipped", approx(gz, bool(gz_note)), gzip_detail(b, a, fmt_bytes), gz_tone, gz_note),
        _item(*latency_headline(r)),
        _item("Parameters", f"{fmt_count(b.parameters)} → {fmt_count(a.parameters)}", params, "same"),
    ]
    outs = r.agreement.outputs
    if outs:
        cos = min(o.cosine for o in outs)
        low = [o.cosine_p5 for o in outs if o.cosine_p5 is not None]
        top1 = [o.top1_agreement for o in outs if o.top1_agreement is not None]
        detail = f"worst of {len(outs)} output(s), samples pooled"
        detail += f"; {fmt_num(min(low), 5)} at the 5th-percentile sample" if low else ""
        detail += f"; top-1 agreement {fmt_pct(min(top1))}" if top1 else ""
        tone = "bad" if min([cos, *low]) < 0.99 else "same"
        items.append(_item("Cosine similarity", fmt_num(cos, 5), detail, tone))
    exact = r.agreement.exact
    if exact:
        worst = min(exact, key=lambda x: x.exact_agreement)
        detail = f"integer output {worst.name!r}" if len(exact) == 1 else f"worst of {len(exact)} integer outputs"
        tone = "bad" if worst.exact_agreement < 0.99 else "same"
        items.append(_item("Exact agreement", fmt_pct(worst.exact_agreement, 2), detail, tone))
    acc = r.agreement.accuracy
    if acc is not None:
        detail = f"{_accuracy_change(acc.drop_points)} on {acc.samples} labelled samples"
        tone = "bad" if acc.drop_points > 1 else "same"
        items.append(_item("Task accuracy", f"{fmt_pct(acc.before)} → {fmt_pct(acc.after)}", detail, tone))
    return items


def latency_headline(r: Report) -> tuple[str, str, str, str]:
    """(label, value, detail, tone) of the latency figure: the verdict from the interval, never raw milliseconds.

    Wall-clock milliseconds appear only in the detail, labelled, and not when the host was busy. Reports before
    schema 1.2 have no interval: their p50 ratio is shown, labelled as wall-clock.
    """
    wall = f"wall-clock, p50: {sig(r.latency_before.p50_ms)} ms → {sig(r.latency_after.p50_ms)} ms"
    c = r.latency
    if c is None:
        lat, tone = fold_ratio(r.latency_before.p50_ms, r.latency_after.p50_ms, "faster", "slower", LATENCY_NOISE)
        return "Latency (wall-clock p50)", lat, wall, tone
    value = speed_text(c).split(" (", 1)[0]
    interval = (
        f"time ratio {c.ratio:.3g}, {min(c.confidence, 0.95):.0%} interval {c.ratio_low:.3g} to {c.ratio_high:.3g}"
    )
    detail = f"{interval} ({_BASIS[c.basis]}); " + (
        "measured on a busy host: wall-clock figures not trustworthy" if c.contention.busy else wall
    )
    return "Latency", value, detail, {"faster": "good", "slower": "bad"}.get(c.verdict, "same")


def _accuracy_change(drop_points: float) -> str:
    if abs(drop_points) < 0.005:
        return "unchanged"
    return f"{abs(drop_points):.2f} points {'lower' if drop_points > 0 else 'higher'}"


def _item(label: str, value: str, detail: str, tone: str, title: str = "") -> dict[str, str]:
    return {"label": label, "value": value, "detail": detail, "tone": tone, "title": title}


def _op_rows(r: Report) -> list[dict[str, object]]:
    """Op histogram rows, marking ops the compression added or removed."""
    before, after = r.before.op_counts, r.after.op_counts
    rows = []
    for op in sorted(before.keys() | after.keys(), key=lambda o: (-max(before.get(o, 0), after.get(o, 0)), o)):
        b, a = before.get(op, 0), after.get(op, 0)
        status = "added" if not b else "removed" if not a else "changed" if a != b else ""
        rows.append({"op": op, "before": b, "after": a, "delta": a - b, "status": status})
    return rows


# --- charts -----------------------------------------------------------------------------------------------

Group = tuple[str, float, float, Callable[[float], str]]  # label, before, after, value formatter


def _finite(x: float | None, default: float = 0.0) -> float:
    """x, or default when missing, nan or infinite (keeps bar widths and sort keys well defined)."""
    return x if x is not None and math.isfinite(x) else default


def _pairs_chart(label: str, groups: Sequence[Group], top: float | None = None) -> Chart:
    """Grouped horizontal bars, before above after; each pair on its own scale unless `top` sets a shared one."""
    bar_w, bar_h, gap = _WIDTH - _LABEL_W - 150, 18, 14
    chart = Chart(label=label, height=len(groups) * (2 * bar_h + gap))
    for i, (name, before, after, fmt) in enumerate(groups):
        y = i * (2 * bar_h + gap)
        scale = top or max(_finite(before), _finite(after), 1e-12)
        chart.texts.append(Text(_LABEL_W - 10, y + bar_h + 5, name, "label", "end"))
        for j, (cls, value) in enumerate((("before", before), ("after", after))):
            w = max(_finite(value) / scale * bar_w, 1.0)  # a 1px stub shows a zero value is not missing
            yy = y + j * bar_h
            chart.rects.append(Rect(_LABEL_W, yy + 1, w, bar_h - 3, cls, f"{name}, {cls}: {fmt(value)}"))
            chart.texts.append(Text(_LABEL_W + w + 6, yy + bar_h - 5, fmt(value), "value"))
    return chart


def _size_chart(r: Report) -> Chart:
    b, a = r.before, r.after
    gz_note = estimate_note(b, a)
    groups: list[Group] = [
        ("Bytes on disk", b.size_bytes, a.size_bytes, fmt_bytes),
        (approx("Gzip bytes", bool(gz_note)), b.gzip_bytes, a.gzip_bytes, fmt_bytes),
        ("Parameters", b.parameters, a.parameters, fmt_count),
    ]
    chart = _pairs_chart("Model size before and after", groups)
    chart.note = " ".join(["Each pair of bars is drawn to its own scale; shorter is smaller.", gz_note]).strip()
    return chart


def _latency_chart(r: Report) -> Chart:
    lb, la = r.latency_before, r.latency_after

    def ms(v: float) -> str:
        return f"{sig(v)} ms"

    groups: list[Group] = [(p, getattr(lb, f"{p}_ms"), getattr(la, f"{p}_ms"), ms) for p in ("p50", "p90", "p99")]
    top = max(max(_finite(g[1]), _finite(g[2])) for g in groups) or 1e-9
    chart = _pairs_chart("Wall-clock latency before and after, milliseconds", groups, top)
    # One unit for all bars, so a shared axis with ticks makes the comparison readable.
    bar_w, axis_y = _WIDTH - _LABEL_W - 150, chart.height
    chart.lines.append((_LABEL_W, 0, _LABEL_W, axis_y))
    chart.lines.append((_LABEL_W, axis_y, _LABEL_W + bar_w, axis_y))
    step = nice_step(top)
    for k in range(int(top / step + 1e-9) + 1):
        x = _LABEL_W + k * step / top * bar_w
        chart.lines.append((x, axis_y, x, axis_y + 5))
        chart.texts.append(Text(x, axis_y + 18, f"{k * step:g}", "tick", "middle"))
    chart.texts.append(Text(_LABEL_W + bar_w / 2, axis_y + 36, "milliseconds (shorter is faster)", "axis", "middle"))
    chart.height = axis_y + 42
    return chart


# --- per-layer chart --------------------------------------------------------------------------------------

Metric = tuple[str, str, Callable[[LayerChange], float | None], Callable[[LayerChange], str]]  # title, css class


def _full_rank(layer: LayerChange) -> int:
    """Largest rank the original weight could have (as a matrix of its first dim by the rest)."""
    shape = layer.shape_before
    return min(shape[0], math.prod(shape[1:])) if len(shape) >= 2 else (shape[0] if shape else 0)


def _metrics(layers: Sequence[LayerChange]) -> list[Metric]:
    """Chart columns for whichever of sparsity, rank and rel_error the step filled in (css class = field name)."""
    worst = max((x.rel_error for x in layers if x.rel_error is not None and math.isfinite(x.rel_error)), default=0)
    worst = worst or 1.0
    biggest = max((x.params_before for x in layers), default=0) or 1
    candidates: list[Metric] = [
        ("Sparsity (share of zeros)", "sparsity", lambda x: x.sparsity, lambda x: fmt_pct(x.sparsity)),
        ("Rank kept / full rank", "rank", _rank_fraction, lambda x: f"{x.rank} / {_full_rank(x)}"),
        (
            f"Relative error (bar scale 0 to {fmt_pct(worst)})",
            "rel_error",
            lambda x: None if x.rel_error is None else x.rel_error / worst,
            lambda x: fmt_pct(x.rel_error, 2),
        ),
    ]
    metrics = [m for m in candidates if any(getattr(x, m[1]) is not None for x in layers)]
    # e.g. quantize reports nothing per weight but the weight itself, so show which weights and how big.
    return metrics or [
        ("Parameters in each changed weight", "params", lambda x: x.params_before / biggest, _param_text)
    ]


def _rank_fraction(layer: LayerChange) -> float | None:
    return None if layer.rank is None else layer.rank / max(_full_rank(layer), 1)


def _param_text(layer: LayerChange) -> str:
    b, a = layer.params_before, layer.params_after
    return fmt_count(b) if a == b else f"{fmt_count(b)} → {fmt_count(a)}"


def _pick_rows(layers: Sequence[LayerChange]) -> tuple[list[LayerChange], str]:
    """All layers, or the most telling _MAX_LAYER_ROWS of them and a note saying which."""
    if len(layers) <= _MAX_LAYER_ROWS:
        return list(layers), ""
    if any(x.rel_error is not None for x in layers):
        key, what = (lambda x: _finite(x.rel_error, -1.0)), "highest relative error"
    else:
        key, what = (lambda x: float(x.params_before)), "most parameters"
    rows = sorted(layers, key=key, reverse=True)[:_MAX_LAYER_ROWS]
    return rows, f"Showing the {_MAX_LAYER_ROWS} of {len(layers)} weights with the {what}; all are in the table."


def _layer_chart(step: StepResult) -> Chart | None:
    """One row per changed weight, one bar column per metric the step reports; None if it changed nothing."""
    if not step.layers:
        return None
    rows, note = _pick_rows(step.layers)
    metrics = _metrics(step.layers)
    panel_w = (_WIDTH - _LABEL_W) / len(metrics)
    bar_w, head = panel_w - 100, 26
    chart = Chart(label=f"Step {step.index} ({step.kind}) per weight", height=head + len(rows) * _ROW_H, note=note)
    for m, (title, *_) in enumerate(metrics):
        chart.texts.append(Text(_LABEL_W + m * panel_w, 16, title, "head"))
    for i, layer in enumerate(rows):
        y = head + i * _ROW_H
        tip = f"{layer.name} ({layer.op_type}) weight {layer.weight} {layer.shape_before} → {layer.shape_after}"
        tip += f"; {layer.note}" if layer.note else ""
        chart.texts.append(Text(_LABEL_W - 10, y + 15, short_tail(layer.name), "label", "end", tip))
        for m, (title, cls, frac, text) in enumerate(metrics):
            x0, value = _LABEL_W + m * panel_w, frac(layer)
            chart.rects.append(Rect(x0, y + 3, bar_w, _ROW_H - 6, "track"))
            if value is None or not math.isfinite(value):
                chart.texts.append(Text(x0 + bar_w + 6, y + 15, "—", "value"))
                continue
            w = max(min(value, 1.0) * bar_w, 1.0)
            chart.rects.append(Rect(x0, y + 3, w, _ROW_H - 6, cls, f"{layer.name}: {title} {text(layer)}"))
            chart.texts.append(Text(x0 + bar_w + 6, y + 15, text(layer), "value"))
    return chart
