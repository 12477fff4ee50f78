"""Progress reports that move with the work: shares of the job, counted stages, fractions that only grow."""

from __future__ import annotations

import numpy as np

from onnx_ops import compress
from onnx_ops.progress import Tracker, count_of

import models


def test_parts_map_onto_their_share_of_the_job_and_prefix_their_stages():
    seen: list[tuple[str, float]] = []
    job = Tracker(lambda stage, fraction: seen.append((stage, fraction)))
    step = job.part(0.2, 0.6, "step 1/2: quantize")
    step.stage("")
    step.part(0.5, 1.0).count("calibration batch", 0, 4)
    step.part(0.5, 1.0).count("calibration batch", 4, 4)
    job.part(0.0, 0.1).stage("late")  # a part behind the job's progress does not move it back
    assert seen == [
        ("step 1/2: quantize", 0.2),
        ("step 1/2: quantize: calibration batch 0/4", 0.4),
        ("step 1/2: quantize: calibration batch 4/4", 0.6),
        ("late", 0.6),
    ]
    assert count_of(seen[1][0]) == ("step 1/2: quantize: calibration batch", 0, 4)
    assert count_of("step 1/2: quantize") is None


def test_counted_updates_are_thinned_but_the_first_and_last_always_arrive():
    seen: list[str] = []
    counter = Tracker(lambda stage, fraction: seen.append(stage)).counter("sample", 10_000)
    for done in range(10_001):
        counter(done)
    assert seen[0] == "sample 0/10000" and seen[-1] == "sample 10000/10000"
    assert len(seen) < 1000  # a callback that writes a file is not called 10,000 times


def test_here_reports_inside_the_current_stage_without_moving_the_fraction():
    seen: list[tuple[str, float]] = []
    search = Tracker(lambda stage, fraction: seen.append((stage, fraction))).part(0.0, 0.5, "auto")
    search.stage("candidate 3: dynamic", 0.5)
    search.here().part(0.0, 1.0, "quantize").count("calibration batch", 2, 2)
    assert seen[-1] == ("auto: candidate 3: dynamic: quantize: calibration batch 2/2", 0.25)


def test_a_static_quantization_reports_its_calibration_batches_and_evaluation_samples():
    seen: list[tuple[str, float]] = []
    calibration = {"x": np.random.default_rng(0).standard_normal((6, 64)).astype(np.float32)}
    plan = {
        "steps": [{"kind": "prune"}, {"kind": "quantize", "mode": "static"}],
        "evaluation": {"latency_runs": 3, "warmup_runs": 1},
    }
    compress(models.mlp(), plan, calibration=calibration, progress=lambda s, f: seen.append((s, f)))
    stages = [stage for stage, _ in seen]
    fractions = [fraction for _, fraction in seen]
    assert fractions == sorted(fractions) and fractions[0] == 0.0 and fractions[-1] < 1.0
    assert stages[0] == "validate" and stages[-1] == "measured"
    assert "step 1/2: prune" in stages and "step 2/2: quantize" in stages
    assert "step 2/2: quantize: calibration batch 6/6" in stages  # counted while ONNX Runtime calibrates
    assert "measuring: original model on sample 6/6" in stages
    assert "measuring: compressed model on sample 6/6" in stages
    assert any(stage.startswith("measuring: latency") for stage in stages)
