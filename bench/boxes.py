"""Box F1 of a detector at IoU >= 0.5, against true boxes or fp32's, its interval over images, and at a margin.

Boxes are matched one to one (IoU >= 0.5) against the true boxes (bench.captchas draws labelled captchas) or
against the fp32 model's. YOLOX rows are decoded as ddddocr's DetectionEngine decodes them (grid offsets and
log sizes at strides 8, 16 and 32) and kept, as there, when objectness x class exceeds 0.1, after NMS at IoU
0.45. The F1 thresholds scores, so a box whose score sits near the threshold flips under any perturbation;
three views of how much of a score is that:

- ``f1_interval``: a 95% bootstrap interval over the evaluation images (which images were drawn moves F1);
- ``difference_interval``: a 95% paired bootstrap interval of one model's F1 minus another's on the same images;
- ``margin_f1``: F1 where a box scoring within ``margin`` of the threshold may be found or not either way
  (fp32's box need not be matched, a box of the other model counts when it reaches threshold + margin; it
  is matched from threshold - margin).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

__all__ = [
    "box_counts",
    "box_f1",
    "difference_interval",
    "f1_interval",
    "iou",
    "margin_f1",
    "scored_boxes",
    "truth_counts",
    "yolox_boxes",
    "yolox_decode",
]

Outputs = list[list[np.ndarray]]
THRESHOLD = 0.1  # YOLOX score (objectness x class) a box needs: ddddocr's score_thr
STRIDES = (8, 16, 32)


def iou(a: np.ndarray, b: np.ndarray) -> float:
    """Intersection over union of two x1 y1 x2 y2 boxes."""
    w = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    h = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = w * h
    return float(inter / max(1e-9, (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter))


def yolox_decode(out: np.ndarray) -> np.ndarray:
    """[anchors, 5 + classes] rows in input pixels: YOLOX's raw rows of a square input, strides 8, 16 and 32.

    The raw row of the anchor at grid cell (gx, gy) of stride s is [x, y, log w, log h, ...] in cells;
    decoded it is [(x + gx) s, (y + gy) s, e^(log w) s, e^(log h) s, ...], as YOLOX's demo_postprocess.
    """
    rows = out.reshape(-1, out.shape[-1]).astype(np.float64)
    side = round((len(rows) / sum(1 / s**2 for s in STRIDES)) ** 0.5)
    cells = [side // s for s in STRIDES]
    if sum(n * n for n in cells) != len(rows) or any(n * s != side for n, s in zip(cells, STRIDES, strict=True)):
        raise ValueError(f"{len(rows)} rows are not the YOLOX grid of a square input at strides {STRIDES}")
    grid = np.concatenate([np.stack(np.meshgrid(np.arange(n), np.arange(n)), 2).reshape(-1, 2) for n in cells])
    stride = np.concatenate([np.full((n * n, 1), s, np.float64) for n, s in zip(cells, STRIDES, strict=True)])
    decoded = rows.copy()
    decoded[:, :2] = (rows[:, :2] + grid) * stride
    decoded[:, 2:4] = np.exp(rows[:, 2:4]) * stride
    return decoded


def scored_boxes(out: np.ndarray, threshold: float = THRESHOLD) -> tuple[np.ndarray, np.ndarray]:
    """Decoded YOLOX rows scoring above threshold after greedy NMS at IoU 0.45: boxes x1 y1 x2 y2, scores."""
    rows = yolox_decode(out)
    rows = rows[rows[:, 4] * rows[:, 5] > threshold]
    rows = rows[np.argsort(-(rows[:, 4] * rows[:, 5]))]
    boxes = np.stack([rows[:, 0] - rows[:, 2] / 2, rows[:, 1] - rows[:, 3] / 2,
                      rows[:, 0] + rows[:, 2] / 2, rows[:, 1] + rows[:, 3] / 2], 1)  # fmt: skip
    kept: list[int] = []
    for i, box in enumerate(boxes):
        if all(iou(box, boxes[k]) < 0.45 for k in kept):
            kept.append(i)
    return boxes[kept].reshape(-1, 4), (rows[kept, 4] * rows[kept, 5]).reshape(-1)


def yolox_boxes(out: np.ndarray, threshold: float = THRESHOLD) -> np.ndarray:
    """The boxes of scored_boxes (x1 y1 x2 y2)."""
    return scored_boxes(out, threshold)[0]


def _match(want: np.ndarray, got: np.ndarray) -> list[tuple[int, int, float]]:
    """Greedy one-to-one matches (want index, got index, IoU) at IoU >= 0.5, fp32's boxes in score order."""
    used: set[int] = set()
    found = []
    for i, box in enumerate(want):
        best, match = max(((iou(box, g), j) for j, g in enumerate(got) if j not in used), default=(0.0, -1))
        if best >= 0.5:
            used.add(match)
            found.append((i, match, best))
    return found


