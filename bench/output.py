"""The benchmark's outputs: terminal table, JSON, an HTML page with a PNG chart, and the README section."""

from __future__ import annotations

import base64
import html
import io
import json
from pathlib import Path
from typing import Any

HEADER = (
    f"{'model':20} {'variant':48} {'tool':16} {'size':>6} {'gzip':>6} {'lat 1t':>6} {'lat dt':>6} "
    f"{'cosine':>7} {'score':>13} {'secs':>5}"
)


def _f(value: float | None, spec: str, width: int) -> str:
    return f"{value:{spec}}".rjust(width) if value is not None else "-".rjust(width)


def line(row: Any) -> str:
    """One table line for a Row (or its dict)."""
    r = row if isinstance(row, dict) else row.__dict__
    if r.get("error"):
        return f"{r['model']:20} {r['variant']:48} {r['tool']:16} failed: {r['error'][:90]}"
    score = (
        f"{r['score']:.1f} ({r['score'] - r['score_fp32']:+.1f})".rjust(13)
        if r.get("score") is not None and r.get("score_fp32") is not None
        else "-".rjust(13)
    )
    return (
        f"{r['model']:20} {r['variant']:48} {r['tool']:16} {_f(r['size_ratio'], '.3f', 6)} "
        f"{_f(r['gzip_ratio'], '.3f', 6)} {_f(r['latency_ratio_1t'], '.2f', 6)} "
        f"{_f(r['latency_ratio_default'], '.2f', 6)} {_f(r['cosine'], '.4f', 7)} {score} {_f(r['seconds'], '.1f', 5)}"
    )


def summary_lines(result: dict[str, Any]) -> list[str]:
    """The headline figures in words."""
    env = result["environment"]
    lines = [f"machine: {env['cpu']}, {env['cores']} cores; {env['date']}; " + json.dumps(env["versions"])]
    models = result.get("models")
    if models:
        lines.append("size/gzip/lat: compressed / fp32 (lower is better; lat 1t = one thread, dt = default threads)")
        for model, variant in models["best_chain"].items():
            lines.append(f"best chained plan for {model}: {variant}")
        for v in models["verdicts"]:
            flags = [k for k in ("smaller_or_equal", "faster_or_equal", "as_accurate", "not_slower_than_fp32") if v[k]]
            lines.append(f"{v['model']}: ours ({v['ours']}) vs ORT ({v['onnxruntime']}): {', '.join(flags) or 'none'}")
    for name, figures in result.items():
        if name not in ("environment", "models"):
            lines.append(f"{name}: " + json.dumps(figures))
    return lines


def _chart(result: dict[str, Any]) -> bytes | None:
    """A PNG with size and one-thread latency ratios per model and variant (None without matplotlib)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    rows = [r for r in result.get("models", {}).get("rows", []) if not r["error"]]
    models = list(dict.fromkeys(r["model"] for r in rows))
    if not models:
        return None
    fig, axes = plt.subplots(len(models), 1, figsize=(11, 2.6 * len(models)), squeeze=False)
    for ax, model in zip(axes[:, 0], models, strict=True):
        mine = [r for r in rows if r["model"] == model]
        labels = [f"{r['variant']} ({r['tool']})" if r["tool"] != "ours" else r["variant"] for r in mine]
        y = range(len(mine))
        ax.barh([i - 0.2 for i in y], [r["size_ratio"] for r in mine], 0.4, label="size ratio")
        ax.barh([i + 0.2 for i in y], [r["latency_ratio_1t"] for r in mine], 0.4, label="latency ratio (1 thread)")
        ax.axvline(1.0, color="grey", lw=0.8)
        ax.set_yticks(list(y), labels, fontsize=7)
        ax.invert_yaxis()
        ax.set_title(model, fontsize=9)
        ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=90)
    plt.close(fig)
    return buffer.getvalue()


def _html(result: dict[str, Any], png: bytes | None) -> str:
    rows = result.get("models", {}).get("rows", [])
    body = "\n".join(f"<tr><td><pre>{html.escape(line(r))}</pre></td></tr>" for r in rows)
    summary = "".join(f"<li>{html.escape(s)}</li>" for s in summary_lines(result))
    image = (
        f'<img alt="size and latency ratios" src="data:image/png;base64,{base64.b64encode(png).decode()}">'
        if png
        else ""
    )
    return (
        "<!doctype html><html><head><meta charset='utf-8'><title>onnx-compress benchmarks</title>"
        "<style>body{font-family:sans-serif;margin:2em}pre{margin:0;font-size:12px}td{padding:0}</style></head>"
        f"<body><h1>onnx-compress benchmarks</h1><ul>{summary}</ul>"
        f"<table><tr><td><pre>{html.escape(HEADER)}</pre></td></tr>{body}</table>"
        f"{image}</body></html>"
    )


def write(result: dict[str, Any], out: Path) -> None:
    """Print the summary and write latest.json, latest.html and latest.png under out."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "latest.json").write_text(json.dumps(result, indent=1, default=str) + "\n")
    png = _chart(result)
    if png:
        (out / "latest.png").write_bytes(png)
    (out / "latest.html").write_text(_html(result, png))
    print("\n".join(summary_lines(result)))
    print(f"written: {out / 'latest.json'}, {out / 'latest.html'}" + (f", {out / 'latest.png'}" if png else ""))


