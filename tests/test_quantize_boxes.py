"""The box agreement of bench.int8_recovery's detectors: F1, its bootstrap interval, F1 at a score margin."""

from __future__ import annotations

import numpy as np

from bench import boxes


def _output(*rows: tuple[float, float, float, float, float]) -> list[np.ndarray]:
    """One YOLOX output [1, anchors, 6] with rows (cx, cy, w, h, score): objectness = score, class = 1."""
    found = np.zeros((1, 8, 6), np.float32)
    for i, (cx, cy, w, h, score) in enumerate(rows):
        found[0, i] = (cx, cy, w, h, score, 1.0)
    return [found]


def test_a_box_at_the_threshold_costs_f1_but_not_margin_f1() -> None:
    ref = [_output((10, 10, 8, 8, 0.9), (40, 40, 8, 8, 0.32))]
    other = [_output((10.5, 10, 8, 8, 0.88), (40, 40, 8, 8, 0.28))]  # the second box fell below 0.3
    f1, iou = boxes.box_f1(boxes.yolox_boxes, other, ref)
    assert f1 == 100.0 * 2 / 3 and 80.0 < iou < 100.0
    assert boxes.margin_f1(other, ref, 0.05) == 100.0
    assert boxes.margin_f1(other, ref, 0.01) == f1  # a margin smaller than the score change counts it
    clear = [_output((10, 10, 8, 8, 0.9), (40, 40, 8, 8, 0.4))]  # fp32's box clears the margin: it must be found
    lost = [_output((10, 10, 8, 8, 0.9), (40, 40, 8, 8, 0.2))]  # ... and this one is not, even at 0.3 - margin
    assert boxes.margin_f1(lost, clear, 0.05) == f1


def test_nms_keeps_the_higher_score_of_overlapping_boxes() -> None:
    found, scores = boxes.scored_boxes(_output((10, 10, 8, 8, 0.6), (11, 10, 8, 8, 0.9), (40, 40, 8, 8, 0.5))[0])
    assert scores.tolist() == [np.float32(0.9), np.float32(0.5)]
    assert found[0].tolist() == [7.0, 6.0, 15.0, 14.0]


def test_f1_interval_over_images() -> None:
    same = np.array([[3, 6, 2.7]] * 10, float)
    assert boxes.f1_interval(same) == (100.0, 100.0)
    mixed = np.array([[3, 6, 2.7]] * 5 + [[1, 6, 0.9]] * 5, float)
    low, high = boxes.f1_interval(mixed)
    assert low < 100.0 * 2 * 20 / 60 < high < 100.0
