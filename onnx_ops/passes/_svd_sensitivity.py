"""How much the model's outputs move per unit of each factorized layer's output error: param_ratio's weights.

``param_ratio`` spends one parameter budget over every layer where it removes the most error per parameter
(``_svd_math.allocate``). Counted relative to each layer's own outputs (``||Y||^2``), equal errors in two
layers are taken to matter equally, but they do not: on MiniLM with its FFN parameters halved that rule gave
one FFN output layer rank 3 of 384 and the model's held-out cosine fell below that of one rank for all.

Here each layer is factorized alone, at the rank that spends the same fraction of every layer's parameters,
the model runs over calibration feeds and the change of its outputs (each float output's squared change
relative to its own energy, summed over the outputs) divided by the layer's own squared output error at that
rank is the layer's sensitivity. The allocation then weighs each layer's dropped whitened squared singular
values (its absolute output error) by it. The probes compare the model with itself before the pass (not the
teacher), so an error a step before svd left is not counted. One session serves every probe: the targets'
weights are also its inputs, which a probe feeds.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np
import onnx_ir as ir

from onnx_ops.capture import Session
from onnx_ops.passes._base import Feed
from onnx_ops.passes._svd_aware import AwareLayer, Whitened
from onnx_ops.passes._svd_graph import attr

__all__ = ["MAX_FEEDS", "ROUNDS", "measured_ranks", "probe_rank", "sensitivities"]

MAX_FEEDS = 16  # calibration feeds the probes run on (evenly spaced): one model run per feed and layer
ROUNDS = 2  # of probes: at the even-budget ranks, then at the ranks allocated from them
_OUTPUT_BYTES = 64 << 20  # the unchanged model's outputs kept to compare the probes with


def probe_rank(k: int, n: int, ratio: float) -> int:
    """The rank that keeps `ratio` of a k x n matrix's parameters (at least 1)."""
    return max(1, math.floor(ratio * k * n / (k + n)))


def measured_ranks(
    model: ir.Model,
    targets: Sequence[AwareLayer],
    problems: Sequence[Whitened],
    ratio: float,
    feeds: Sequence[Feed],
    allocate: Callable[[list[float]], list[int | str]],
) -> list[int | str] | None:
    """The ranks `allocate` gives with each layer's error weighed by 1 / its sensitivity; None when unmeasured.

    Round 1 probes every layer at probe_rank(ratio); each further round (ROUNDS in all) at the ranks the last
    allocated (a layer left whole keeps its last probe rank), since the model's outputs are not linear in a
    layer's error.
    """
    probe = [probe_rank(t.layer.k, t.layer.n, ratio) for t in targets]
    ranks = None
    for _ in range(ROUNDS):
        found = sensitivities(model, targets, problems, probe, feeds)
        if found is None:
            break
        ranks = allocate([1.0 / s for s in found])
        probe = [r if isinstance(r, int) and r > 0 else p for r, p in zip(ranks, probe, strict=True)]
    return ranks


def sensitivities(
    model: ir.Model,
    targets: Sequence[AwareLayer],
    problems: Sequence[Whitened],
    ranks: Sequence[int],
    feeds: Sequence[Feed],
) -> list[float] | None:
    """Model output change per unit squared layer output error, per target; None without feeds to probe on.

    Args:
        model: The model before the pass changes it (each target dense); unchanged on return.
        targets: The layers to probe.
        problems: Their whitened problems (the factors at the probe rank and their output error).
        ranks: The rank each layer is probed at.
        feeds: The calibration feeds (at most MAX_FEEDS of them are used).
    """
    chosen = _spread(feeds)
    session = _probe_session(model, targets)
    settable = _settable(session)
    reference = [_run(session, settable, feed) for feed in chosen]
    while len(reference) > 1 and sum(a.nbytes for outs in reference for a in outs) > _OUTPUT_BYTES:
        reference, chosen = reference[::2], chosen[::2]
    energy = np.sum([[float(np.sum(np.square(a, dtype=np.float64))) for a in outs] for outs in reference], axis=0)
    if not chosen or not np.any(energy > 0):
        return None
    found: list[float] = []
    for target, problem, rank in zip(targets, problems, ranks, strict=True):
        a, b, bias = problem.factors(min(rank, len(problem.spectrum.s)), validate=False)
        layer_error = problem.error(a @ b)
        change = np.zeros_like(energy)
        override = _override(target, a @ b, bias)
        for feed, want in zip(chosen, reference, strict=True):
            got = _run(session, settable, {**feed, **override})
            change += [float(np.sum(np.square(g - w, dtype=np.float64))) for g, w in zip(got, want, strict=True)]
        moved = float(np.sum(change[energy > 0] / energy[energy > 0]))
        found.append(moved / layer_error if layer_error > 0 and moved > 0 else math.nan)
    known = [s for s in found if math.isfinite(s)]
    if not known:
        return None
    middle = float(np.median(known))  # a layer the probe does not move (exact at its probe rank): a typical weight
    return [s if math.isfinite(s) else middle for s in found]


def _spread(feeds: Sequence[Feed]) -> list[Feed]:
    """At most MAX_FEEDS feeds, evenly spaced over the calibration set."""
    if len(feeds) <= MAX_FEEDS:
        return list(feeds)
    return [feeds[i] for i in np.linspace(0, len(feeds) - 1, MAX_FEEDS).round().astype(int)]


def _settable(session: Session) -> frozenset[str]:
    """The names a feed may set: the session's inputs and the initializers it lets a feed override."""
    known = session.session.get_inputs() + session.session.get_overridable_initializers()
    return frozenset(i.name for i in known)


def _run(session: Session, settable: frozenset[str], feed: Feed) -> list[np.ndarray]:
    """The float outputs of one run; the feed may also set the weights the session takes as inputs.

    `settable` is _settable(session), found once per session rather than on every run.
    """
    outputs = session.session.run(None, {k: v for k, v in feed.items() if k in settable})
    return [np.asarray(v) for v in outputs if np.asarray(v).dtype.kind == "f"]


def _probe_session(model: ir.Model, targets: Sequence[AwareLayer]) -> Session:
    """One session over the model whose targets' weights and biases are also graph inputs, their values the defaults.

    A probe feeds a layer's low-rank weight and bias in place of its own: one session serves every probe.
    """
    values = [v for t in targets for v in (t.candidate.weight, t.bias) if v is not None]
    added = [v for v in dict.fromkeys(values) if v not in model.graph.inputs]
    model.graph.inputs.extend(added)
    try:
        return Session(model, ())
    finally:
        for value in added:
            model.graph.inputs.remove(value)


def _override(target: AwareLayer, w: np.ndarray, bias: np.ndarray | None) -> dict[str, np.ndarray]:
    """The feeds that make the target's weight the dense product w [k, n] and its bias the refit one."""
    node = target.candidate.node
    gemm = node.op_type == "Gemm"

    def stored(value: ir.Value, array: np.ndarray) -> dict[str, np.ndarray]:
        old = value.const_value  # only its dtype and shape: its data (a copy of the weight to read) is not needed
        assert old is not None
        return {value.name or "": np.ascontiguousarray(array, dtype=old.dtype.numpy()).reshape(old.shape.numpy())}

    matrix = w / attr(node, "alpha", 1.0) if gemm else w
    found = stored(target.candidate.weight, matrix.T if gemm and attr(node, "transB", 0) else matrix)
    if bias is not None and target.bias is not None:
        found |= stored(target.bias, bias / (attr(node, "beta", 1.0) if gemm else 1.0))
    return found
