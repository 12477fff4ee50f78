"""Measuring the compressed model against the original: its figures, the evaluation samples, agreement, latency.

Each model's outputs go to files in the job's folder as they come (one sample in memory at a time), and the
agreement is summed up sample by sample: a language model's logits of every sample, of both models, are never
held at once. The compressed model's size figures of a result past 2 GiB come from the files the job wrote
(`result_stats`): it is neither loaded nor written again to count them.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
from onnx import external_data_helper

from onnx_ops import job_files, large
from onnx_ops.agreement import accuracy, measure_agreement
from onnx_ops.cpu import cpu_note
from onnx_ops.data import Dataset, InputSpec, synthesize
from onnx_ops.errors import PassFailedError
from onnx_ops.evaluate import Runner, compare_latency, cpu_name, default_threads, model_stats, structure_stats
from onnx_ops.gzip_size import GzipSize, is_estimate
from onnx_ops.plan import Plan
from onnx_ops.progress import Tracker
from onnx_ops.report import Agreement, EvaluationData, ModelStats, Report, StepResult
from onnx_ops.tensor_count import count_values
from onnx_ops.timing import TimingSettings, latency_warnings
from onnx_ops.validate import Limits, iter_tensors

__all__ = ["Outputs", "evaluation_inputs", "measure", "result_stats"]

_KEPT_BYTES = 1 << 20  # outputs smaller than this stay in memory; larger ones go to a file until read back


class Outputs:
    """One model's outputs of every evaluation sample, in the order run; large arrays wait in files.

    Iterating reads one sample back at a time. Non-tensor outputs (ZipMap lists, sequences) stay in memory.
    """

    def __init__(self, folder: Path, prefix: str) -> None:
        self.folder, self.prefix = folder, prefix
        self._runs: list[list[object]] = []  # a None in a run: read back from its file

    def append(self, run: list[object]) -> None:
        """Add one sample's outputs."""
        kept: list[object] = []
        for index, value in enumerate(run):
            if isinstance(value, np.ndarray) and value.dtype.kind in "fiub" and value.nbytes >= _KEPT_BYTES:
                np.save(self._path(len(self._runs), index), value, allow_pickle=False)
                kept.append(None)
            else:
                kept.append(value)
        self._runs.append(kept)

    def __len__(self) -> int:
        return len(self._runs)

    def __iter__(self) -> Iterator[list[object]]:
        for sample, run in enumerate(self._runs):
            yield [
                np.load(self._path(sample, index), allow_pickle=False) if value is None else value
                for index, value in enumerate(run)
            ]

    def _path(self, sample: int, index: int) -> Path:
        return self.folder / f"{self.prefix}-{sample}-{index}.npy"


def result_stats(path: Path) -> ModelStats:
    """The report's figures of the compressed model the job wrote to `path`, its weights in data files beside it.

    A model that fits one file is measured as `save` writes it: one file, serialized a piece at a time in
    memory. A larger one is measured from the files as they are, never loaded whole nor written again: its size
    is the `.onnx` file's plus its data files' (as `save` writes it, but for the data file's name in each
    reference), its gzip figure streamed from them in that order, its parameters and zeros counted a chunk at
    a time.
    """
    graph = onnx.load(path, load_external_data=False)
    tensors = list(iter_tensors(graph))
    external = [t for _, t in tensors if external_data_helper.uses_external_data(t)]
    if large.fits_in_one_file(graph, large.ONE_FILE_LIMIT - sum(job_files.tensor_bytes(t) for t in external)):
        del graph, tensors, external
        return model_stats(job_files.load(path))
    locations = sorted({external_data_helper.ExternalDataInfo(t).location for t in external})
    gzip = GzipSize()
    size = sum(gzip.file(file) for file in [path, *(path.parent / name for name in locations)])
    parameters = zeros = 0
    for name, tensor in tensors:
        counted = count_values(name, tensor, path.parent, refuse_nan=False)
        parameters += counted[0]
        zeros += counted[1]
    return ModelStats(
        size_bytes=size,
        gzip_bytes=gzip.finish(),
        gzip_estimated=is_estimate(size),
        parameters=parameters,
        zero_fraction=zeros / parameters if parameters else 0.0,
        **structure_stats(graph),
    )


