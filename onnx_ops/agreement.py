"""How closely a compressed model's outputs follow the original's, measured sample by sample, and task accuracy.

Each output is summed up one evaluation sample at a time (no concatenation of all samples in float64):

- float outputs: max and mean absolute error, SNR and the cosine of all samples pooled, plus the distribution
  of the per-sample cosine (mean, min, 5th percentile), where a pooled figure hides the few samples that
  collapse; top-1 agreement for class-score shaped outputs;
- integer and boolean outputs (class ids, token ids, masks): exact agreement, the share of equal elements
  (cosine, SNR and absolute error mean nothing for a class id).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Sequence

import numpy as np

from onnx_ops.errors import PassFailedError
from onnx_ops.report import Accuracy, ExactAgreement, OutputAgreement

__all__ = [
    "LOW_PERCENTILE",
    "AgreementMeter",
    "accuracy",
    "agreement",
    "as_array",
    "is_distribution",
    "measure_agreement",
]

logger = logging.getLogger(__name__)

LOW_PERCENTILE = 5  # the per-sample cosine reported (and judged by auto) besides the mean and the minimum
_CHUNK = 1 << 20  # elements of an output converted to float64 at a time


class _Output:
    """Running sums of one output's agreement, fed one sample (one run of both models) at a time."""

    def __init__(self, name: str, first: np.ndarray) -> None:
        self.name = name
        self.integer = first.dtype.kind in "iub"
        self.classes = not self.integer and _class_scores(first)
        self.samples = self.samples_equal = 0
        self.elements = self.equal = self.top1_total = self.top1_equal = 0
        self.dot = self.ref_sq = self.out_sq = self.err_sq = self.abs_sum = self.abs_max = 0.0
        self.cosines: list[float] = []

    def add(self, want: np.ndarray, got: np.ndarray) -> None:
        if want.shape != got.shape:
            raise PassFailedError(f"output {self.name!r} changed shape from {list(want.shape)} to {list(got.shape)}")
        self.samples += 1
        self.elements += want.size
        if self.integer:
            equal = int(np.count_nonzero(want == got))
            self.equal += equal
            self.samples_equal += equal == want.size
            return
        if not np.isfinite(got).all():
            if not np.isfinite(want).all():  # the inputs' fault, not the compression's
                raise PassFailedError(
                    f"the original model's output {self.name!r} already holds NaN or infinite values on these "
                    "inputs; give evaluation data the model accepts"
                )
            raise PassFailedError(f"the compressed model's output {self.name!r} holds NaN or infinite values")
        # One cosine per batch row (each input of a batched run), or of the whole run; none for a scalar (the
        # cosine of one number is its sign: the pooled cosine covers such outputs).
        per_row = want.ndim >= 2 and want.shape[0] > 0 and want[0].size >= 2
        rows = want.shape[0] if per_row else 1
        dots, w_sq, g_sq, same = self._sums(want.reshape(rows, -1), got.reshape(rows, -1))
        self.dot += float(dots.sum())
        self.ref_sq += float(w_sq.sum())
        self.out_sq += float(g_sq.sum())
        if want.size >= 2:
            norms_sq = w_sq * g_sq
            safe = np.sqrt(np.where(norms_sq > 0, norms_sq, 1.0))
            self.cosines += np.where(norms_sq > 0, dots / safe, np.where(same, 1.0, 0.0)).tolist()
        if self.classes:
            same = np.argmax(want, axis=-1) == np.argmax(got, axis=-1)
            self.top1_total += same.size
            self.top1_equal += int(np.count_nonzero(same))

    def _sums(self, want: np.ndarray, got: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Per row of [rows, n]: dot product, both squared norms, all equal; the error sums go to self.

        Summed in float64, _CHUNK elements at a time: a float64 copy of a whole language model's logits is not made.
        """
        rows = want.shape[0]
        dots, w_sq, g_sq = np.zeros(rows), np.zeros(rows), np.zeros(rows)
        same = np.ones(rows, dtype=bool)
        step = max(1, _CHUNK // max(rows, 1))
        for start in range(0, want.shape[1], step):
            w = want[:, start : start + step].astype(np.float64)
            g = got[:, start : start + step].astype(np.float64)
            diff = np.abs(g - w)
            dots += np.einsum("ij,ij->i", w, g)
            w_sq += np.einsum("ij,ij->i", w, w)
            g_sq += np.einsum("ij,ij->i", g, g)
            same &= np.all(w == g, axis=1)
            self.err_sq += float(np.vdot(diff, diff))
            self.abs_sum += float(diff.sum())
            self.abs_max = max(self.abs_max, float(diff.max()) if diff.size else 0.0)
        return dots, w_sq, g_sq, same

    def exact(self) -> ExactAgreement:
        return ExactAgreement(
            name=self.name,
            samples=self.samples,
            elements=self.elements,
            exact_agreement=self.equal / self.elements if self.elements else 1.0,
            samples_equal=self.samples_equal / self.samples if self.samples else 1.0,
        )

    def floating(self) -> OutputAgreement:
        denom = math.sqrt(self.ref_sq * self.out_sq)
        pooled = self.dot / denom if denom > 0 else (1.0 if self.err_sq == 0 else 0.0)
        snr = math.inf if self.err_sq == 0 else 10 * math.log10(self.ref_sq / self.err_sq) if self.ref_sq else -math.inf
        per = np.asarray(self.cosines)
        return OutputAgreement(
            name=self.name,
            max_abs_err=self.abs_max,
            mean_abs_err=self.abs_sum / self.elements if self.elements else 0.0,
            cosine=pooled,
            snr_db=snr,
            top1_agreement=self.top1_equal / self.top1_total if self.top1_total else None,
            samples=self.samples,
            cosine_units=per.size,
            cosine_mean=float(per.mean()) if per.size else None,
            cosine_min=float(per.min()) if per.size else None,
            cosine_p5=float(np.percentile(per, LOW_PERCENTILE, method="lower")) if per.size else None,
        )


class AgreementMeter:
    """Agreement of every output, accumulated one sample at a time.

    Args:
        names: The models' output names, in order.
    """

    def __init__(self, names: Sequence[str]) -> None:
        self.names = list(names)
        self._outputs: dict[str, _Output | None] = {}  # None: not a numeric tensor, not compared

    def add(self, ref: Sequence[object], new: Sequence[object]) -> None:
        """Add one sample: the original's and the compressed model's outputs of the same run."""
        for name, want_value, got_value in zip(self.names, ref, new, strict=True):
            want, got = as_array(want_value), as_array(got_value)
            if want is None or got is None:
                if self._outputs.get(name, False) is not None:
                    logger.info("output %s is not a numeric tensor; no agreement measured", name)
                self._outputs[name] = None
                continue
            if name not in self._outputs:
                self._outputs[name] = _Output(name, want)
            output = self._outputs[name]
            if output is not None:
                output.add(want, got)

    def floating(self) -> list[OutputAgreement]:
        """Agreement of the float outputs over the samples added so far."""
        return [out.floating() for out in self._compared() if not out.integer]

    def exact(self) -> list[ExactAgreement]:
        """Exact agreement of the integer and boolean outputs over the samples added so far."""
        return [out.exact() for out in self._compared() if out.integer]

    def _compared(self) -> list[_Output]:
        return [out for name in self.names if (out := self._outputs.get(name)) is not None]


def measure_agreement(
    names: Sequence[str], ref: Iterable[Sequence[object]], new: Iterable[Sequence[object]]
) -> AgreementMeter:
    """Both models' outputs (per-run outputs, in run order) compared sample by sample, one sample at a time."""
    meter = AgreementMeter(names)
    for want, got in zip(ref, new, strict=True):
        meter.add(want, got)
    return meter


def agreement(names: Sequence[str], ref: Sequence[list[object]], new: Sequence[list[object]]) -> list[OutputAgreement]:
    """Agreement of the float outputs of `new` against `ref` (integer outputs: `measure_agreement(...).exact()`)."""
    return measure_agreement(names, ref, new).floating()


def _class_scores(x: np.ndarray) -> bool:
    """[batch, classes] scores, or per-position probabilities such as a CTC recognizer's [batch, T, chars]."""
    return x.dtype.kind == "f" and x.ndim >= 2 and x.shape[-1] > 1 and (x.ndim == 2 or is_distribution(x))


def is_distribution(value: object) -> bool:
    """True for float outputs whose last axis holds probabilities (non-negative, summing to 1): class scores.

    A [batch, n] output may be logits or features (an embedding, whose argmax means nothing); probabilities are
    surely class scores.
    """
    x = as_array(value)
    if x is None or x.dtype.kind != "f" or x.ndim < 1 or x.shape[-1] <= 1 or not x.size:
        return False
    return bool(x.min() >= 0 and np.allclose(x.sum(axis=-1), 1.0, atol=1e-3))


def accuracy(
    names: Sequence[str], labels: np.ndarray, ref: Iterable[list[object]], new: Iterable[list[object]]
) -> Accuracy | None:
    """Task accuracy of both models against integer labels, from the first classifier-shaped output."""
    for index, name in enumerate(names):
        before = _predictions(ref, index)
        after = _predictions(new, index)
        if before is None or after is None or before.shape != labels.shape:
            continue
        acc_before = float((before == labels).mean())
        acc_after = float((after == labels).mean())
        return Accuracy(
            output=name,
            samples=int(labels.size),
            before=acc_before,
            after=acc_after,
            drop_points=(acc_before - acc_after) * 100.0,
        )
    return None


def _predictions(outputs: Iterable[list[object]], index: int) -> np.ndarray | None:
    rows = []
    for run in outputs:
        array = as_array(run[index])
        if array is None:
            return None
        if array.dtype.kind == "f" and array.ndim == 2 and array.shape[1] > 1:
            rows.append(np.argmax(array, axis=1))
        elif array.dtype.kind in "iu" and array.ndim == 1:
            rows.append(array.astype(np.int64))
        else:
            return None
    return np.stack(rows)


def as_array(value: object) -> np.ndarray | None:
    """A numeric tensor output as an array (a ZipMap list of {class: probability} as rows); None otherwise."""
    if isinstance(value, np.ndarray) and value.dtype.kind in "fiub":
        return value
    if isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
        # ZipMap output of scikit-learn classifiers: a list of {class: probability} per row.
        keys = sorted(value[0])
        return np.asarray([[row[k] for k in keys] for row in value], dtype=np.float64)
    return None
