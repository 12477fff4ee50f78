"""Latency that survives a busy host: interleaved pairs, CPU time, a median ratio with its interval.

Two models are run in pairs, alternating which goes first, on the same input. Each run records its wall-clock
time and its CPU time: with one intra-op thread ONNX Runtime computes on the calling thread (its sequential
executor uses no inter-op pool and a one-thread intra-op pool has no worker threads), so the calling thread's
CPU time (``time.thread_time``) is the model's own work: time spent waiting for a core, which is what other
processes on a busy host add, is not in it (their cache traffic still costs it a little). With more threads the
process's CPU time (``time.process_time``) is recorded beside the wall clock. A pair and the next, in the other
order, give one ratio (candidate / baseline over both pairs): the model that runs first in a pair pays more for
cold caches, 7-40% on a busy host in our measurements, and this cancels it. The result is the median ratio with
a distribution-free confidence interval from order statistics; timing goes on until that interval is tight
enough or the time budget is spent. A change is measurable only when the interval excludes 1 and the median is
at least ``min_change`` away from it; otherwise the verdict is "no measurable change".
"""

from __future__ import annotations

import dataclasses
import math
import os
import time
from collections.abc import Callable

import numpy as np

from onnx_ops.report import Contention, Latency, LatencyComparison

__all__ = [
    "Timed",
    "TimingSettings",
    "basis_text",
    "compare",
    "latency_stats",
    "latency_warnings",
    "median_interval",
    "speed_text",
    "verdict",
]

Run = Callable[[], object]
_BUSY_WALL_OVER_CPU = 1.25  # one thread: wall time this far above CPU time means the thread waited for a core
_BUSY_TAIL = 1.5  # wall p90 / p50 above this: runs were interrupted
_OFF_THREAD = 1.5  # process CPU this far above the calling thread's: the work did not stay on the thread
_CHECK_EVERY = 10  # pairs between interval checks
_MIN_COVERAGE = 0.9  # an interval with less coverage (too few pairs) never gives a faster/slower verdict


@dataclasses.dataclass(frozen=True)
class TimingSettings:
    """How long and how precisely to time.

    Attributes:
        warmup: Untimed runs of each model first.
        min_pairs: Pairs timed before the interval is checked at all.
        max_pairs: Most pairs timed (min_pairs wins when larger).
        seconds: Time budget for the timed pairs (at least min_pairs are timed whatever it says).
        target_width: Stop once (high - low) / median of the interval is at most this.
        confidence: Confidence of the interval around the median ratio.
        min_change: Relative change below which a difference is reported as no measurable change: two
            sessions of one model differed by up to 9% on a busy host (sub-millisecond runs), so 10% by default.
    """

    warmup: int = 2
    min_pairs: int = 10
    max_pairs: int = 2000
    seconds: float = 5.0
    target_width: float = 0.1
    confidence: float = 0.95
    min_change: float = 0.1


@dataclasses.dataclass(frozen=True)
class Timed:
    """The comparison and each model's own figures (wall clock; CPU time in cpu_p50_ms)."""

    comparison: LatencyComparison
    baseline: Latency
    candidate: Latency


def compare(
    baseline: Run, candidate: Run, *, threads: int, settings: TimingSettings | None = None, batch: int = 1
) -> Timed:
    """Time `candidate` against `baseline` in interleaved pairs (see the module docstring).

    Args:
        baseline: Runs the reference model once (the ratio's denominator).
        candidate: Runs the other model once.
        threads: ONNX Runtime intra-op threads of both sessions (1 selects the calling thread's CPU time).
        settings: Budget and precision; defaults when None.
        batch: Samples per run, for throughput.
    """
    settings = settings or TimingSettings()
    single = threads == 1 or (threads == 0 and (os.cpu_count() or 1) == 1)
    load_before = _load()
    for _ in range(settings.warmup):
        baseline()
        candidate()
    runs = (baseline, candidate)
    wall: tuple[list[float], list[float]] = ([], [])
    cpu: tuple[list[float], list[float]] = ([], [])
    proc: tuple[list[float], list[float]] = ([], [])
    thread_clock = time.thread_time_ns if single else time.process_time_ns
    end = time.perf_counter() + settings.seconds
    pairs = 0
    while pairs < max(settings.max_pairs, settings.min_pairs, 2):
        for which in (0, 1) if pairs % 2 == 0 else (1, 0):
            w0, c0, p0 = time.perf_counter_ns(), thread_clock(), time.process_time_ns()
            runs[which]()
            c1, p1, w1 = thread_clock(), time.process_time_ns(), time.perf_counter_ns()
            wall[which].append((w1 - w0) / 1e6)
            cpu[which].append((c1 - c0) / 1e6)
            proc[which].append((p1 - p0) / 1e6)
        pairs += 1
        if pairs < max(settings.min_pairs, 2) or (pairs > settings.min_pairs and pairs % _CHECK_EVERY):
            continue
        series = wall if _coarse(cpu) else cpu  # the series the ratio will be taken on (see below)
        if time.perf_counter() >= end or _width(_ratios(series), settings.confidence) <= settings.target_width:
            break
    basis = "thread_cpu" if single else "process_cpu"
    note = ""
    if single and np.median(proc[0] + proc[1]) > _OFF_THREAD * max(float(np.median(cpu[0] + cpu[1])), 1e-9):
        # Some work ran on other threads (an execution provider or session option that spawns them).
        basis, cpu, note = "process_cpu", proc, "work ran off the calling thread; process CPU time used"
    if _coarse(cpu):
        # A process-wide CPU clock sampled while a CPU-time limit (RLIMIT_CPU) is set advances only at scheduler
        # ticks: runs shorter than a tick read 0 ms. Such a clock cannot time them; wall-clock time can.
        basis, cpu, note = "wall", wall, "the CPU clock is too coarse for these runs here; wall-clock time used"
    comparison = _comparison(wall, cpu, basis, threads, settings, load_before, note)
    return Timed(comparison, latency_stats(wall[0], cpu[0], batch), latency_stats(wall[1], cpu[1], batch))


