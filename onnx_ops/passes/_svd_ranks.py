"""The rank rules of svd: each matrix's rank by the step's rule, or why it is left whole.

The rules, first applicable first: ``param_ratio`` (one parameter budget shared by all matrices, see
``_svd_math.allocate``), ``rank`` / ``rank_ratio``, ``max_output_error`` (the smallest rank within the error),
``energy`` (the smallest rank holding that share of the spectrum). A rank that saves no parameters leaves the
matrix whole, with the reason.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from onnx_ops.passes import _svd_math as svd_math
from onnx_ops.plan import SvdStep

__all__ = ["fixed_rank", "ranks"]


def ranks(
    step: SvdStep,
    spectra: Sequence[svd_math.Spectrum | str],
    references: list[float],
    shapes: list[tuple[int, int]],
) -> list[int | str]:
    """The rank of every matrix by the step's rule, or why it is left whole.

    Args:
        step: The svd step (its rank rule).
        spectra: Each matrix's spectrum, or why it has none.
        references: What each matrix's squared error is relative to (its weight's or its outputs' energy).
        shapes: Each matrix's [k, n].
    """
    chosen = list[int | str]()
    usable = [i for i, s in enumerate(spectra) if isinstance(s, svd_math.Spectrum)]
    allocated: dict[int, int] = {}
    if step.param_ratio is not None and usable:
        budget = int(step.param_ratio * sum(shapes[i][0] * shapes[i][1] for i in usable))
        allocation = svd_math.allocate([spectra[i] for i in usable], [references[i] for i in usable],  # type: ignore[misc]
                                       [shapes[i] for i in usable], budget)  # fmt: skip
        allocated = dict(zip(usable, allocation, strict=True))
    for i, spectrum in enumerate(spectra):
        if isinstance(spectrum, str):
            chosen.append(spectrum)
            continue
        (k, n), even = shapes[i], svd_math.break_even(*shapes[i])
        target = fixed_rank(step, min(k, n))
        if i in allocated:
            r, rule = allocated[i], f"param_ratio {step.param_ratio:g}"
        elif target is not None:
            r, rule = target, f"rank {target}"
        elif step.effective_output_error is not None:
            r = svd_math.error_rank(spectrum, step.effective_output_error**2 * references[i])
            rule = f"max_output_error {step.effective_output_error:g}"
        else:
            assert step.effective_energy is not None
            r, rule = svd_math.energy_rank(spectrum, step.effective_energy), f"energy {step.effective_energy:g}"
        chosen.append(_rank_problem(r, rule, k, n, even, len(spectrum.s), target) or r)
    return chosen


def fixed_rank(step: SvdStep, full: int) -> int | None:
    """The rank that rank or rank_ratio sets for a matrix whose full rank is `full`, or None."""
    if step.rank_ratio is not None:
        return min(full, math.ceil(step.rank_ratio * full))
    return None if step.rank is None else min(step.rank, full)


def _rank_problem(r: int, rule: str, k: int, n: int, even: int, known: int, target: int | None) -> str | None:
    """Why rank r (chosen by rule) cannot be used for a k x n matrix, or None."""
    if r == 0:
        return f"{rule} leaves this matrix whole (factorizing it costs more error per parameter than others)"
    if r <= even:
        return None
    if target is not None:
        return f"rank {target} saves nothing for {k}x{n}"
    needed = f"rank {r}" if r <= known else f"rank > {known}"
    return f"{rule} needs {needed}; rank {r} saves nothing for {k}x{n}"
