"""Which quantized layers go back to float: those whose quantization hurts the model's outputs most.

The fidelity measure is the worst model output's mean cosine against the float model over the calibration
feeds. Candidates are the layers with the largest relative output error of their own (measured by the bias
pass of recovery); each candidate is put back in float alone and the outputs measured, then candidates are
added in the order of what they bought, keeping each only if the outputs got closer, until the target cosine
is reached or the budget of float layers is spent.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import onnx

from onnx_ops.capture import Session
from onnx_ops.passes._base import Feed
from onnx_ops.passes.quantize.qdq import QdqLayer, QdqModel

__all__: list[str] = []  # package-private

_CANDIDATES_PER_SLOT = 3  # candidates measured alone per float layer the budget allows ...
_MAX_CANDIDATES = 24  # ... but never more than this many (each costs one session and a run per feed)


class Exclusions:
    """Chooses float layers against the teacher's outputs on the calibration feeds."""

    def __init__(self, teacher: Session, feeds: Sequence[Feed], target: float, threads: int) -> None:
        self.feeds, self.target, self.threads = feeds, target, threads
        self.names = teacher.model_outputs
        self.reference = [{name: teacher.run(feed)[name] for name in self.names} for feed in feeds]

    def cosine(self, proto: onnx.ModelProto) -> float:
        """The worst float output's mean cosine against the teacher over the feeds."""
        session = Session(proto, (), self.threads)
        totals: dict[str, list[float]] = {}
        for feed, want in zip(self.feeds, self.reference, strict=True):
            got = session.run(feed)
            for name in self.names:
                if np.issubdtype(want[name].dtype, np.floating) and got[name].shape == want[name].shape:
                    totals.setdefault(name, []).append(_cosine(want[name], got[name]))
        return min((float(np.mean(values)) for values in totals.values()), default=1.0)

    def choose(
        self,
        model: QdqModel,
        layers: list[QdqLayer],
        local: dict[str, float],
        weights: dict[str, np.ndarray],
        biases: dict[str, np.ndarray | None],
        budget: int,
    ) -> tuple[float, float, list[str]]:
        """Put layers back in float in `model` (in place); returns the cosine before, after, and the layers."""
        before = self.cosine(model.proto)
        if before >= self.target or budget <= 0:
            return before, before, []
        by_name = {layer.node: layer for layer in layers}
        ranked = sorted(local, key=lambda name: -local[name])
        candidates = ranked[: min(_MAX_CANDIDATES, _CANDIDATES_PER_SLOT * budget)]
        gains = {}
        for name in candidates:
            trial = _copy(model)
            _to_float(trial, by_name[name], weights, biases)
            gains[name] = self.cosine(trial.proto) - before
        chosen: list[str] = []
        current = before
        for name in sorted(gains, key=lambda n: -gains[n]):
            if len(chosen) >= budget or current >= self.target or gains[name] <= 0:
                break
            trial = _copy(model)
            _to_float(trial, by_name[name], weights, biases)
            found = self.cosine(trial.proto)
            if found > current:
                _to_float(model, by_name[name], weights, biases)
                chosen.append(name)
                current = found
        return before, current, chosen


def _to_float(
    model: QdqModel, layer: QdqLayer, weights: dict[str, np.ndarray], biases: dict[str, np.ndarray | None]
) -> None:
    model.keep_float(layer, weights[layer.node].astype(np.float32), biases[layer.node])


def _copy(model: QdqModel) -> QdqModel:
    proto = onnx.ModelProto()
    proto.CopyFrom(model.proto)
    return QdqModel(proto)


def _cosine(want: np.ndarray, got: np.ndarray) -> float:
    a, b = want.astype(np.float64).ravel(), got.astype(np.float64).ravel()
    finite = np.isfinite(a) & np.isfinite(b)
    a, b = a[finite], b[finite]
    norms = float(np.linalg.norm(a) * np.linalg.norm(b))
    return float(a @ b / norms) if norms > 0 else float(np.array_equal(a, b))
