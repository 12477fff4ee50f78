"""The job's copy of the model: validated while it is written to the job's folder, its weights never held twice.

The model given (a path, bytes or a ModelProto) becomes ``original.onnx`` in the job's private folder, a weightless
file whose main graph's weights sit in ``original.onnx.data`` at aligned offsets (onnx_ops.job_files): ONNX
Runtime maps them, the passes map them. On the way every check of onnx_ops.validate runs, each where it costs
least:

- the file is parsed once (its bytes and the parsed message are the peak: 2x the file, briefly); external data is
  checked, then copied a chunk at a time from the uploader's files into the job's data file (never read whole);
- the checks that need no weight (graph, counts, versions, domains) on the parsed message;
- the weights moved out to the data file, the message written weightless and parsed again (a parsed message
  frees nothing until all of it goes, so the one holding the weights is dropped whole);
- the ONNX checker on the weightless file, by path (it looks its data file up, reads none of it);
- NaN, parameters and zeros from the data file a chunk at a time, with the report's size and gzip figures
  (the file as given, then its external data as copied; gzip estimated past a size, see onnx_ops.gzip_size).

Data files the caller hands over (`Limits.move_external_data`, the service's unpacked bundle) are checked the
same way, then moved into the job's folder instead of copied (their weights at the offsets they had), with a
weightless model file the job writes; data files a caller keeps (`Limits.share_external_data`) are read where
they are.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from pathlib import Path

import onnx

from onnx_ops.errors import InvalidModelError
from onnx_ops.evaluate import structure_stats
from onnx_ops.external import has_external_data, load_external_data, move_external_data
from onnx_ops.gzip_size import GzipSize, is_estimate
from onnx_ops.job_files import DataWriter
from onnx_ops.large import file_sizes, fits_in_one_file
from onnx_ops.memory import release_memory
from onnx_ops.report import ModelStats
from onnx_ops.tensor_count import count_values
from onnx_ops.validate import (
    Limits,
    check_structure,
    iter_tensors,
    parse_model_file,
    run_checker,
    short_name,
)

__all__ = ["JobModel", "from_file", "from_proto"]

_NAME = "original.onnx"
_SHARED_INLINE_BYTES = 64 << 20  # a shared model's .onnx file at most: its inline tensors stay in memory


@dataclasses.dataclass(frozen=True)
class JobModel:
    """The validated original in the job's folder.

    Attributes:
        path: The weightless model file (``original.onnx``); its weights are in ``original.onnx.data``.
        graph: That file's ModelProto (no weights in it: tensors under 1 KiB and outside the main graph only).
        stats: The report's figures of the model as given.
    """

    path: Path
    graph: onnx.ModelProto
    stats: ModelStats


def from_file(path: Path, workdir: Path, limits: Limits) -> JobModel:
    """Validate the model file at `path` (with its external data beside it) into the job's folder.

    With `limits.share_external_data` a model whose weights all sit in data files is checked the same way but
    left where it is: the job reads the caller's files (see `_shared`).
    """
    model = parse_model_file(path, limits)
    if limits.allow_external_data and limits.share_external_data and _shareable(model, path):
        return _shared(model, path, limits)
    if limits.allow_external_data and limits.move_external_data and _movable(model, path, workdir):
        return _moved(model, path, workdir, limits)
    gzip = GzipSize()
    size = gzip.file(path)
    job = workdir / _NAME
    writer = DataWriter(job.with_name(f"{_NAME}.data"))
    try:
        if limits.allow_external_data:
            main = list(model.graph.initializer)  # kept alive: the same objects come back to `take`
            mains = {id(t) for t in main}

            def take(tensor: onnx.TensorProto, chunks: Iterator[bytes], length: int) -> bool:
                # A Constant's or a subgraph's tensor is read into the message (returning False).
                return id(tensor) in mains and writer.add(tensor, gzip.passing(chunks), length)

            size += load_external_data(path, iter_tensors(model), max_bytes=limits.max_external_bytes, take=take)
            del main, mains, take
        check_structure(model, limits, external_checked=limits.allow_external_data)
        _spill(model, writer)
    finally:
        writer.close()
    weightless = model.SerializeToString()
    del model  # the message that held the weights goes whole (a parsed message frees nothing until then)
    release_memory()
    return _finish(weightless, job, (size, gzip.finish()))


def _shareable(model: onnx.ModelProto, path: Path) -> bool:
    """Whether the model keeps its weights in data files, read where they are.

    That is: some main-graph initializers and nothing else there, and a small `.onnx` file (what stays inline
    is held in memory with the job's graph).
    """
    main = list(model.graph.initializer)  # kept alive: iter_tensors gives the same objects
    mains = {id(t) for t in main}
    external = False
    for _, tensor in iter_tensors(model):
        if has_external_data(tensor):
            if id(tensor) not in mains:  # a Constant's or a subgraph's: read into the message by the copying path
                return False
            external = True
    return external and path.stat().st_size <= _SHARED_INLINE_BYTES


def _shared(model: onnx.ModelProto, path: Path, limits: Limits) -> JobModel:
    """The model at `path` as the job's original, its data files read where they are (a caller's own files).

    Every external reference is checked as when it is copied; the bytes are only read for the gzip figure. For a
    caller who owns the files (the command line): nothing else writes them while the job runs, and a file
    truncated under the job's mapping would only stop that caller's own job.
    """
    gzip = GzipSize()
    size = gzip.file(path)

    def take(tensor: onnx.TensorProto, chunks: Iterator[bytes], length: int) -> bool:
        for _ in gzip.passing(chunks):
            pass
        return True  # left in its file: the reference stays as checked

    size += load_external_data(path, iter_tensors(model), max_bytes=limits.max_external_bytes, take=take)
    check_structure(model, limits, external_checked=True)
    return _described(model, path, (size, gzip.finish()))


def _movable(model: onnx.ModelProto, path: Path, workdir: Path) -> bool:
    """Whether the model's data files can be moved into the job's folder: shareable, on the same file system."""
    return _shareable(model, path) and path.parent.stat().st_dev == workdir.stat().st_dev


def _moved(model: onnx.ModelProto, path: Path, workdir: Path, limits: Limits) -> JobModel:
    """The model at `path` as the job's original, its data files (handed over by the caller) moved, not copied.

    Checked as when copied; the bytes are read once for the gzip figure. The job writes its own weightless model
    file, whose references name the moved files (onnx_ops.external.move_external_data); their weights stay at
    the offsets the files had.
    """
    gzip = GzipSize()
    size = gzip.file(path)

    def take(tensor: onnx.TensorProto, chunks: Iterator[bytes], length: int) -> bool:
        for _ in gzip.passing(chunks):
            pass
        return True  # left in its file, moved below

    size += load_external_data(path, iter_tensors(model), max_bytes=limits.max_external_bytes, take=take)
    check_structure(model, limits, external_checked=True)
    move_external_data(path, iter_tensors(model), workdir, f"{_NAME}.data.")
    weightless = model.SerializeToString()
    del model
    release_memory()
    return _finish(weightless, workdir / _NAME, (size, gzip.finish()))


def from_proto(model: onnx.ModelProto, workdir: Path, limits: Limits) -> JobModel:
    """Validate a ModelProto the caller holds (every tensor inside) into the job's folder; it is left unchanged.

    Its size figures are those of the model as written: within the one-file limit, one file (serialized a piece
    at a time in memory, nothing written); past it, the job's own `.onnx` file and data file, read back once
    written (as a result past the limit is counted, onnx_ops.measure.result_stats), no other copy written.
    """
    check_structure(model, limits)
    sizes = file_sizes(model) if fits_in_one_file(model) else None
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    job = workdir / _NAME
    writer = DataWriter(job.with_name(f"{_NAME}.data"))
    try:
        _spill(copy, writer)
    finally:
        writer.close()
    weightless = copy.SerializeToString()
    del copy
    release_memory()
    return _finish(weightless, job, sizes)


def _spill(model: onnx.ModelProto, writer: DataWriter) -> None:
    for tensor in model.graph.initializer:
        try:
            writer.add_inline(tensor)
        except ValueError as e:
            raise InvalidModelError(f"tensor {short_name(tensor.name)}: {e}") from e


def _finish(weightless: bytes, job: Path, sizes: tuple[int, int] | None) -> JobModel:
    """Write the weightless model, check the file and count its weights (sizes None: those of the files)."""
    job.write_bytes(weightless)
    if sizes is None:
        gzip = GzipSize()
        size = sum(gzip.file(path) for path in (job, job.with_name(f"{_NAME}.data")))
        sizes = size, gzip.finish()
    graph = onnx.ModelProto()
    graph.ParseFromString(weightless)
    return _described(graph, job, sizes)


def _described(graph: onnx.ModelProto, job: Path, sizes: tuple[int, int]) -> JobModel:
    """Check the weightless model file `job` (its `graph` parsed) and count its weights."""
    run_checker(job)
    parameters = zeros = 0
    for name, tensor in iter_tensors(graph):
        counted = count_values(name, tensor, job.parent)
        parameters += counted[0]
        zeros += counted[1]
    return JobModel(
        path=job,
        graph=graph,
        stats=ModelStats(
            size_bytes=sizes[0],
            gzip_bytes=sizes[1],
            gzip_estimated=is_estimate(sizes[0]),
            parameters=parameters,
            zero_fraction=zeros / parameters if parameters else 0.0,
            **structure_stats(graph),
        ),
    )
