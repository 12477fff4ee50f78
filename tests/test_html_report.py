"""Tests of the self-contained HTML report: structure, no external references, escaping, figures, edge cases."""

from __future__ import annotations

import html
import json
import math
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

from onnx_ops import compress
from onnx_ops.auto_charts import auto_charts
from onnx_ops.html_report import render_html
from onnx_ops.report import (
    Accuracy,
    Agreement,
    AutoCandidate,
    AutoResult,
    Contention,
    EvaluationData,
    ExactAgreement,
    Latency,
    LatencyComparison,
    LayerChange,
    ModelStats,
    OutputAgreement,
    Report,
    Skipped,
    StepResult,
)
from onnx_ops.step_counts import opset_text, skipped_nodes, step_counts
from onnx_ops.svg import nice_ticks, tick_text
from onnx_ops.timing import verdict

EVIL = "<script>alert(1)</script>"
_CHROMIUM = "/usr/bin/chromium"


def _stats(size: int, gzip: int, params: int, zeros: float, ops: dict[str, int]) -> ModelStats:
    return ModelStats(
        size_bytes=size,
        gzip_bytes=gzip,
        parameters=params,
        zero_fraction=zeros,
        nodes=sum(ops.values()),
        op_counts=ops,
        opset=17,
    )


def _latency(p50: float) -> Latency:
    return Latency(runs=200, p50_ms=p50, p90_ms=p50 * 1.2, p99_ms=p50 * 1.6, mean_ms=p50 * 1.1, throughput_per_s=900.0)


def _prune_step() -> StepResult:
    layers = [
        LayerChange(
            name=f"/encoder/layer.{i}/fc{j}/MatMul",
            op_type="MatMul",
            weight=f"encoder.layer.{i}.fc{j}.weight",
            shape_before=[256, 256],
            shape_after=[256, 256],
            params_before=65536,
            params_after=65536,
            sparsity=0.5 + 0.05 * i + 0.02 * j,
            rel_error=0.08 + 0.02 * i,
        )
        for i in range(4)
        for j in range(2)
    ]
    layers[0] = layers[0].model_copy(update={"name": EVIL})
    return StepResult(
        index=1,
        kind="prune",
        config={"kind": "prune", "sparsity": 0.6, "structured": False},
        seconds=0.42,
        parameters_before=600_000,
        parameters_after=600_000,
        layers=layers,
        skipped=[Skipped(name="/head/Gemm", reason="excluded by the plan (last layer)")],
    )


def _svd_step() -> StepResult:
    layers = [
        LayerChange(
            name="/encoder/layer.0/attention/self/query/MatMul_with_a_really_long_generated_suffix_0",
            op_type="MatMul",
            weight="q.weight",
            shape_before=[256, 256],
            shape_after=[256, 64, 64, 256],
            params_before=65536,
            params_after=32768,
            rank=64,
            rel_error=0.21,
        ),
        LayerChange(
            name="/head/Gemm",
            op_type="Gemm",
            weight="head.weight",
            shape_before=[10, 256],
            shape_after=[10, 256],
            params_before=2560,
            params_after=2560,
            rank=None,
            rel_error=None,
            note="full rank kept",
        ),
    ]
    return StepResult(
        index=2,
        kind="svd",
        config={"kind": "svd", "energy": 0.9},
        seconds=1.3,
        parameters_before=600_000,
        parameters_after=567_232,
        layers=layers,
        warnings=["rank of /head/Gemm would not save parameters; left unchanged"],
    )


def _quant_step() -> StepResult:
    layers = [
        LayerChange(
            name=f"/encoder/layer.{i}/fc1/MatMul",
            op_type="MatMul",
            weight=f"encoder.layer.{i}.fc1.weight",
            shape_before=[256, 256],
            shape_after=[256, 256],
            params_before=65536,
            params_after=65536,
        )
        for i in range(3)
    ]
    return StepResult(
        index=3,
        kind="quantize",
        config={"kind": "quantize", "mode": "dynamic", "per_channel": True},
        seconds=0.8,
        parameters_before=567_232,
        parameters_after=567_232,
        layers=layers,
        summary={"weights_quantized": 3, "ops": ["MatMul"]},
    )


