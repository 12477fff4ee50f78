"""The compression report: a versioned, JSON-serializable record of what changed and what it cost.

Every figure in it is measured on this host with ONNX Runtime; nothing is estimated.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, SerializerFunctionWrapHandler, model_serializer

from onnx_ops.bounds import bound_within, cut

__all__ = [
    "MAX_REPORT_BYTES",
    "REPORT_SCHEMA_VERSION",
    "Accuracy",
    "Agreement",
    "AutoCandidate",
    "AutoPhase",
    "AutoResult",
    "Contention",
    "CpuNote",
    "EvaluationData",
    "ExactAgreement",
    "Latency",
    "LatencyComparison",
    "LayerChange",
    "LayerSensitivity",
    "ModelStats",
    "OutputAgreement",
    "Report",
    "Skipped",
    "StepResult",
]

# 1.1 added cpu (every report) and auto (plans with an auto step); 1.2 added latency (the interleaved
# comparison with its interval), Latency.cpu_p50_ms, throughput from the median, per-sample cosines, integer
# outputs' exact agreement (in agreement.exact, no longer in agreement.outputs) and the evaluation samples
# available. 1.0 and 1.1 reports parse.
REPORT_SCHEMA_VERSION = "1.2"

# A serialized report stays under about this size, however many and however long the model's names are.
MAX_REPORT_BYTES = 2 << 20
_MAX_NOTES = 10

# Infinite SNR (identical outputs) is written as the string "Infinity", which strict JSON parsers accept.
_CONFIG = ConfigDict(extra="forbid", ser_json_inf_nan="strings")


class ModelStats(BaseModel):
    """Static figures of one model file."""

    model_config = _CONFIG

    size_bytes: int = Field(description="Bytes of the serialized model.")
    gzip_bytes: int = Field(description="Bytes after gzip -6 (shows what unstructured sparsity saves).")
    gzip_estimated: bool = Field(
        False,
        description="gzip_bytes is an estimate: past 64 MiB only evenly spaced samples are compressed and the rest "
        "counted at their ratio (compressing gigabytes whole takes minutes).",
    )
    parameters: int = Field(description="Elements in all initializers and Constant tensors.")
    zero_fraction: float = Field(description="Fraction of those elements that are exactly zero.")
    nodes: int
    op_counts: dict[str, int] = Field(description="Node count per operator type (domain-prefixed if not ONNX).")
    opset: int = Field(description="Version of the default ONNX opset.")


class LayerChange(BaseModel):
    """What one step did to one weight (or node)."""

    model_config = _CONFIG

    name: str = Field(description="Node name (or weight name when the node has none).")
    op_type: str
    weight: str = Field(description="Name of the weight tensor in the original model.")
    shape_before: list[int]
    shape_after: list[int] = Field(description="Shape after the step (for svd: the two factors' shapes, flattened).")
    params_before: int
    params_after: int
    sparsity: float | None = Field(None, description="Fraction of zeros in the weight after the step.")
    rank: int | None = Field(None, description="svd: rank kept.")
    rel_error: float | None = Field(
        None, description="Relative Frobenius error ||W - W'|| / ||W|| of the changed weight."
    )
    note: str | None = None


class Skipped(BaseModel):
    """A candidate a step left alone, and why."""

    model_config = _CONFIG

    name: str
    reason: str


class StepResult(BaseModel):
    """One executed step of the plan."""

    model_config = _CONFIG

    index: int
    kind: str
    config: dict[str, object] = Field(description="The step as given in the plan, defaults filled in.")
    seconds: float = Field(description="Wall-clock time of the step.")
    parameters_before: int
    parameters_after: int
    layers: list[LayerChange] = Field(default_factory=list)
    skipped: list[Skipped] = Field(default_factory=list)
    warnings: list[str] = Field(default_factory=list)
    summary: dict[str, float | int | str | bool | list[str]] = Field(default_factory=dict)


class Latency(BaseModel):
    """ONNX Runtime CPU latency of one model, timed interleaved with the other model (wall-clock milliseconds)."""

    model_config = _CONFIG

    runs: int
    p50_ms: float = Field(description="Wall-clock median per run.")
    p90_ms: float
    p99_ms: float
    mean_ms: float
    throughput_per_s: float = Field(
        description="Samples per second at this batch size, 1000 / p50_ms * batch (schema 1.1: from mean_ms)."
    )
    cpu_p50_ms: float | None = Field(
        None, description="Median CPU time per run: the calling thread's with one thread, else the process's (1.2)."
    )


class Contention(BaseModel):
    """How busy the host was while timing; when busy, wall-clock figures are not trustworthy."""

    model_config = _CONFIG

    load_average: list[float] = Field(description="1, 5 and 15 minute load averages after timing.")
    cores: int
    wall_over_cpu: float = Field(
        description="Median wall-clock / CPU time per run: about 1 on an idle host with one thread; above 1, the "
        "thread waited for a core. With several threads CPU time adds up over threads, so it may be above 1."
    )
    wall_p90_over_p50: float = Field(description="Wall-clock p90 / p50 of the worse of the two models.")
    busy: bool = Field(description="Measured on a busy host: wall-clock figures are inflated by other work.")
    reasons: list[str] = Field(default_factory=list)


class LatencyComparison(BaseModel):
    """The compressed model's time over the original's, from interleaved pairs, with a confidence interval."""

    model_config = _CONFIG

    method: str = Field(description="How the runs were timed: interleaved pairs, alternating which goes first.")
    basis: Literal["thread_cpu", "process_cpu", "wall"] = Field(
        description="What `ratio` measures: the calling thread's CPU time (one intra-op thread: ONNX Runtime "
        "computes on it), the process's CPU time (several threads), or wall-clock time."
    )
    threads: int = Field(description="ONNX Runtime intra-op threads (0: its default, one per core).")
    pairs: int
    ratio: float = Field(description="Median over pairs of after / before time on `basis` (below 1 is faster).")
    ratio_low: float
    ratio_high: float
    confidence: float = Field(description="Coverage of [ratio_low, ratio_high] (0.95 unless too few pairs).")
    wall_ratio: float = Field(description="Median over the same pairs of the wall-clock ratio.")
    wall_ratio_low: float
    wall_ratio_high: float
    verdict: Literal["faster", "slower", "no measurable change"] = Field(
        description="faster/slower only when the interval excludes 1 and the median differs by min_change or more."
    )
    min_change: float
    target_width: float = Field(description="Timing stopped early once (high - low) / ratio was at most this.")
    reached_target: bool
    contention: Contention
    note: str = ""


class OutputAgreement(BaseModel):
    """Agreement of one float output of the compressed model with the original's, over all evaluation samples."""

    model_config = _CONFIG

    name: str
    max_abs_err: float
    mean_abs_err: float
    cosine: float = Field(description="Cosine similarity of all samples' outputs pooled (1 is identical).")
    snr_db: float = Field(description="10*log10(||ref||^2 / ||ref - out||^2) over all samples; inf when identical.")
    top1_agreement: float | None = Field(
        None, description="For classifier-shaped outputs [batch, classes]: fraction of equal argmax."
    )
    samples: int | None = Field(None, description="Evaluation samples compared (schema 1.2).")
    cosine_units: int | None = Field(
        None,
        description="How many per-sample cosines were measured (one per batch row of each run, or one per run); "
        "0 when each output is a single number, which only the pooled cosine covers.",
    )
    cosine_mean: float | None = Field(None, description="Mean of the per-sample cosines.")
    cosine_min: float | None = Field(None, description="Lowest per-sample cosine (the worst sample).")
    cosine_p5: float | None = Field(
        None, description="5th percentile of the per-sample cosines (the lower value: one a sample really had)."
    )


