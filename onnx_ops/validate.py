"""Loading an untrusted model: every check happens before the model is used, with an error that names the problem.

The order follows what is cheapest and safest first: size, parse, external data, counts, versions and
domains, the ONNX checker, no NaN. ONNX Runtime's own session creation is the last gate and is
done by the caller (the checker and ONNX Runtime disagree on many cases, so both are kept).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
import onnx
from google.protobuf.message import DecodeError
from onnx import numpy_helper

from onnx_ops import bounds
from onnx_ops.errors import InvalidModelError
from onnx_ops.external import PROTOBUF_LIMIT, has_external_data, load_external_data

__all__ = [
    "ALLOWED_DOMAINS",
    "Limits",
    "check_finite",
    "check_structure",
    "clean_message",
    "cut",
    "iter_graphs",
    "iter_tensors",
    "load_model",
    "parse_model_file",
    "run_checker",
    "short_name",
    "validate_model",
]

logger = logging.getLogger(__name__)

ALLOWED_DOMAINS = frozenset({"", "ai.onnx", "ai.onnx.ml", "com.microsoft"})
_MAX_DEFAULT_OPSET = onnx.defs.onnx_opset_version()
_MAX_ML_OPSET = 5
_NAME_LIMIT = 80
_FLOAT_TYPES = (
    onnx.TensorProto.FLOAT,
    onnx.TensorProto.FLOAT16,
    onnx.TensorProto.DOUBLE,
    onnx.TensorProto.BFLOAT16,
)
_PATH_RE = re.compile(r"(?:[A-Za-z]:)?(?:/[^\s'\":,;()\[\]]+)+")


@dataclasses.dataclass(frozen=True)
class Limits:
    """Caps on untrusted input.

    ``max_model_bytes`` caps the ``.onnx`` file itself (protobuf's 2 GiB by default: one file cannot hold more).
    ``max_external_bytes`` caps the data its tensors read from files beside it (external data), which is how
    models past 2 GiB are stored. ``allow_external_data`` lets a model loaded from a path read such files
    (each reference checked, see onnx_ops.external); the service turns it off for a single uploaded file,
    which sits beside the job's other files. ``share_external_data``: the caller owns the model's data files
    and leaves them unchanged while the job runs (a local command-line user): they are checked as always, then
    read where they are rather than copied into the job's folder (onnx_ops.job_model). Never for uploads.
    ``move_external_data``: the caller hands the model's data files over (the service's bundle, unpacked by the
    job itself): checked as always, then moved (renamed) into the job's folder rather than copied, under names
    and references the job writes (onnx_ops.external.move_external_data); the model file itself is left.
    """

    max_model_bytes: int = PROTOBUF_LIMIT
    max_data_bytes: int = 1 << 30
    max_nodes: int = 250_000
    max_initializers: int = 100_000
    max_sample_elements: int = 50_000_000
    allow_external_data: bool = True
    max_external_bytes: int = 64 << 30
    share_external_data: bool = False
    move_external_data: bool = False


def clean_message(message: object, limit: int = 600) -> str:
    """A library's error message without file system paths, shortened to one readable paragraph."""
    text = _PATH_RE.sub("<path>", str(message)).strip()
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def cut(text: object, limit: int = _NAME_LIMIT) -> str:
    """An uploaded name or text cut to `limit` characters for a message (names can be megabytes long)."""
    return bounds.cut(text, limit)


def short_name(name: object, limit: int = _NAME_LIMIT) -> str:
    """An uploaded name quoted for a message (repr), cut to `limit` characters."""
    return repr(cut(name, limit))


def load_model(path: str | os.PathLike[str], limits: Limits | None = None) -> onnx.ModelProto:
    """Read, parse and validate a model file; raise InvalidModelError naming the first problem found.

    External data (when the limits allow it) is read from files in the model's folder once every reference
    has been checked: a relative name, no link, the range inside the file and of the tensor's size.
    """
    limits = limits or Limits()
    path = Path(path)
    model = parse_model_file(path, limits)
    external = 0
    if limits.allow_external_data:
        external = load_external_data(path, iter_tensors(model), max_bytes=limits.max_external_bytes)
    # A model with external data is checked from its file (the checker then only looks up its data files):
    # held in memory it may be past the 2 GiB one serialized ModelProto can hold.
    validate_model(model, limits, checker_path=path if external else None)
    return model