def make_report(**update: object) -> Report:
    """A small realistic report with prune, svd and quantize steps; `update` replaces top-level fields."""
    report = Report(
        tool_versions={"onnx_ops": "0.1.0", "onnx": "1.19.0", "onnxruntime": "1.23.0"},
        host={"cpu": "x86_64", "cores": 8, "ort_threads": 1},
        plan={"steps": [{"kind": "prune"}, {"kind": "svd"}, {"kind": "quantize"}]},
        before=_stats(2_400_000, 2_210_000, 600_000, 0.0, {"MatMul": 12, "Add": 12, "Relu": 6, "Gemm": 1}),
        after=_stats(
            700_000, 310_000, 567_232, 0.41, {"MatMul": 14, "Add": 12, "Relu": 6, "Gemm": 1, "DynamicQuantizeLinear": 3}
        ),
        steps=[_prune_step(), _svd_step(), _quant_step()],
        data=EvaluationData(
            source="synthetic",
            samples=32,
            note="inputs were synthesized because no data was given",
            input_shapes={"input": [1, 256]},
        ),
        latency_before=_latency(2.0),
        latency_after=_latency(1.1),
        agreement=Agreement(
            outputs=[
                OutputAgreement(
                    name="logits",
                    max_abs_err=0.12,
                    mean_abs_err=0.01,
                    cosine=0.9987,
                    snr_db=28.5,
                    top1_agreement=0.97,
                ),
                OutputAgreement(name="hidden", max_abs_err=0.0, mean_abs_err=0.0, cosine=1.0, snr_db=math.inf),
            ],
            accuracy=Accuracy(output="logits", samples=500, before=0.912, after=0.904, drop_points=0.8),
        ),
        warnings=["quantize: 2 MatMul nodes have float inputs from a Shape subgraph and were left in float"],
        total_seconds=12.5,
    )
    return report.model_copy(update=update)


def test_complete_document() -> None:
    page = render_html(make_report())
    assert page.lstrip().startswith("<!DOCTYPE html>")
    for tag in ("<html", "<head>", '<meta charset="utf-8">', "<title>", "<style>", "<body>", "</body>", "</html>"):
        assert tag in page
    assert page.count("<svg") >= 5  # size, latency, one per step


def test_no_external_references() -> None:
    page = render_html(make_report())
    assert "http://" not in page and "https://" not in page
    for attr in re.findall(r"""\b(?:src|href)\s*=\s*["']?([^"'\s>]*)""", page, flags=re.I):
        assert not attr.startswith(("//", "http")), attr
    assert not re.search(r"<script[^>]*\bsrc", page, flags=re.I)
    assert not re.search(r"<link\b", page, flags=re.I)
    assert "@import" not in page and "url(" not in page
    assert "<img" not in page


def test_user_names_are_escaped() -> None:
    evil_output = OutputAgreement(name=EVIL, max_abs_err=0, mean_abs_err=0, cosine=1, snr_db=math.inf)
    report = make_report(
        warnings=[EVIL],
        tool_versions={EVIL: EVIL},
        agreement=Agreement(outputs=[evil_output]),
    )
    report.before.op_counts[EVIL] = 1
    page = render_html(report)
    assert EVIL not in page
    assert "<script" not in page.lower()
    assert html.escape(EVIL, quote=False) in page or "&lt;script&gt;" in page


def test_break_hints_do_not_unescape_names() -> None:
    page = render_html(make_report())
    assert "&lt;/<wbr>script&gt;" in page  # the break hint goes between escaped pieces
    assert "/<wbr>encoder/<wbr>layer.<wbr>0/<wbr>fc1/<wbr>MatMul" in page


