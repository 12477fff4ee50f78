"""The auto search's time budget, on an injected clock: shares of the time left, estimates, what the report says.

The clock here moves only when the test says so (each candidate's build costs scripted seconds), so every
decision is deterministic whatever the host's load: no wall-clock figure is asserted. Candidates are still built
and run by ONNX Runtime; their latency verdicts are scripted (`script_search_timing`).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from onnx_ops import compress, parse_plan
from onnx_ops.auto import SearchInputs, search
from onnx_ops.auto_clock import SearchTime, candidate_kind
from onnx_ops.data import Dataset
from onnx_ops.evaluate import Runner
from onnx_ops.html_report import render_html
from onnx_ops.passes._base import PassContext
from onnx_ops.plan import ClusterStep, DistillStep, Plan, PruneStep, QuantizeStep
from onnx_ops.progress import Tracker
from onnx_ops.report import AutoResult
from onnx_ops.run_plan import to_proto

import models
from helpers import NO_LATENCY, script_search_timing


class Clock:
    """Seconds that pass only when `advance` is called."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def _search(tmp_path: Path, step: dict, cost: dict[str, float]) -> AutoResult:
    """One search of a small MLP where a build costs cost[phase] scripted seconds (phase: the last progress stage's
    first word, e.g. "quantization"; "default" for the rest)."""
    model = models.mlp((64, 256, 256, 16))
    rng = np.random.default_rng(0)
    feeds = [{"x": rng.standard_normal((8, 64), np.float32)} for _ in range(4)]
    plan = parse_plan({"steps": [{"kind": "auto", **step}], "evaluation": NO_LATENCY})
    context = PassContext(workdir=tmp_path, input_shapes={"x": [8, 64]}, teacher=model)
    clock, stages = Clock(), []

    def build(candidate: Plan):
        word = stages[-1].split(" ")[0] if stages else ""
        clock.advance(cost.get(word, cost["default"]))
        return to_proto(model, candidate, context, Tracker(None))[0]

    inputs = SearchInputs(
        model, plan, context, Dataset(feeds), Runner(model), build, lambda s, _: stages.append(s), clock=clock
    )
    return search(inputs).result


def test_a_phase_ends_at_its_share_of_the_time_left_and_later_phases_get_theirs_after_an_overrun() -> None:
    t = SearchTime(100, Clock())
    clock = t.clock
    assert isinstance(clock, Clock)
    t.plan([("a", 1.0), ("b", 1.0), ("c", 2.0)])  # 10 s reserved for the confirmation: 90 s to share
    t.begin("a")
    assert t.phase_end() == pytest.approx(clock() + 90 / 4)
    clock.advance(70)  # "a" overran its 22.5 s by far
    t.begin("b")  # 20 s left: b gets a third of them, c (weight 2) the rest
    assert t.phase_end() == pytest.approx(clock() + 20 / 3)
    clock.advance(1)
    t.begin("c")
    assert t.phase_end() == pytest.approx(clock() + 19)
    clock.advance(19)
    assert t.out_of_time()
    phases = {p.name: p for p in t.records()}
    assert phases["b"].given_s == pytest.approx(20 / 3) and phases["c"].given_s == pytest.approx(19)
    assert phases["c"].status == "skipped" and phases["a"].status == "done"


def test_work_starts_only_when_its_estimate_from_the_same_kind_of_work_fits() -> None:
    t = SearchTime(100, Clock())
    clock = t.clock
    assert isinstance(clock, Clock)
    t.plan([("a", 1.0)])
    t.begin("a")  # ends 90 s from now
    quantize = t.work("candidate quantize:static")
    assert quantize.fits()  # nothing measured yet: the first piece starts
    with quantize:
        clock.advance(30)
    assert t.estimate("candidate quantize:static") == 30
    assert t.estimate("candidate cluster") == 30  # first of its kind: the longest candidate so far
    assert t.estimate("probe quantize") == 0  # another category
    assert t.estimate("probe proxy check", like="candidate quantize:static") == 30  # costs what such a candidate did
    clock.advance(35)  # 25 s left in the phase, less than the 30 s the same kind took
    assert not quantize.fits()
    probe = t.work("probe quantize")
    assert probe.fits()
    (a,) = t.records()
    assert a.status == "cut" and a.work == 1 and a.not_started == 1


