"""bench/prune_allocation.py takes each variant's per-layer sparsity from the report bench/recovery.py returns."""

from __future__ import annotations

import json

import numpy as np

from bench import prune_allocation, recovery, tasks
from tests import models


def _tiny_task() -> tasks.Task:
    rng = np.random.default_rng(0)
    x = rng.standard_normal((8, 1, 64)).astype(np.float32)
    return tasks.Task("tiny_mlp", "3-layer MLP", models.mlp(), {"x": x[:4]}, {"x": x[4:]}, {"x": [1, 64]})


def test_each_variant_reports_its_prune_steps_per_layer_sparsity():
    task = _tiny_task()
    calibration = {"x": np.random.default_rng(1).standard_normal((6, 1, 64)).astype(np.float32)}
    sizes = {"fc0": 64 * 128, "fc1": 128 * 128, "fc2": 128 * 10}
    for variant in ("magnitude", "owl + distill"):
        found = prune_allocation.measure(task, calibration, prune_allocation.VARIANTS[variant])
        layers = dict(found["prune_layers"])
        assert sorted(layers) == sorted(sizes), variant
        assert all(0.0 < s < 1.0 for s in layers.values()), variant
        pruned = sum(layers[name] * size for name, size in sizes.items()) / sum(sizes.values())
        assert abs(pruned - found["prune_achieved"]) < 1e-3, variant
        assert found["gap"] >= 0.0 and set(found["gaps"]) == {"logits"}
        json.dumps(found, default=float)  # what --json writes


def test_recovery_measure_returns_the_figures_and_the_compression_report():
    task = _tiny_task()
    row, report = recovery.measure(task, task.calibration, [recovery.PRUNE])
    assert [step.kind for step in report.steps] == ["prune"]
    assert row["gap"] == max(row["gaps"].values()) and "layers_refit" not in row
    json.dumps(row, default=float)  # bench/recovery.py --json writes the figures only