def test_headline_figures_match_report() -> None:
    report = make_report()
    page = render_html(report)
    assert f"{report.before.size_bytes / report.after.size_bytes:.1f}x smaller" in page
    assert f"{report.before.gzip_bytes / report.after.gzip_bytes:.1f}x smaller" in page
    assert f"{report.latency_before.p50_ms / report.latency_after.p50_ms:.1f}x faster" in page
    assert "0.9987" in page  # worst cosine
    assert "97.0%" in page  # top-1 agreement
    assert "91.2%" in page and "90.4%" in page  # accuracy before / after
    assert "inputs were synthesized because no data was given" in page
    assert "∞ (identical)" in page  # infinite SNR
    assert "inf dB" not in page


def test_slower_model_is_reported_as_slower() -> None:
    page = render_html(make_report(latency_after=_latency(2.4)))
    assert "1.2x slower" in page
    assert "faster" not in page.split("<h2>")[0]


def test_small_changes_keep_two_decimals() -> None:
    page = render_html(make_report(latency_after=_latency(1.9)))
    assert "1.05x faster" in page


def test_layer_charts_adapt_to_fields() -> None:
    page = render_html(make_report())
    assert "Sparsity (share of zeros)" in page  # prune
    assert "Rank kept / full rank" in page and "64 / 256" in page  # svd
    assert "Relative error" in page
    assert "Parameters in each changed weight" in page  # quantize: no per-weight metric
    assert "full rank kept" in page


def test_long_names_truncated_in_chart_with_full_title() -> None:
    page = render_html(make_report())
    long = "/encoder/layer.0/attention/self/query/MatMul_with_a_really_long_generated_suffix_0"
    assert "…" in page
    assert f"<title>{long} (MatMul)" in page


def test_step_without_layers_and_no_accuracy() -> None:
    empty = StepResult(index=1, kind="prune", config={}, seconds=0.0, parameters_before=10, parameters_after=10)
    report = make_report(steps=[empty], agreement=Agreement(outputs=[]))
    page = render_html(report)
    assert "This step changed no weights." in page
    assert "task accuracy was not measured" in page


def test_no_steps_zero_sizes_and_nan() -> None:
    zero = _stats(0, 0, 0, 0.0, {})
    out = OutputAgreement(name="y", max_abs_err=math.nan, mean_abs_err=math.nan, cosine=math.nan, snr_db=-math.inf)
    report = make_report(
        steps=[],
        before=zero,
        after=zero,
        latency_before=_latency(0.0),
        latency_after=_latency(0.0),
        agreement=Agreement(outputs=[out]),
        warnings=[],
    )
    page = render_html(report)
    assert "The plan had no steps." in page
    assert "n/a" in page


def test_many_layers_are_capped_in_the_chart() -> None:
    layers = [
        LayerChange(
            name=f"layer_{i}",
            op_type="MatMul",
            weight=f"w{i}",
            shape_before=[8, 8],
            shape_after=[8, 8],
            params_before=64,
            params_after=64,
            sparsity=i / 500,
        )
        for i in range(500)
    ]
    step = StepResult(
        index=1, kind="prune", config={}, seconds=1, parameters_before=1, parameters_after=1, layers=layers
    )
    page = render_html(make_report(steps=[step]))
    chart = page[page.index("Step 1 (prune) per weight") :]
    chart = chart[: chart.index("</svg>")]
    assert chart.count('class="sparsity"') == 40
    assert "Showing the 40 of 500 weights" in page
    height = float(re.findall(r'viewBox="0 0 1000 (\d+)"', page)[-1])
    assert height < 1200
    assert "layer_<wbr>499" in page  # every layer is still in the table


def test_report_round_trips_through_json_with_infinity() -> None:
    report = Report.model_validate_json(make_report().model_dump_json())
    assert "∞ (identical)" in render_html(report)


@pytest.mark.parametrize("source", ["evaluation", "calibration"])
def test_real_data_is_not_flagged_as_synthetic(source: str) -> None:
    data = EvaluationData(source=source, samples=100, note="user data", input_shapes={})  # type: ignore[arg-type]
    page = render_html(make_report(data=data))
    assert "measured on synthesized inputs" not in page
    assert f"Evaluation data: {source}" in page