def evaluation_inputs(
    plan: Plan,
    specs: list[InputSpec],
    shapes: dict[str, list[int]],
    evaluation: Dataset | None,
    calibration: Dataset | None,
    limits: Limits,
) -> tuple[EvaluationData, Dataset]:
    """The samples the models are compared on (evaluation data, else calibration data, else synthesized)."""
    options = plan.evaluation
    given = evaluation or calibration
    if evaluation is not None:
        chosen, source = evaluation.head(options.max_samples), "evaluation"
        note = "measured on the evaluation data given"
    elif calibration is not None:
        chosen, source = Dataset(calibration.feeds[: options.max_samples]), "calibration"
        note = "no evaluation data was given: agreement is measured on the calibration data (no labels)"
    else:
        feeds = synthesize(specs, shapes, options.synthetic_samples, options.seed, limits.max_sample_elements)
        chosen, source = Dataset(feeds), "synthetic"
        note = (
            "no evaluation or calibration data was given: agreement is measured on synthesized random "
            "inputs, which may not reflect real data; give an evaluation file for a trustworthy figure"
        )
    available = len(given.feeds) if given is not None else len(chosen.feeds)
    if available > len(chosen.feeds):
        note += f"; the first {len(chosen.feeds)} of its {available} samples (evaluation.max_samples)"
    sample_shapes = {name: list(array.shape) for name, array in chosen.feeds[0].items()}
    data = EvaluationData(
        source=source, samples=len(chosen.feeds), available=available, note=note, input_shapes=sample_shapes
    )
    return data, chosen


def measure(
    stats: tuple[ModelStats, ModelStats],
    runners: tuple[Runner, Runner],
    plan: Plan,
    steps: list[StepResult],
    evaluation: tuple[EvaluationData, Dataset],
    tracker: Tracker,
    folder: Path,
) -> Report:
    """The report: both models' figures, their agreement on the evaluation samples, accuracy, latency.

    Args:
        stats: The original's and the compressed model's static figures.
        runners: Sessions of the original and of the compressed model.
        plan: The plan run.
        steps: What each step did.
        evaluation: What the samples are, and the samples.
        tracker: Progress of the measuring.
        folder: Where the outputs wait until they are compared (the job's private folder).
    """
    reference, candidate = runners
    data, dataset = evaluation
    if candidate.output_names != reference.output_names:
        raise PassFailedError(
            f"the compressed model's outputs {candidate.output_names} differ from the original's "
            f"{reference.output_names}"
        )
    options = plan.evaluation
    # Shares by the model runs each part makes: every sample on both models, then the timed runs of both.
    samples, timed_runs = len(dataset.feeds), options.latency_runs + options.warmup_runs
    outputs = samples / (samples + timed_runs)
    ref_tracker = tracker.part(0.0, outputs / 2, "original model on sample")
    ref_out = _outputs(reference, dataset, ref_tracker, (folder, "original"))
    new_tracker = tracker.part(outputs / 2, outputs, "compressed model on sample")
    new_out = _outputs(candidate, dataset, new_tracker, (folder, "compressed"))
    names = reference.output_names
    meter = measure_agreement(names, ref_out, new_out)
    acc = accuracy(names, dataset.labels, ref_out, new_out) if dataset.labels is not None else None
    first = dataset.feeds[0]
    batch = next(iter(first.values())).shape[0] if first and next(iter(first.values())).ndim else 1
    tracker.stage(f"latency, at least {options.latency_runs} interleaved pairs", outputs)
    settings = TimingSettings(options.warmup_runs, options.latency_runs, seconds=options.latency_seconds)
    timed = compare_latency(reference, candidate, first, settings=settings, batch=batch)
    warnings = [w for s in steps for w in s.warnings]
    if data.source == "synthetic":
        warnings.append(data.note)
    warnings += latency_warnings(timed.comparison)
    if dataset.labels is not None and acc is None:
        warnings.append("labels were given but no output looks like class scores or class labels; no accuracy measured")
    return Report(
        tool_versions={
            "onnx": onnx.__version__,
            "onnxruntime": ort.__version__,
            "onnx_ir": ir.__version__,
            "numpy": np.__version__,
        },
        host={
            "cpu": cpu_name(),
            "cores": default_threads(),
            "threads": options.threads or default_threads(),
            "provider": "CPUExecutionProvider",
        },
        plan=plan.model_dump(mode="json"),
        before=stats[0],
        after=stats[1],
        steps=steps,
        data=data,
        latency_before=timed.baseline,
        latency_after=timed.candidate,
        latency=timed.comparison,
        agreement=Agreement(outputs=meter.floating(), exact=meter.exact(), accuracy=acc),
        warnings=warnings,
        total_seconds=0.0,
        cpu=cpu_note(),
    )


def _outputs(runner: Runner, dataset: Dataset, tracker: Tracker, files: tuple[Path, str]) -> Outputs:
    outputs = Outputs(*files)
    for index, feed in enumerate(dataset.feeds):
        tracker.count("", index, len(dataset.feeds))
        outputs.append(runner.run(feed))
    tracker.count("", len(dataset.feeds), len(dataset.feeds))
    return outputs