class ExactAgreement(BaseModel):
    """Agreement of one integer or boolean output (class ids, token ids, masks): equal or not, no distance."""

    model_config = _CONFIG

    name: str
    samples: int = Field(description="Evaluation samples compared.")
    elements: int = Field(description="Output elements compared, over all samples.")
    exact_agreement: float = Field(description="Fraction of output elements exactly equal to the original's.")
    samples_equal: float = Field(description="Fraction of samples whose whole output is equal to the original's.")


class Accuracy(BaseModel):
    """Task accuracy against the user's labels."""

    model_config = _CONFIG

    output: str = Field(description="Output whose argmax (or label value) is compared with the labels.")
    samples: int
    before: float
    after: float
    drop_points: float = Field(description="(before - after) * 100, in percentage points.")


class EvaluationData(BaseModel):
    """Where the evaluation inputs came from."""

    model_config = _CONFIG

    source: Literal["evaluation", "calibration", "synthetic"]
    samples: int = Field(description="Samples used.")
    available: int | None = Field(
        None, description="Samples in the data given (more than `samples` when evaluation.max_samples cut them)."
    )
    note: str
    input_shapes: dict[str, list[int]] = Field(description="Shape of one sample fed to each input.")


class Agreement(BaseModel):
    """Output agreement and (with labels) task accuracy."""

    model_config = _CONFIG

    outputs: list[OutputAgreement] = Field(description="Float outputs.")
    exact: list[ExactAgreement] = Field(
        default_factory=list, description="Integer and boolean outputs (schema 1.2; listed in outputs before)."
    )
    accuracy: Accuracy | None = None