def test_nan_latency_is_not_drawn_as_a_number() -> None:
    bad = Latency(runs=0, p50_ms=math.nan, p90_ms=math.inf, p99_ms=math.nan, mean_ms=math.nan, throughput_per_s=0)
    page = render_html(make_report(latency_after=bad))
    assert "nan" not in page.lower().replace("nano", "")
    assert 'width="inf"' not in page


def test_latency_changes_within_timing_noise_read_as_about_the_same():
    from onnx_ops.html_report import LATENCY_NOISE, fold_ratio

    assert fold_ratio(0.00927, 0.00934, "faster", "slower", LATENCY_NOISE) == ("about the same (0.99x)", "same")
    assert fold_ratio(2.0, 1.0, "faster", "slower", LATENCY_NOISE) == ("2.0x faster", "good")
    assert fold_ratio(1.0, 1.3, "faster", "slower", LATENCY_NOISE) == ("1.3x slower", "bad")
    assert fold_ratio(100, 101, "smaller", "larger") == ("1.01x larger", "bad")


def _comparison(low: float, mid: float, high: float, busy: bool, basis: str = "thread_cpu") -> LatencyComparison:
    contention = Contention(
        load_average=[12.5, 10.0, 8.0] if busy else [0.2, 0.1, 0.1],
        cores=2,
        wall_over_cpu=6.0 if busy else 1.01,
        wall_p90_over_p50=3.2 if busy else 1.1,
        busy=busy,
        reasons=["load average 12.5 on 2 cores", "runs took 6.00x their CPU time in wall-clock time"] if busy else [],
    )
    return LatencyComparison(
        method="interleaved pairs", basis=basis, threads=1, pairs=60, ratio=mid, ratio_low=low, ratio_high=high,
        confidence=0.95, wall_ratio=0.08, wall_ratio_low=0.01, wall_ratio_high=3.0,
        verdict=verdict(low, high, mid, 0.1), min_change=0.1, target_width=0.1, reached_target=True,
        contention=contention,
    )  # fmt: skip


def _headline_card(page: str) -> str:
    cards = page.split('<section class="cards">', 1)[1].split("</section>", 1)[0]
    return next(card for card in cards.split('<div class="card') if "Latency" in card)


def test_interval_including_one_reads_no_measurable_change_even_when_milliseconds_differ() -> None:
    # Wall-clock p50 12.5x apart (what a busy host did to one byte-identical file), CPU-time ratio 0.97-1.02.
    report = make_report(
        latency_before=_latency(19.6), latency_after=_latency(1.57), latency=_comparison(0.97, 0.99, 1.02, busy=True)
    )
    page = render_html(report)
    card = _headline_card(page)
    assert "no measurable change" in card and "faster" not in card and "slower" not in card
    assert "interval 0.97 to 1.02" in card and "thread CPU time" in card
    assert "ms" not in card  # milliseconds are not trustworthy on a busy host, so not in the headline
    assert 'id="busy-host"' in page and "Measured on a busy host." in page and "load average 12.5 on 2 cores" in page
    assert "Wall-clock milliseconds (measured on a busy host: not trustworthy)" in page


def test_interval_excluding_one_gives_the_factor_and_labels_milliseconds() -> None:
    report = make_report(latency=_comparison(0.52, 0.55, 0.58, busy=False))
    page = render_html(report)
    card = _headline_card(page)
    assert "1.8x faster" in card and "interval 0.52 to 0.58" in card
    assert "wall-clock, p50: 2.00 ms → 1.10 ms" in card
    assert 'id="busy-host"' not in page
    slower = render_html(make_report(latency=_comparison(1.9, 2.1, 2.3, busy=False)))
    assert "2.1x slower" in _headline_card(slower)


def test_process_cpu_basis_is_named() -> None:
    page = render_html(make_report(latency=_comparison(0.5, 0.6, 0.7, busy=False, basis="process_cpu")))
    assert "process CPU time" in _headline_card(page)
    assert "CPU time of the process" in page