def test_candidate_kinds_tell_costly_steps_apart() -> None:
    static, dynamic = QuantizeStep(mode="static"), QuantizeStep(mode="dynamic")
    assert candidate_kind([static]) != candidate_kind([dynamic])
    prune = PruneStep(method="structured", sparsity=0.25, only_nodes=["fc0"])
    assert candidate_kind([prune, DistillStep(), ClusterStep(bits=4)]) == ("candidate prune:structured+distill+cluster")


def test_after_a_phase_overruns_the_formats_phase_still_gets_time_and_the_report_says_what_was_cut(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The proxy check's first real quantization takes 150 s of a 200 s budget: no second one is started, and
    the later phases share what is left, so k-means is still measured and the search ends within its budget."""
    script_search_timing(monkeypatch)
    step = {"families": ["quantize", "cluster"], "time_budget_s": 200, "min_cosine": 0.99}
    auto = _search(tmp_path, step, {"quantization": 150.0, "default": 5.0})
    phases = {p.name: p for p in auto.phases}
    assert list(phases) == ["int8 settings", "int8 sensitivity", "int8 exclusions", "formats", "int8 storage"]
    assert phases["int8 sensitivity"].status == "cut" and phases["int8 sensitivity"].not_started >= 1
    assert phases["formats"].work >= 1 and phases["formats"].given_s > 0
    assert any(c.steps[-1]["kind"] == "cluster" for c in auto.candidates), [c.label for c in auto.candidates]
    assert auto.search_seconds <= auto.time_budget_s  # on the injected clock
    assert auto.stopped_early
    assert any(n.startswith("int8 sensitivity: cut short for lack of time") for n in auto.notes), auto.notes
    assert "of a 200 s time budget" in auto.message


def test_a_candidate_is_not_started_when_its_estimate_exceeds_the_time_left(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each build takes 25 s of a 60 s budget (54 s to share, 6 s kept for the confirmation): the settings phase
    (27 s) measures one candidate and starts no second one, the proxy check (a real quantization, estimated at
    25 s) is not started in the sensitivity phase's 9 s, and the second round has the 29 s left for one more
    setting. No third candidate starts: the search ends within its budget and the report lists the cut phases."""
    script_search_timing(monkeypatch)
    step = {"families": ["quantize"], "time_budget_s": 60, "min_cosine": 0.99}
    auto = _search(tmp_path, step, {"default": 25.0})
    phases = {p.name: p for p in auto.phases}
    assert phases["int8 settings"].work == 2 and phases["int8 settings"].not_started >= 1
    assert phases["int8 settings"].given_s >= 27.0  # its first round, and what the second had left
    assert phases["int8 sensitivity"].not_started >= 1 and phases["int8 sensitivity"].status == "cut"
    assert len(auto.candidates) == 2 and all(c.seconds == 25.0 for c in auto.candidates)
    assert auto.search_seconds <= auto.time_budget_s
    cut = [p for p in auto.phases if p.status != "done"]
    assert cut and all(any(n.startswith(p.name) for n in auto.notes) for p in cut)


def test_time_a_phase_leaves_goes_to_a_second_round_of_the_phases_cut_short(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Builds of 10 s, a 60 s budget: the settings phase's 27 s fit two candidates; the later phases leave time,
    and the second round measures the other two settings, so the phase ends up done with none left unstarted."""
    script_search_timing(monkeypatch)
    step = {"families": ["quantize"], "time_budget_s": 60, "min_cosine": 0.99}
    auto = _search(tmp_path, step, {"default": 10.0})
    settings = auto.phases[0]
    assert settings.name == "int8 settings" and settings.given_s > 27.0
    assert settings.work == 4 and settings.not_started == 0 and settings.status == "done", auto.phases
    assert len(auto.candidates) == 4 and auto.search_seconds <= auto.time_budget_s


def test_the_reports_show_each_phase_and_its_time(monkeypatch: pytest.MonkeyPatch) -> None:
    script_search_timing(monkeypatch)
    rng = np.random.default_rng(0)
    plan = {"steps": [{"kind": "auto", "families": ["quantize"], "time_budget_s": 60}], "evaluation": NO_LATENCY}
    result = compress(
        models.mlp((64, 256, 256, 16)), plan, evaluation={"x": rng.standard_normal((4, 8, 64), np.float32)}
    )
    auto = result.report.auto
    assert auto is not None
    assert [p.name for p in auto.phases] == ["int8 settings", "int8 sensitivity", "int8 exclusions", "int8 storage"]
    dumped = json.loads(result.report.model_dump_json())["auto"]
    assert [p["name"] for p in dumped["phases"]] == [p.name for p in auto.phases]
    html = render_html(result.report)
    assert "Time per phase" in html and "int8 exclusions" in html