def truth_counts(boxes: Callable[[np.ndarray], np.ndarray], outs: Outputs, truth: list[np.ndarray]) -> np.ndarray:
    """[images, 3]: matched boxes, found and true boxes together, summed IoU of the matches (per image)."""
    rows = []
    for o, want in zip(outs, truth, strict=True):
        got = boxes(o[0])
        matches = _match(want, got)
        rows.append((len(matches), len(got) + len(want), sum(m[2] for m in matches)))
    return np.array(rows, float).reshape(-1, 3)


def box_counts(boxes: Callable[[np.ndarray], np.ndarray], outs: Outputs, ref: Outputs) -> np.ndarray:
    """truth_counts against the boxes of a reference model's outputs (fp32's)."""
    return truth_counts(boxes, outs, [boxes(r[0]) for r in ref])


def box_f1(boxes: Callable[[np.ndarray], np.ndarray], outs: Outputs, ref: Outputs) -> tuple[float, float]:
    """(F1 in percent of the boxes matched one to one at IoU >= 0.5 against fp32's, their mean IoU in percent)."""
    hits, total, ious = box_counts(boxes, outs, ref).sum(axis=0)
    return 100.0 * 2 * hits / max(1.0, total), 100.0 * ious / hits if hits else 0.0


def f1_interval(counts: np.ndarray, draws: int = 2000, seed: int = 0) -> tuple[float, float]:
    """95% bootstrap interval of box F1 (percent) over the images of box_counts."""
    index = np.random.default_rng(seed).integers(0, len(counts), size=(draws, len(counts)))
    f1 = 200.0 * counts[index, 0].sum(axis=1) / np.maximum(1.0, counts[index, 1].sum(axis=1))
    low, high = np.percentile(f1, [2.5, 97.5])
    return float(low), float(high)


def difference_interval(counts: np.ndarray, base: np.ndarray, draws: int = 2000, seed: int = 0) -> tuple[float, float]:
    """95% paired bootstrap interval of F1(counts) - F1(base) in points, both box_counts of the same images."""
    index = np.random.default_rng(seed).integers(0, len(counts), size=(draws, len(counts)))

    def f1(c: np.ndarray) -> np.ndarray:
        return 200.0 * c[index, 0].sum(axis=1) / np.maximum(1.0, c[index, 1].sum(axis=1))

    low, high = np.percentile(f1(counts) - f1(base), [2.5, 97.5])
    return float(low), float(high)


def margin_f1(outs: Outputs, ref: Outputs, margin: float = 0.05) -> float:
    """YOLOX box F1 (percent) where boxes scoring within `margin` of the threshold need not agree."""
    hits = total = 0
    for o, r in zip(outs, ref, strict=True):
        want, wanted = scored_boxes(r[0])
        got, scores = scored_boxes(o[0], THRESHOLD - margin)
        matches = _match(want, got)
        matched = {m[0] for m in matches}
        used = {m[1] for m in matches}
        hits += len(matches)
        total += 2 * len(matches)
        total += sum(1 for i, s in enumerate(wanted) if i not in matched and s >= THRESHOLD + margin)
        total += sum(1 for j, s in enumerate(scores) if j not in used and s >= THRESHOLD + margin)
    return 100.0 * 2 * hits / max(1, total)