def _small_and_large_conv() -> onnx.ModelProto:
    """Conv 3->4 (108 weights: too small to store as int8), Conv 4->32 (1152), pool, Gemm 32->10."""
    rng = np.random.default_rng(0)
    weights = {
        "c0.W": rng.standard_normal((4, 3, 3, 3)),
        "c1.W": rng.standard_normal((32, 4, 3, 3)) * 0.2,
        "fc.W": rng.standard_normal((10, 32)) * 0.2,
    }
    nodes = [
        helper.make_node("Conv", ["x", "c0.W"], ["a"], name="c0", pads=[1, 1, 1, 1]),
        helper.make_node("Conv", ["a", "c1.W"], ["b"], name="c1", pads=[1, 1, 1, 1]),
        helper.make_node("GlobalAveragePool", ["b"], ["p"], name="pool"),
        helper.make_node("Flatten", ["p"], ["f"], name="flatten"),
        helper.make_node("Gemm", ["f", "fc.W"], ["y"], name="fc", transB=1),
    ]
    graph = helper.make_graph(
        nodes, "convs", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 3, 8, 8])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 10])],
        [numpy_helper.from_array(w.astype(np.float32), n) for n, w in weights.items()],
    )  # fmt: skip
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_quantize_counts_reconcile_in_one_table() -> None:
    """Weights changed, nodes skipped and Conv left in float are counted apart; the page shows how they add up."""
    result = compress(
        _small_and_large_conv(),
        {"steps": [{"kind": "quantize", "speed_check": False}], "evaluation": {"latency_runs": 3, "warmup_runs": 1}},
    )
    step = result.report.steps[0]
    counts = {c.op_type: c for c in step_counts(step)}
    assert (counts["Conv"].computed, counts["Conv"].stored, counts["Conv"].untouched) == (0, 1, 1)
    assert counts["Gemm"].computed == 1
    assert counts["Conv"].in_float == step.summary["conv_left_in_float"] == 2
    assert sum(c.computed + c.stored for c in counts.values()) == len(step.layers)
    assert skipped_nodes(step) == 1
    page = render_html(result.report)
    assert "nodes skipped <b>1</b>" in page and "Skipped (1 node(s))" in page
    assert "Float compute, weights stored int8" in page
    row = re.search(r'<td class="mono">Conv</td>((?:<td class="n">\d+</td>){4})', page)
    assert row is not None and re.findall(r"\d+", row.group(1)) == ["0", "1", "1", "2"]


def test_an_opset_raised_for_a_discarded_int8_model_is_explained() -> None:
    step = _quant_step().model_copy(update={"summary": {"opset": "upgraded 11 -> 13", "opset_after": 11}})
    assert opset_text(step) == (
        "opset 11 in the result: it was raised 11 -> 13 for ONNX Runtime's quantizer, whose int8 model was not kept"
    )
    assert "whose int8 model was not kept" in render_html(make_report(steps=[step]))
    kept = step.model_copy(update={"summary": {"opset": "upgraded 11 -> 13", "opset_after": 13}})
    assert opset_text(kept) is None


@pytest.mark.parametrize(
    ("lo", "hi"), [(0.0, 0.37536), (0.0, 1.02), (0.8, 1.0), (0.99, 1.0), (0.99995, 1.0), (-3.2, 0.0), (0.0, 0.0781)]
)
def test_axis_ticks_are_round_values(lo: float, hi: float) -> None:
    ticks = nice_ticks(lo, hi)
    step = ticks[1] - ticks[0]
    mantissa = step / 10 ** math.floor(math.log10(step) + 1e-6)
    assert round(mantissa, 6) in (1.0, 2.0, 5.0)
    assert ticks[0] <= lo + 1e-12 and ticks[-1] >= hi - 1e-12 and 4 <= len(ticks) <= 8
    texts = [tick_text(t, step) for t in ticks]
    assert all(float(text) == pytest.approx(t, abs=step / 100) for text, t in zip(texts, ticks, strict=True))
    assert all(len(text.split(".")[-1]) <= 5 for text in texts)  # never 0.07812-like leftovers