class CpuNote(BaseModel):
    """Pre-flight note: int8 instructions of this CPU and the settings known to be slow on it."""

    model_config = _CONFIG

    arch: str = Field(description="Machine architecture (x86_64, aarch64, ...).")
    features: dict[str, bool] = Field(description="avx512_vnni, avx_vnni, amx_int8 (x86) or arm_dotprod (ARM).")
    known: bool = Field(description="False when the CPU's features could not be read.")
    int8_fast: bool | None = Field(description="True when the CPU has VNNI, AMX or ARM dot-product instructions.")
    slow_settings: list[str] = Field(description="Quantization settings known to be slow on this CPU.")
    note: str


class LayerSensitivity(BaseModel):
    """How much the output degrades when only this layer is compressed."""

    model_config = _CONFIG

    name: str = Field(description="Node name.")
    op_type: str
    family: Literal["quantize", "prune", "svd"]
    parameters: int = Field(description="Elements of the layer's weight.")
    loss: float = Field(description="1 - worst output cosine when only this layer is compressed (0 is harmless).")
    accuracy_drop: float | None = Field(None, description="Task accuracy drop in points, when labels were given.")


class AutoCandidate(BaseModel):
    """One candidate plan the automatic search built and measured."""

    model_config = _CONFIG

    index: int
    label: str = Field(description="Short description, e.g. 'static qdq per-channel minmax, 3 nodes excluded'.")
    steps: list[dict[str, object]] = Field(description="The candidate's plan steps (rerunnable).")
    status: Literal["measured", "failed"] = Field(description="failed: the passes or ONNX Runtime refused it.")
    error: str | None = None
    size_bytes: int | None = None
    size_ratio: float | None = Field(None, description="Candidate / original bytes on disk.")
    latency_ratio: float | None = Field(
        None,
        description="Candidate / original time, median of interleaved pairs, on one thread's CPU time (schema "
        "1.1: wall-clock p50) (lower is faster).",
    )
    latency_low: float | None = Field(None, description="95% interval of latency_ratio, low end (1.2).")
    latency_high: float | None = Field(None, description="95% interval of latency_ratio, high end (1.2).")
    latency_verdict: Literal["faster", "slower", "no measurable change"] | None = Field(
        None, description="faster/slower only when the interval excludes 1 (1.2)."
    )
    cosine: float | None = Field(None, description="Worst float output's cosine to the original, samples pooled.")
    cosine_p5: float | None = Field(
        None, description="Worst float output's 5th-percentile per-sample cosine (what the cosine budget judges)."
    )
    agreement: float | None = Field(
        None, description="Worst top-1 agreement (class-score outputs) or exact agreement (integer outputs)."
    )
    accuracy_drop: float | None = Field(None, description="Task accuracy drop in points (with labels).")
    meets_budget: bool = False
    budget_misses: list[str] = Field(default_factory=list, description="What missed the budget, in words.")
    dominated_by: int | None = Field(
        None,
        description="Index of the default plan's candidate when it is smaller and at least as accurate: such a "
        "candidate is never chosen.",
    )
    faster: bool = Field(False, description="Measurably faster than the original (schema 1.1: ratio below 1).")
    seconds: float = Field(description="Time to build and measure it.")


