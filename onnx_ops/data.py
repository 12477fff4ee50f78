"""Model inputs and the user's data files: concrete sample shapes, .npz loading with checks, synthesized inputs.

Data file convention: an ``.npz`` with one array per model input, keyed by input name, first axis =
samples. When an array has the input's rank, each row is fed as a batch of one (``a[i:i+1]``); when it
has one more axis, each ``a[i]`` is fed as it is (a whole batch per sample). An evaluation file may add
``labels``: one integer class per sample (shape ``[samples]``) or per batch row (``[samples, batch]``).
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import onnx
from onnx import helper

from onnx_ops.errors import DataError, PlanError
from onnx_ops.feeds import Feed
from onnx_ops.npz_files import read_npz
from onnx_ops.validate import cut, short_name

__all__ = ["Dataset", "InputSpec", "input_specs", "load_dataset", "resolve_shapes", "synthesize"]

_LABELS = "labels"


@dataclasses.dataclass(frozen=True)
class InputSpec:
    """One graph input: name, numpy dtype, and shape with symbolic dimensions as strings (or None)."""

    name: str
    dtype: np.dtype
    shape: tuple[int | str | None, ...]


@dataclasses.dataclass(frozen=True)
class Dataset:
    """Feeds ready for ONNX Runtime (one dict per run) and optional labels (one row per feed)."""

    feeds: list[Feed]
    labels: np.ndarray | None = None

    def head(self, n: int) -> Dataset:
        """The first n samples."""
        return Dataset(self.feeds[:n], None if self.labels is None else self.labels[:n])


def input_specs(model: onnx.ModelProto) -> list[InputSpec]:
    """The inputs a caller must feed (graph inputs that are not initializers)."""
    inits = {t.name for t in model.graph.initializer}
    specs = []
    for value in model.graph.input:
        if value.name in inits:
            continue
        tensor_type = value.type.tensor_type
        if not value.type.HasField("tensor_type"):
            raise PlanError(f"input {value.name!r} is not a tensor; only tensor inputs are supported")
        dtype = np.dtype(helper.tensor_dtype_to_np_dtype(tensor_type.elem_type))
        shape = tuple(d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in tensor_type.shape.dim)
        specs.append(InputSpec(value.name, dtype, shape))
    return specs


def resolve_shapes(
    specs: list[InputSpec], given: Mapping[str, list[int]], data: Sequence[Dataset] = ()
) -> dict[str, list[int]]:
    """Concrete shape of one sample per input.

    In order: the shape given (the plan's input_shapes, the CLI's --input-shape), the shape of the first
    sample of the data (evaluation first, then calibration), the model's fixed dimensions with a symbolic
    batch (first) dimension of 1. A symbolic dimension nothing of these fixes is refused, naming the input.
    """
    unknown = set(given) - {s.name for s in specs}
    if unknown:
        inputs = _listed([s.name for s in specs])
        raise PlanError(f"input_shapes names {_listed(sorted(unknown))}, but the model's inputs are {inputs}")
    shapes: dict[str, list[int]] = {}
    for spec in specs:
        sample = next((list(d.feeds[0][spec.name].shape) for d in data if d.feeds and spec.name in d.feeds[0]), None)
        if spec.name in given:
            shapes[spec.name] = _check_given(spec, list(given[spec.name]))
        elif sample is not None:
            shapes[spec.name] = sample
        else:
            shapes[spec.name] = _declared(spec)
    return shapes


def _declared(spec: InputSpec) -> list[int]:
    shape = []
    for axis, dim in enumerate(spec.shape):
        if isinstance(dim, int) and dim > 0:
            shape.append(dim)
        elif axis == 0:
            shape.append(1)
        else:
            example = [d if isinstance(d, int) and d > 0 else (1 if i == 0 else 16) for i, d in enumerate(spec.shape)]
            name, dims = cut(spec.name), ",".join(map(str, example))
            raise PlanError(
                f"input {short_name(spec.name)} has a symbolic dimension {short_name(dim or '?')} at axis {axis} "
                "and no evaluation or calibration data gives its size: give a data file, or the shape of one "
                f"sample: --input-shape {name}={dims} on the command line, or "
                f'"input_shapes": {{"{name}": {example}}} in the plan'
            )
    return shape


def _check_given(spec: InputSpec, shape: list[int]) -> list[int]:
    name = short_name(spec.name)
    if len(shape) != len(spec.shape):
        raise PlanError(f"input_shapes[{name}] has rank {len(shape)}, the model's input has rank {len(spec.shape)}")
    for axis, (want, got) in enumerate(zip(spec.shape, shape, strict=True)):
        if isinstance(want, int) and want > 0 and want != got:
            raise PlanError(f"input_shapes[{name}] axis {axis} is {got}, but the model fixes it to {want}")
    return shape


def synthesize(
    specs: list[InputSpec], shapes: Mapping[str, list[int]], n: int, seed: int, max_elements: int
) -> list[Feed]:
    """Seeded random inputs: floats ~ N(0, 1), integers in [0, 100) (token-id-like), booleans.

    Inputs named as masks get 0/1 padding masks (a random prefix of ones per row) and token type ids zeros.
    """
    rng = np.random.default_rng(seed)
    total = sum(math.prod(shapes[s.name]) for s in specs)
    if total > max_elements:
        raise PlanError(
            f"one synthesized sample would have {total} elements, more than the limit of {max_elements}; "
            "give smaller input_shapes or an evaluation file"
        )
    feeds = []
    for _ in range(n):
        feed: Feed = {}
        for spec in specs:
            shape = shapes[spec.name]
            if spec.dtype.kind == "f":
                feed[spec.name] = rng.standard_normal(shape).astype(spec.dtype)
            elif spec.dtype.kind in "iub" and (role := _integer_role(spec.name)):
                values = _mask(rng, shape) if role == "mask" else np.zeros(shape, np.int64)
                feed[spec.name] = values.astype(spec.dtype)
            elif spec.dtype.kind in "iu":
                feed[spec.name] = rng.integers(0, 100, size=shape).astype(spec.dtype)
            elif spec.dtype.kind == "b":
                feed[spec.name] = rng.integers(0, 2, size=shape).astype(bool)
            else:
                raise PlanError(
                    f"cannot synthesize input {short_name(spec.name)} of type {spec.dtype}; give an evaluation file"
                )
        feeds.append(feed)
    return feeds


def _integer_role(name: str) -> str | None:
    """'mask' for an attention/padding mask, 'segment' for token type ids, by the input's name; else None.

    A transformer turns its mask into an additive bias such as ``(1 - mask) * finfo.min``: a mask value of 2
    or more overflows that to infinity (random ids in [0, 100) made MiniLM's float outputs NaN), and token type
    ids index a table of two rows.
    """
    lowered = name.lower()
    if "mask" in lowered:
        return "mask"
    if "token_type" in lowered or "segment" in lowered:
        return "segment"
    return None


def _mask(rng: np.random.Generator, shape: list[int]) -> np.ndarray:
    """A 0/1 padding mask over the last axis: each row keeps a random prefix of at least one position."""
    if not shape or not shape[-1]:
        return np.ones(shape, np.int64)
    lengths = rng.integers(1, shape[-1] + 1, size=shape[:-1])
    return (np.arange(shape[-1]) < lengths[..., None]).astype(np.int64)


def load_dataset(
    source: str | os.PathLike[str] | Mapping[str, np.ndarray],
    specs: list[InputSpec],
    *,
    role: str,
    max_bytes: int,
) -> Dataset:
    """Load and check calibration or evaluation data (a .npz path or a mapping of arrays).

    Each array is checked against its input's dtype and fixed dimensions; symbolic dimensions take the
    data's sizes (see resolve_shapes).
    """
    arrays = dict(source) if isinstance(source, Mapping) else read_npz(Path(source), role, max_bytes)
    labels = arrays.pop(_LABELS, None) if role == "evaluation" else None
    names = {s.name for s in specs}
    expected = ", ".join(f"{cut(s.name)}: {s.dtype} {list(s.shape)}" for s in specs[:8])
    missing, extra = sorted(names - set(arrays)), sorted(set(arrays) - names)
    if missing or extra:
        what = "; ".join(
            part
            for part in (missing and f"missing {_listed(missing)}", extra and f"unexpected {_listed(extra)}")
            if part
        )
        hint = " (plus optional 'labels')" if role == "evaluation" else ""
        raise DataError(f"{role} data does not match the model's inputs: {what}. The model expects {expected}{hint}")
    counts = set()
    columns: dict[str, list[np.ndarray]] = {}
    for spec in specs:
        array = _check_array(arrays[spec.name], spec, role)
        columns[spec.name] = _split(array, spec)
        counts.add(len(columns[spec.name]))
    if len(counts) != 1:
        raise DataError(f"{role} data: inputs have different numbers of samples ({sorted(counts)})")
    count = counts.pop()
    if count == 0:
        raise DataError(f"{role} data has zero samples")
    feeds = [{name: column[i] for name, column in columns.items()} for i in range(count)]
    return Dataset(feeds, None if labels is None else _check_labels(labels, count))


def _check_array(array: np.ndarray, spec: InputSpec, role: str) -> np.ndarray:
    name = short_name(spec.name)
    if array.dtype.hasobject:
        raise DataError(f"{role} array {name} holds Python objects (pickles are refused)")
    if array.dtype != spec.dtype:
        if array.dtype.kind != spec.dtype.kind and not (array.dtype.kind in "iu" and spec.dtype.kind in "iu"):
            raise DataError(f"{role} array {name} has dtype {array.dtype}, the model expects {spec.dtype}")
        array = array.astype(spec.dtype)  # same kind: float64 -> float32, int32 -> int64 are what users mean
    rank = len(spec.shape)
    if array.ndim not in (rank, rank + 1):
        row = [d if isinstance(d, int) and d > 0 else str(d or "?") for d in spec.shape]
        raise DataError(
            f"{role} array {name} has shape {list(array.shape)}; expected [samples, *{row[1:]}] "
            f"(rank {rank}) or [samples, *{row}] (rank {rank + 1})"
        )
    row_shape = array.shape[1:] if array.ndim == rank else array.shape[2:]
    for axis, (want, got) in enumerate(zip(spec.shape[1:], row_shape, strict=True), start=1):
        if isinstance(want, int) and want > 0 and want != got:
            raise DataError(f"{role} array {name}: axis {axis} of each sample is {got}, the model expects {want}")
    if array.dtype.kind == "f" and not np.isfinite(array).all():
        raise DataError(f"{role} array {name} holds NaN or infinite values")
    return array


def _listed(names: Sequence[str], limit: int = 8) -> str:
    """A bounded list of uploaded names: ['a', 'b', ... (12 more)]."""
    more = [f"... ({len(names) - limit} more)"] if len(names) > limit else []
    return "[" + ", ".join([short_name(n) for n in names[:limit]] + more) + "]"


def _split(array: np.ndarray, spec: InputSpec) -> list[np.ndarray]:
    if array.ndim == len(spec.shape):
        return [np.ascontiguousarray(array[i : i + 1]) for i in range(array.shape[0])]
    return [np.ascontiguousarray(array[i]) for i in range(array.shape[0])]


def _check_labels(labels: np.ndarray, count: int) -> np.ndarray:
    if labels.dtype.kind not in "iub" or labels.ndim not in (1, 2) or labels.shape[0] != count:
        raise DataError(
            f"labels must be integer classes of shape [{count}] or [{count}, batch], "
            f"got {labels.dtype} {list(labels.shape)}"
        )
    return labels.astype(np.int64).reshape(count, -1)