def _auto_result() -> AutoResult:
    def candidate(index: int, size: float, p5: float, agreement: float, **extra: object) -> AutoCandidate:
        return AutoCandidate(
            index=index, label=f"c{index}", steps=[], status="measured", size_bytes=int(size * 1e6),
            size_ratio=size, latency_ratio=0.7 + 0.01 * index, cosine=0.9999, cosine_p5=p5, agreement=agreement,
            meets_budget=p5 >= 0.99 and agreement >= 0.99, faster=True, seconds=1.0, **extra,  # type: ignore[arg-type]
        )  # fmt: skip

    return AutoResult(
        budget="output cosine >= 0.99", threshold=0.99, goal="fastest", status="met", message="m", chosen=0,
        candidates=[candidate(0, 0.265, 0.9995, 0.996), candidate(1, 0.368, 0.80, 0.915, dominated_by=0),
                    candidate(2, 0.0781, 0.999, 0.999)],
        search_seconds=1.0, time_budget_s=60,
    )  # fmt: skip


def test_pareto_charts_tick_at_round_values_and_plot_the_judged_cosine() -> None:
    charts = auto_charts(_auto_result())
    for chart in charts.pareto:
        ticks = [t.text for t in chart.texts if t.cls == "tick" and re.fullmatch(r"-?\d+(\.\d+)?", t.text)]
        assert len(ticks) >= 8
        assert all(len(t.split(".")[-1]) <= 5 for t in ticks)
        assert {"0.80", "0.85", "0.90", "0.95", "1.00"} <= set(ticks)  # y: from the judged 0.80 sample to 1
    tips = [c.tip for c in charts.pareto[0].circles]
    assert any("beaten on size and accuracy by the default plan" in tip for tip in tips)
    page = render_html(make_report(auto=_auto_result()))
    assert "beaten on size and accuracy by the default plan (#0)" in page


def test_exact_agreement_and_samples_used_of_given_are_shown() -> None:
    exact = ExactAgreement(name="label", samples=540, elements=540, exact_agreement=0.915, samples_equal=0.915)
    report = make_report(
        agreement=Agreement(outputs=[], exact=[exact]),
        data=EvaluationData(source="evaluation", samples=256, available=540, note="n", input_shapes={"x": [1, 4]}),
    )
    page = render_html(report)
    assert "Exact agreement" in page and "91.50%" in page
    assert "256 sample(s) used of the 540 given" in page


_PHONE_CHECK = """
import json, sys
from playwright.sync_api import sync_playwright
with sync_playwright() as p:
    browser = p.chromium.launch(executable_path=sys.argv[1], args=["--no-sandbox", "--disable-gpu"])
    page = browser.new_page(viewport={"width": 360, "height": 800})
    page.set_content(open(sys.argv[2], encoding="utf-8").read())
    boxes = page.eval_on_selector_all("svg", "els => els.map(e => e.getBoundingClientRect().right)")
    print(json.dumps([boxes, page.evaluate("document.documentElement.scrollWidth")]))
    browser.close()
"""


def test_charts_fit_a_phone_screen(tmp_path: Path) -> None:
    """At 360 px, every chart is drawn whole inside the page: scaled, not cut off or scrolled."""
    if not Path(_CHROMIUM).exists():
        pytest.skip(f"{_CHROMIUM} not found")
    pytest.importorskip("playwright.sync_api")
    page = tmp_path / "report.html"
    page.write_text(render_html(make_report(auto=_auto_result())), encoding="utf-8")
    # In its own process: the browser tests' Playwright keeps an event loop in this one, and a second sync
    # Playwright refuses to start inside it.
    run = subprocess.run(
        [sys.executable, "-c", _PHONE_CHECK, _CHROMIUM, str(page)], capture_output=True, text=True, timeout=120
    )
    assert run.returncode == 0, run.stderr[-2000:]
    boxes, width = json.loads(run.stdout)
    assert len(boxes) >= 6 and max(boxes) <= 360 and width <= 360