class AutoPhase(BaseModel):
    """One phase of the automatic search: the time it was given and spent, and what it did (schema 1.2, added)."""

    model_config = _CONFIG

    name: str = Field(description="The phase, e.g. 'int8 settings', 'recovery', 'formats'.")
    given_s: float = Field(
        description="Seconds the phase was given when it began: its weight's share of the search's time left."
    )
    seconds: float = Field(description="Seconds it took.")
    work: int = Field(description="Candidates and one-layer probes it measured.")
    not_started: int = Field(0, description="Candidates or probes not started: their estimated time did not fit.")
    status: Literal["done", "cut", "skipped"] = Field(
        description="done: ran all its work. cut: some of its work was not started for lack of time. skipped: "
        "none of it ran for lack of time."
    )


class AutoResult(BaseModel):
    """What the automatic search tried and what it chose."""

    model_config = _CONFIG

    budget: str = Field(description="The budget in words, e.g. 'output cosine >= 0.99'.")
    threshold: float | None = Field(
        None, description="The budget's number: the lowest output cosine, or the largest accuracy drop in points."
    )
    goal: str
    status: Literal["met", "not_met", "original"] = Field(
        description="met: the chosen candidate meets the budget. not_met: none did; the closest one is "
        "returned. original: no candidate was valid and not slower; the original model is returned."
    )
    message: str
    chosen: int | None = Field(None, description="Index of the chosen candidate (None: the original model).")
    plan: dict[str, object] | None = Field(
        None, description="The chosen plan, rerunnable as is (None when the original model is returned)."
    )
    candidates: list[AutoCandidate] = Field(default_factory=list)
    sensitivity: list[LayerSensitivity] = Field(default_factory=list)
    sensitivity_method: str = ""
    proxy_check: list[dict[str, float | str]] = Field(
        default_factory=list,
        description="Proxy sensitivity against real one-layer ONNX Runtime quantization, for a few layers.",
    )
    search_seconds: float
    time_budget_s: float
    stopped_early: bool = Field(
        False,
        description="The time budget or candidate cap ended the search, or a phase of it (see phases: cut or skipped).",
    )
    phases: list[AutoPhase] = Field(
        default_factory=list,
        description="Each phase's share of the time budget, its seconds, and whether it was cut short or skipped "
        "for lack of time (search_seconds against time_budget_s says whether the search kept to its budget).",
    )
    notes: list[str] = Field(
        default_factory=list, description="Candidate families the search skipped, and why (e.g. no calibration data)."
    )


class Report(BaseModel):
    """Everything measured about one compression run."""

    model_config = _CONFIG

    schema_version: str = REPORT_SCHEMA_VERSION
    tool_versions: dict[str, str]
    host: dict[str, str | int] = Field(description="CPU, cores and ONNX Runtime threads used for timing.")
    plan: dict[str, object]
    before: ModelStats
    after: ModelStats
    steps: list[StepResult]
    data: EvaluationData
    latency_before: Latency
    latency_after: Latency
    agreement: Agreement
    warnings: list[str] = Field(default_factory=list)
    total_seconds: float
    cpu: CpuNote | None = Field(None, description="Pre-flight note on this CPU's int8 support (schema 1.1).")
    auto: AutoResult | None = Field(None, description="The automatic search, for plans with an auto step (1.1).")
    latency: LatencyComparison | None = Field(
        None, description="The after / before time ratio with its interval and the host's contention (1.2)."
    )

    @model_serializer(mode="wrap")
    def _bounded(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        """Every serialization is bounded: strings and lists cut, and what was cut named in the warnings.

        The names, labels and messages in a report come from the uploaded model; bounding here (rather than
        field by field) keeps fields added later bounded too.
        """
        data, notes = bound_within(handler(self), MAX_REPORT_BYTES)
        if notes:
            told = [cut(f"the report was cut to bound its size: {n}", 300) for n in notes[:_MAX_NOTES]]
            if len(notes) > _MAX_NOTES:
                told.append(f"the report was cut to bound its size in {len(notes) - _MAX_NOTES} more places")
            data["warnings"] = [*data.get("warnings", []), *told]
        return dict(data)

    @property
    def size_ratio(self) -> float:
        """After / before bytes on disk."""
        return self.after.size_bytes / self.before.size_bytes

    @property
    def latency_ratio(self) -> float:
        """After / before time: the median pair ratio of `latency` when present, else the p50 ratio."""
        if self.latency is not None:
            return self.latency.ratio
        return self.latency_after.p50_ms / self.latency_before.p50_ms