def _coarse(cpu: tuple[list[float], list[float]]) -> bool:
    """True when a tenth or more of the runs read no CPU time at all (the clock did not advance)."""
    times = np.asarray(cpu[0] + cpu[1])
    return bool(times.size) and float(np.mean(times <= 0)) >= 0.1


def _ratios(series: tuple[list[float], list[float]]) -> np.ndarray:
    """One ratio per two consecutive pairs (one in each order): the cost of going first cancels out."""
    n = min(len(series[0]), len(series[1])) // 2 * 2
    a = np.asarray(series[0][:n]).reshape(-1, 2).sum(axis=1)
    b = np.asarray(series[1][:n]).reshape(-1, 2).sum(axis=1)
    keep = a > 0
    ratios: np.ndarray = b[keep] / a[keep]
    finite: np.ndarray = ratios[np.isfinite(ratios)]
    return finite


def _width(ratios: np.ndarray, confidence: float) -> float:
    mid, low, high, _ = median_interval(ratios, confidence)
    return (high - low) / mid if mid > 0 else math.inf


def median_interval(values: np.ndarray, confidence: float = 0.95) -> tuple[float, float, float, float]:
    """Median of `values` and a distribution-free interval for it from order statistics.

    The interval is [x(j), x(n+1-j)] of the sorted values with the largest j whose binomial coverage
    P(j <= B <= n - j), B ~ Binomial(n, 1/2), is at least `confidence`. With too few values for that coverage
    the interval is [min, max] and the coverage it does have is returned.

    Returns:
        (median, low, high, coverage).
    """
    x = np.sort(np.asarray(values, dtype=np.float64))
    n = int(x.size)
    if n == 0:
        return math.nan, math.nan, math.nan, 0.0
    mid = float(np.median(x))
    # cdf[k] = P(B <= k); coverage of [x(j), x(n+1-j)] (1-based) is 1 - 2 * P(B <= j - 1).
    cdf, total, term = [], 0, 1
    for k in range(n + 1):
        total += term
        cdf.append(total / 2**n)
        term = term * (n - k) // (k + 1)
    best = 1
    for j in range(1, n // 2 + 1):
        if 1 - 2 * cdf[j - 1] >= confidence:
            best = j
        else:
            break
    coverage = 1 - 2 * cdf[best - 1]
    return mid, float(x[best - 1]), float(x[n - best]), float(coverage)


def verdict(low: float, high: float, median: float, min_change: float) -> str:
    """'faster', 'slower' or 'no measurable change' for a candidate / baseline ratio and its interval."""
    if not median > 0:  # no usable measurement
        return "no measurable change"
    if high < 1.0 and median <= 1.0 - min_change:
        return "faster"
    if low > 1.0 and median >= 1.0 + min_change:
        return "slower"
    return "no measurable change"


def speed_text(c: LatencyComparison) -> str:
    """'1.8x faster (time ratio 0.55, 95% interval 0.52-0.58)', '... slower ...' or 'no measurable change (...)'."""
    detail = f"time ratio {c.ratio:.3g}, {min(c.confidence, 0.95):.0%} interval {c.ratio_low:.3g}-{c.ratio_high:.3g}"
    if c.verdict == "no measurable change":
        return f"no measurable change ({detail})"
    if not c.ratio > 0:  # no usable measurement: never a factor
        return f"no measurable change ({detail})"
    factor = 1 / c.ratio if c.verdict == "faster" else c.ratio
    return f"{factor:{'.2f' if factor < 1.1 else '.1f'}}x {c.verdict} ({detail})"


def basis_text(c: LatencyComparison) -> str:
    """What the ratio measures, in words."""
    if c.basis == "thread_cpu":
        return "CPU time of the calling thread (one ONNX Runtime thread)"
    if c.basis == "process_cpu":
        return f"CPU time of the process ({c.threads or 'default'} ONNX Runtime threads), not wall-clock time"
    return "wall-clock time"


def latency_warnings(c: LatencyComparison) -> list[str]:
    """Report warnings about a comparison: measurably slower, busy host, interval left wide."""
    warnings = []
    if c.verdict == "slower":
        warnings.append(
            f"the compressed model is measurably slower than the original on this host: {speed_text(c)}; try "
            "other options (e.g. per_channel off, fewer op types quantized) or keep the original if latency matters"
        )
    if c.contention.busy:
        warnings.append(
            "latency was measured on a busy host (" + "; ".join(c.contention.reasons) + "): the wall-clock "
            f"milliseconds are inflated by other work; the ratio is on {basis_text(c)}"
            + (", which other work does not inflate" if c.basis == "thread_cpu" else "")
        )
    if not c.reached_target:
        warnings.append(
            f"the latency interval stayed wider than {c.target_width:.0%} of the ratio within the time budget "
            f"({c.pairs} pairs); raise evaluation.latency_seconds for a tighter figure"
        )
    return warnings


def latency_stats(wall_ms: list[float], cpu_ms: list[float], batch: int = 1) -> Latency:
    """Wall-clock percentiles of one model's runs, its median CPU time, and throughput from the median."""
    values = np.asarray(wall_ms, dtype=np.float64)
    p50 = float(np.percentile(values, 50))
    return Latency(
        runs=int(values.size),
        p50_ms=p50,
        p90_ms=float(np.percentile(values, 90)),
        p99_ms=float(np.percentile(values, 99)),
        mean_ms=float(values.mean()),
        throughput_per_s=1000.0 / p50 * batch if p50 > 0 else 0.0,
        cpu_p50_ms=float(np.median(cpu_ms)) if cpu_ms else None,
    )


def _comparison(
    wall: tuple[list[float], list[float]],
    cpu: tuple[list[float], list[float]],
    basis: str,
    threads: int,
    settings: TimingSettings,
    load_before: tuple[float, float, float],
    note: str,
) -> LatencyComparison:
    ratio, low, high, coverage = median_interval(_ratios(cpu), settings.confidence)
    w_ratio, w_low, w_high, _ = median_interval(_ratios(wall), settings.confidence)
    contention = _contention(wall, cpu, basis, load_before)
    return LatencyComparison(
        method="interleaved pairs",
        basis=basis,
        threads=threads,
        pairs=len(wall[0]),
        ratio=ratio,
        ratio_low=low,
        ratio_high=high,
        confidence=coverage,
        wall_ratio=w_ratio,
        wall_ratio_low=w_low,
        wall_ratio_high=w_high,
        # Fewer than 5 ratios (10 pairs) cannot give an interval of 90% coverage: too few to call a change.
        verdict=verdict(low, high, ratio, settings.min_change) if coverage >= _MIN_COVERAGE else "no measurable change",
        min_change=settings.min_change,
        target_width=settings.target_width,
        reached_target=(high - low) / ratio <= settings.target_width if ratio > 0 else False,
        contention=contention,
        note=note,
    )


def _contention(
    wall: tuple[list[float], list[float]], cpu: tuple[list[float], list[float]], basis: str, load: tuple[float, ...]
) -> Contention:
    walls, cpus = np.asarray(wall[0] + wall[1]), np.asarray(cpu[0] + cpu[1])
    over = float(np.median(walls / np.maximum(cpus, 1e-6)))
    tail = max(float(np.percentile(w, 90) / max(np.percentile(w, 50), 1e-9)) for w in map(np.asarray, wall))
    cores = os.cpu_count() or 1
    load_now = _load()
    load1 = max(load[0], load_now[0])
    reasons = []
    if basis == "thread_cpu" and over > _BUSY_WALL_OVER_CPU:
        reasons.append(f"runs took {over:.2f}x their CPU time in wall-clock time")
    if tail > _BUSY_TAIL:
        reasons.append(f"wall-clock p90 was {tail:.2f}x p50")
    if load1 > cores:
        reasons.append(f"load average {load1:.1f} on {cores} cores")
    return Contention(
        load_average=[round(x, 2) for x in load_now],
        cores=cores,
        wall_over_cpu=over,
        wall_p90_over_p50=tail,
        busy=bool(reasons),
        reasons=reasons,
    )


def _load() -> tuple[float, float, float]:
    try:
        return os.getloadavg()
    except OSError:  # not available on this platform
        return (0.0, 0.0, 0.0)