def parse_model_file(path: Path, limits: Limits) -> onnx.ModelProto:
    """The model file parsed, after the checks on its size; external data is left where it is."""
    try:
        size = path.stat().st_size
    except OSError as e:
        raise InvalidModelError("the model file cannot be read") from e
    if size == 0:
        raise InvalidModelError("the model file is empty (0 bytes)")
    if size > limits.max_model_bytes:
        raise InvalidModelError(
            f"the model file has {size} bytes, more than the limit of {limits.max_model_bytes} bytes"
            + (
                " (a model past 2 GiB must keep its weights in data files beside it: external data)"
                if size > PROTOBUF_LIMIT
                else ""
            )
        )
    model = onnx.ModelProto()
    try:
        model.ParseFromString(path.read_bytes())  # the bytes go as soon as parsed
    except (DecodeError, RuntimeError, ValueError) as e:
        raise InvalidModelError("the file is not an ONNX model: it does not parse as an ONNX protobuf") from e
    return model


def validate_model(
    model: onnx.ModelProto, limits: Limits | None = None, *, checker_path: str | os.PathLike[str] | None = None
) -> None:
    """Run every static check on a parsed model.

    Args:
        model: The model, every tensor inside.
        limits: Caps on untrusted input.
        checker_path: The file the model was loaded from with its external data, for the ONNX checker.
    """
    limits = limits or Limits()
    check_structure(model, limits)
    run_checker(model if checker_path is None else checker_path)
    for name, tensor in iter_tensors(model):
        check_finite(name, tensor)


def check_structure(model: onnx.ModelProto, limits: Limits, *, external_checked: bool = False) -> None:
    """The checks that read no weight: a graph, no unread external data, counts, versions and domains.

    `external_checked`: every external reference was checked (and its data read or copied by the caller).
    """
    if not model.HasField("graph") or (not model.graph.node and not model.graph.output):
        raise InvalidModelError("the file parses but holds no ONNX graph (is it really an .onnx file?)")
    if not external_checked:
        _check_external_data(model, limits)
    _check_counts(model, limits)
    _check_versions(model)


def run_checker(model: onnx.ModelProto | str | os.PathLike[str]) -> None:
    """The ONNX checker (not its full check) on a model or, read by the checker itself, a model file.

    A file's external data is only looked up (a relative name inside its folder that exists), not read.
    """
    try:
        onnx.checker.check_model(model if isinstance(model, onnx.ModelProto) else os.fspath(model), full_check=False)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError, ValueError) as e:
        raise InvalidModelError(f"the ONNX checker refuses the model: {clean_message(e)}") from e


def check_finite(name: str, tensor: onnx.TensorProto, array: np.ndarray | None = None) -> None:
    """Refuse a float tensor holding NaN (its array, when the caller already has it, or the tensor's data)."""
    # NaN only: infinities are legitimate constants (the identity of Max, additive attention masks). A pass
    # leaves any weight that holds them unchanged (see passes/_base.py).
    if tensor.data_type not in _FLOAT_TYPES:
        return
    if array is None:
        try:
            array = numpy_helper.to_array(tensor)
        except (ValueError, TypeError) as e:
            raise InvalidModelError(f"tensor {short_name(name)} cannot be decoded: {clean_message(e)}") from e
    if np.isnan(array).any():
        raise InvalidModelError(f"tensor {short_name(name)} holds NaN values")


def iter_tensors(model: onnx.ModelProto) -> Iterator[tuple[str, onnx.TensorProto]]:
    """Every tensor stored in the model, with a label (the tensor's or its node's name, unbounded).

    That is initializers, sparse initializers and tensor attributes (Constant's value and sparse_value,
    any node's tensor attributes) in the main graph and every subgraph; the nodes of local functions and
    their attribute defaults; and the graphs of training info.
    """
    for graph in iter_graphs(model, training=True):
        yield from ((t.name, t) for t in graph.initializer)
        for sparse in graph.sparse_initializer:
            yield sparse.values.name, sparse.values
            yield sparse.indices.name, sparse.indices
        for node in graph.node:
            yield from _attribute_tensors(node.attribute, node.name or node.op_type)
    for function in model.functions:
        for node in function.node:
            yield from _attribute_tensors(node.attribute, node.name or node.op_type)
        yield from _attribute_tensors(function.attribute_proto, f"{function.name} (attribute default)")


def iter_graphs(model: onnx.ModelProto, *, training: bool = False) -> Iterator[onnx.GraphProto]:
    """The main graph and every subgraph, including those in local functions and their attribute defaults.

    Args:
        model: The model.
        training: Also the initialization and algorithm graphs of training info (ONNX Runtime's inference
            sessions never run them, but they are stored in the file).
    """
    stack = [model.graph]
    if training:
        for info in model.training_info:
            stack += [info.initialization, info.algorithm]
    for function in model.functions:
        for node in function.node:
            stack.extend(_attribute_graphs(node.attribute))
        stack.extend(_attribute_graphs(function.attribute_proto))
    while stack:  # a stack, not recursion: nesting depth is the uploader's choice
        graph = stack.pop()
        yield graph
        for node in graph.node:
            stack.extend(_attribute_graphs(node.attribute))