def _pick(rows: list[dict[str, Any]], model: str, variant: str | None) -> dict[str, Any] | None:
    return next((r for r in rows if r["model"] == model and r["variant"] == variant), None)


def _cells(r: dict[str, Any] | None) -> str:
    if r is None or r["error"]:
        return "- | - | - | - | -"
    score = f"{r['score'] - r['score_fp32']:+.1f}" if r["score"] is not None else "-"
    return (
        f"{r['size_ratio']:.3f} | {r['latency_ratio_1t']:.2f} / {r['latency_ratio_default']:.2f} | "
        f"{r['cosine']:.4f} | {score} | {r['gzip_ratio']:.3f}"
    )


def markdown(result: dict[str, Any]) -> str:
    """Tables for the README: per model our int8 default, plain ORT's best, and the best chained plan."""
    env = result["environment"]
    lines = [f"Measured {env['date']} on {env['cpu']} ({env['cores']} cores), " + ", ".join(
        f"{k} {v}" for k, v in env["versions"].items()) + "."]  # fmt: skip
    later = [f"{key.removesuffix('_date')} rows {value}" for key, value in env.items() if key.endswith("_date")]
    if later:
        lines[0] += f" Measured later: {'; '.join(later)}."
    models = result.get("models")
    if models:
        rows = models["rows"]
        ours_int8 = {v["model"]: v["ours"] for v in models["verdicts"]}
        rivals = {v["model"]: v["onnxruntime"] for v in models["verdicts"]}
        chain = models["best_chain"]
        lines += [
            "",
            "Ratios are compressed / fp32 (lower is better); latency one thread / default threads; cosine is the "
            "worst output's; score is the task score's change in points.",
            "",
            "| model | fp32 ms (1 thread) | which | size | latency | cosine | score | gzip |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for model in models["descriptions"]:
            fp32 = next((r["fp32_ms_1t"] for r in rows if r["model"] == model and r["fp32_ms_1t"]), None)
            picks = [
                (f"ours: {ours_int8.get(model, 'int8 dynamic')}", _pick(rows, model, ours_int8.get(model))),
                (f"onnxruntime: {rivals.get(model, '-')}", _pick(rows, model, rivals.get(model))),
                (f"ours, best chain: {chain.get(model)}", _pick(rows, model, chain.get(model))),
            ]  # fmt: skip
            if picks[2][1] is not None and not picks[2][1]["accurate"]:
                picks[2] = (picks[2][0] + " (none within budget)", picks[2][1])
            for i, (label, row) in enumerate(picks):
                head = f"{model} | {fp32:.2f}" if i == 0 and fp32 else " | "
                lines.append(f"| {head} | {label} | {_cells(row)} |")
    if "service_overhead" in result:
        head = "| job (dynamic int8) | model MiB | HTTP s | library s | CLI s | HTTP / library | job peak RSS MiB |"
        lines += ["", head, "|---|---|---|---|---|---|---|"]
        for s in result["service_overhead"]:
            lines.append(
                f"| {s['model']} | {s['model_mib']} | {s['http_s']} | {s['library_s']} | {s['cli_s']} | "
                f"{s['overhead_ratio']:.2f} | {s['job_peak_rss_mib']} ({s['job_peak_over_model_size']}x the model) |"
            )
    if "upload_memory" in result:
        u = result["upload_memory"]
        lines += ["", f"API process during a {u['upload_mib']} MiB streamed upload: {u['api_rss_before_mib']} -> "
                  f"{u['api_rss_peak_mib']} MiB RSS (growth {u['api_rss_growth_mib']} MiB), {u['mib_per_s']} MiB/s, "
                  f"answer {u['status']} {u['answer']}."]  # fmt: skip
    if "pass_times" in result:
        lines += ["", "Pass times on a BERT-base-sized model (85M weights): " + "; ".join(
            f"{p['pass']} {p['seconds']} s" for p in result["pass_times"]) + "."]  # fmt: skip
    return "\n".join(lines)


if __name__ == "__main__":
    import sys

    print(markdown(json.loads(Path(sys.argv[1]).read_text())))
