"""The box F1 of bench.int8_recovery's detectors: YOLOX decoding, F1, its intervals, F1 at a score margin."""

from __future__ import annotations

import numpy as np
import pytest

from bench import boxes


def _output(*rows: tuple[float, float, float, float, float], stride: int = 8) -> list[np.ndarray]:
    """One raw YOLOX output of a 416 x 416 input, [1, 3549, 6]: each box (cx, cy, w, h, score) in pixels is put
    at the anchor of its centre's cell at `stride`, encoded as YOLOX emits it (objectness = score, class = 1)."""
    offset = {8: 0, 16: 52 * 52, 32: 52 * 52 + 26 * 26}[stride]
    cells = 416 // stride
    found = np.zeros((1, 3549, 6), np.float32)
    for cx, cy, w, h, score in rows:
        gx, gy = int(cx // stride), int(cy // stride)
        found[0, offset + gy * cells + gx] = (cx / stride - gx, cy / stride - gy, np.log(w / stride),
                                              np.log(h / stride), score, 1.0)  # fmt: skip
    return [found]


def test_rows_are_decoded_to_pixels_as_ddddocr_does() -> None:
    for stride in (8, 16, 32):
        found, scores = boxes.scored_boxes(_output((100, 60, 30, 40, 0.9), stride=stride)[0])
        assert np.allclose(found, [[85, 40, 115, 80]], atol=1e-4) and np.allclose(scores, [0.9])
    with pytest.raises(ValueError, match="YOLOX grid"):
        boxes.yolox_decode(np.zeros((1, 3548, 6), np.float32))


def test_a_box_at_the_threshold_costs_f1_but_not_margin_f1() -> None:
    ref = [_output((20, 20, 8, 8, 0.9), (80, 80, 8, 8, 0.12))]
    other = [_output((20.5, 20, 8, 8, 0.88), (80, 80, 8, 8, 0.08))]  # the second box fell below 0.1
    f1, iou = boxes.box_f1(boxes.yolox_boxes, other, ref)
    assert f1 == pytest.approx(100.0 * 2 / 3) and 80.0 < iou < 100.0
    assert boxes.margin_f1(other, ref, 0.05) == 100.0
    assert boxes.margin_f1(other, ref, 0.01) == pytest.approx(f1)  # a margin smaller than the change counts it
    clear = [_output((20, 20, 8, 8, 0.9), (80, 80, 8, 8, 0.2))]  # fp32's box clears the margin: it must be found
    lost = [_output((20, 20, 8, 8, 0.9), (80, 80, 8, 8, 0.04))]  # ... and this one is not, even at 0.1 - margin
    assert boxes.margin_f1(lost, clear, 0.05) == pytest.approx(f1)


def test_nms_keeps_the_higher_score_of_overlapping_boxes() -> None:
    found, scores = boxes.scored_boxes(_output((20, 20, 16, 16, 0.6), (25, 20, 16, 16, 0.9), (80, 80, 8, 8, 0.5))[0])
    assert np.allclose(scores, [0.9, 0.5]) and np.allclose(found[0], [17.0, 12.0, 33.0, 28.0], atol=1e-4)
    found, _ = boxes.scored_boxes(_output((20, 20, 8, 8, 0.6), (36, 20, 8, 8, 0.9))[0])
    assert len(found) == 2  # no overlap: both stay


def test_f1_against_true_boxes_and_its_paired_difference() -> None:
    truth = [np.array([[16, 16, 24, 24], [76, 76, 84, 84]], float)] * 10
    both = [_output((20, 20, 8, 8, 0.9), (80, 80, 8, 8, 0.9))] * 10
    one = [_output((20, 20, 8, 8, 0.9))] * 10
    found, base = boxes.truth_counts(boxes.yolox_boxes, one, truth), boxes.truth_counts(boxes.yolox_boxes, both, truth)
    assert found[:, :2].tolist() == [[1, 3]] * 10 and base[:, :2].tolist() == [[2, 4]] * 10
    low, high = boxes.difference_interval(found, base)
    assert low == high == pytest.approx(100.0 * 2 / 3 - 100.0)  # the same images: no spread
    mixed = np.concatenate([found[:5], base[5:]])
    low, high = boxes.difference_interval(mixed, base)
    assert low < 0.0 and high <= 0.0 and low > 100.0 * 2 / 3 - 100.0


def test_f1_interval_over_images() -> None:
    same = np.array([[3, 6, 2.7]] * 10, float)
    assert boxes.f1_interval(same) == (100.0, 100.0)
    mixed = np.array([[3, 6, 2.7]] * 5 + [[1, 6, 0.9]] * 5, float)
    low, high = boxes.f1_interval(mixed)
    assert low < 100.0 * 2 * 20 / 60 < high < 100.0