def _all_nodes(model: onnx.ModelProto) -> Iterator[onnx.NodeProto]:
    """Every node ONNX Runtime may run: in the graphs (subgraphs too) and in local functions."""
    for graph in iter_graphs(model):
        yield from graph.node
    for function in model.functions:
        yield from function.node


def _attribute_graphs(attributes: Iterable[onnx.AttributeProto]) -> Iterator[onnx.GraphProto]:
    # By the fields set, not the declared type: a crafted attribute may carry both.
    for attr in attributes:
        if attr.HasField("g"):
            yield attr.g
        yield from attr.graphs


def _attribute_tensors(attributes: Iterable[onnx.AttributeProto], label: str) -> Iterator[tuple[str, onnx.TensorProto]]:
    for attr in attributes:
        if attr.HasField("t"):
            yield label, attr.t
        yield from ((label, t) for t in attr.tensors)
        sparse_tensors = [attr.sparse_tensor] if attr.HasField("sparse_tensor") else []
        for sparse in [*sparse_tensors, *attr.sparse_tensors]:
            yield label, sparse.values
            yield label, sparse.indices


def _check_external_data(model: onnx.ModelProto, limits: Limits) -> None:
    # What load_model did not read is refused: an external reference is a path chosen by the uploader
    # (CVE-2022-25882, CVE-2024-27318), only resolved against the folder of a model loaded from its file.
    for name, tensor in iter_tensors(model):
        if has_external_data(tensor):
            if limits.allow_external_data:
                raise InvalidModelError(
                    f"tensor {short_name(name)} refers to external data, which is read only when the model is "
                    "loaded from its file: give the path of the .onnx file, with its data files beside it"
                )
            raise InvalidModelError(
                f"tensor {short_name(name)} refers to external data; a single model file must be "
                "self-contained: send the model with its data files as a bundle (a .zip or .tar), or save it "
                "with all tensors inside the .onnx file"
            )


def _check_counts(model: onnx.ModelProto, limits: Limits) -> None:
    graphs = list(iter_graphs(model, training=True))
    nodes = sum(len(g.node) for g in graphs) + sum(len(f.node) for f in model.functions)
    inits = sum(len(g.initializer) + len(g.sparse_initializer) for g in graphs)
    if nodes > limits.max_nodes:
        raise InvalidModelError(f"the model has {nodes} nodes, more than the limit of {limits.max_nodes}")
    if inits > limits.max_initializers:
        raise InvalidModelError(f"the model has {inits} initializers, more than the limit of {limits.max_initializers}")


def _check_versions(model: onnx.ModelProto) -> None:
    """IR version, and the domains and opsets of the nodes that use them.

    A domain is judged by the nodes that use it, not by the import list: exporters declare domains they never
    use (paddle2onnx imports 'Paddle'), and ONNX Runtime ignores those. Whether ONNX Runtime has a kernel
    for each node of an allowed domain is left to its session creation.
    """
    if model.ir_version < 3 or model.ir_version > onnx.IR_VERSION:
        raise InvalidModelError(f"IR version {model.ir_version} is not supported (supported: 3 to {onnx.IR_VERSION})")
    function_domains = {f.domain for f in model.functions}
    used = set()
    for node in _all_nodes(model):
        if node.domain not in ALLOWED_DOMAINS and node.domain not in function_domains:
            raise InvalidModelError(
                f"node {short_name(node.name or node.op_type)} uses operator domain {short_name(node.domain)}, "
                "which is not supported (custom operators cannot run here); allowed: "
                + ", ".join(repr(d) for d in sorted(ALLOWED_DOMAINS - {"ai.onnx"}))
            )
        used.add(node.domain)
    for opset in model.opset_import:
        if opset.domain in ("", "ai.onnx"):
            if not 1 <= opset.version <= _MAX_DEFAULT_OPSET:
                raise InvalidModelError(
                    f"ONNX opset {opset.version} is not supported (supported: 1 to {_MAX_DEFAULT_OPSET})"
                )
        elif opset.domain == "ai.onnx.ml" and opset.version > _MAX_ML_OPSET:
            raise InvalidModelError(f"ai.onnx.ml opset {opset.version} is not supported (max {_MAX_ML_OPSET})")
    known = used | ALLOWED_DOMAINS | function_domains
    unused = [o.domain for o in model.opset_import if o.domain not in known]
    if unused:  # ignored, like ONNX Runtime does; the compressed model drops them
        logger.info("the model imports %d operator domain(s) no node uses, e.g. %s", len(unused), short_name(unused[0]))
