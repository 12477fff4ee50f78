"""Loading an untrusted model: every check happens before the model is used, with an error that names the problem.

The order follows what is cheapest and safest first: size, parse, external data, counts, versions and
domains, the ONNX checker, finite weights. ONNX Runtime's own session creation is the last gate and is
done by the caller (the checker and ONNX Runtime disagree on many cases, so both are kept).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnx
from google.protobuf.message import DecodeError
from onnx import numpy_helper

from onnx_ops.errors import InvalidModelError

__all__ = ["ALLOWED_DOMAINS", "Limits", "clean_message", "iter_tensors", "load_model", "validate_model"]

logger = logging.getLogger(__name__)

ALLOWED_DOMAINS = frozenset({"", "ai.onnx", "ai.onnx.ml", "com.microsoft"})
_MAX_DEFAULT_OPSET = onnx.defs.onnx_opset_version()
_MAX_ML_OPSET = 5
_PATH_RE = re.compile(r"(?:[A-Za-z]:)?(?:/[^\s'\":,;()\[\]]+)+")


@dataclasses.dataclass(frozen=True)
class Limits:
    """Caps on untrusted input. The defaults fit models up to about 1 GB."""

    max_model_bytes: int = 1 << 30
    max_data_bytes: int = 1 << 30
    max_nodes: int = 250_000
    max_initializers: int = 100_000
    max_sample_elements: int = 50_000_000


def clean_message(message: object, limit: int = 600) -> str:
    """A library's error message without file system paths, shortened to one readable paragraph."""
    text = _PATH_RE.sub("<path>", str(message)).strip()
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def load_model(path: str | os.PathLike[str], limits: Limits | None = None) -> onnx.ModelProto:
    """Read, parse and validate a model file; raise InvalidModelError naming the first problem found."""
    limits = limits or Limits()
    path = Path(path)
    try:
        size = path.stat().st_size
    except OSError as e:
        raise InvalidModelError("the model file cannot be read") from e
    if size == 0:
        raise InvalidModelError("the model file is empty (0 bytes)")
    if size > limits.max_model_bytes:
        raise InvalidModelError(
            f"the model file has {size} bytes, more than the limit of {limits.max_model_bytes} bytes"
        )
    model = onnx.ModelProto()
    try:
        model.ParseFromString(path.read_bytes())
    except (DecodeError, RuntimeError, ValueError) as e:
        raise InvalidModelError("the file is not an ONNX model: it does not parse as an ONNX protobuf") from e
    validate_model(model, limits)
    return model


def validate_model(model: onnx.ModelProto, limits: Limits | None = None) -> None:
    """Run every static check on a parsed model."""
    limits = limits or Limits()
    if not model.HasField("graph") or (not model.graph.node and not model.graph.output):
        raise InvalidModelError("the file parses but holds no ONNX graph (is it really an .onnx file?)")
    _check_external_data(model)
    _check_counts(model, limits)
    _check_versions(model)
    try:
        onnx.checker.check_model(model, full_check=False)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError, ValueError) as e:
        raise InvalidModelError(f"the ONNX checker refuses the model: {clean_message(e)}") from e
    _check_finite(model)


def iter_tensors(model: onnx.ModelProto) -> Iterator[tuple[str, onnx.TensorProto]]:
    """Every tensor stored in the model.

    That is initializers, sparse initializers and Constant/attribute tensors, in the main graph, all
    subgraphs and all functions.
    """
    for graph in _all_graphs(model):
        yield from ((t.name, t) for t in graph.initializer)
        for sparse in graph.sparse_initializer:
            yield sparse.values.name, sparse.values
            yield sparse.indices.name, sparse.indices
        for node in graph.node:
            yield from _node_tensors(node)
    for function in model.functions:
        for node in function.node:
            yield from _node_tensors(node)


def _all_graphs(model: onnx.ModelProto) -> Iterator[onnx.GraphProto]:
    yield from _iter_graphs(model.graph)
    for function in model.functions:
        for node in function.node:
            for sub in _subgraphs(node):
                yield from _iter_graphs(sub)


def _iter_graphs(graph: onnx.GraphProto) -> Iterator[onnx.GraphProto]:
    yield graph
    for node in graph.node:
        for sub in _subgraphs(node):
            yield from _iter_graphs(sub)


def _subgraphs(node: onnx.NodeProto) -> Iterator[onnx.GraphProto]:
    for attr in node.attribute:
        if attr.type == onnx.AttributeProto.GRAPH:
            yield attr.g
        elif attr.type == onnx.AttributeProto.GRAPHS:
            yield from attr.graphs


def _node_tensors(node: onnx.NodeProto) -> Iterator[tuple[str, onnx.TensorProto]]:
    label = node.name or node.op_type
    for attr in node.attribute:
        if attr.type == onnx.AttributeProto.TENSOR:
            yield label, attr.t
        elif attr.type == onnx.AttributeProto.TENSORS:
            yield from ((label, t) for t in attr.tensors)
        elif attr.type == onnx.AttributeProto.SPARSE_TENSOR:
            yield label, attr.sparse_tensor.values
            yield label, attr.sparse_tensor.indices
        elif attr.type == onnx.AttributeProto.SPARSE_TENSORS:
            for sparse in attr.sparse_tensors:
                yield label, sparse.values
                yield label, sparse.indices


def _check_external_data(model: onnx.ModelProto) -> None:
    # Refused outright: an external reference is a path chosen by the uploader (CVE-2022-25882,
    # CVE-2024-27318), and a self-contained file is all this service promises to handle.
    for name, tensor in iter_tensors(model):
        if tensor.data_location == onnx.TensorProto.EXTERNAL or len(tensor.external_data) > 0:
            raise InvalidModelError(
                f"tensor {name!r} refers to external data; only self-contained models are accepted "
                "(save the model with all tensors inside the .onnx file)"
            )


def _check_counts(model: onnx.ModelProto, limits: Limits) -> None:
    graphs = list(_all_graphs(model))
    nodes = sum(len(g.node) for g in graphs) + sum(len(f.node) for f in model.functions)
    inits = sum(len(g.initializer) + len(g.sparse_initializer) for g in graphs)
    if nodes > limits.max_nodes:
        raise InvalidModelError(f"the model has {nodes} nodes, more than the limit of {limits.max_nodes}")
    if inits > limits.max_initializers:
        raise InvalidModelError(f"the model has {inits} initializers, more than the limit of {limits.max_initializers}")


def _check_versions(model: onnx.ModelProto) -> None:
    if model.ir_version < 3 or model.ir_version > onnx.IR_VERSION:
        raise InvalidModelError(f"IR version {model.ir_version} is not supported (supported: 3 to {onnx.IR_VERSION})")
    function_domains = {f.domain for f in model.functions}
    for opset in model.opset_import:
        if opset.domain in ("", "ai.onnx"):
            if not 1 <= opset.version <= _MAX_DEFAULT_OPSET:
                raise InvalidModelError(
                    f"ONNX opset {opset.version} is not supported (supported: 1 to {_MAX_DEFAULT_OPSET})"
                )
        elif opset.domain == "ai.onnx.ml" and opset.version > _MAX_ML_OPSET:
            raise InvalidModelError(f"ai.onnx.ml opset {opset.version} is not supported (max {_MAX_ML_OPSET})")
        elif opset.domain not in ALLOWED_DOMAINS and opset.domain not in function_domains:
            raise InvalidModelError(
                f"operator domain {opset.domain!r} is not supported; allowed: "
                + ", ".join(repr(d) for d in sorted(ALLOWED_DOMAINS - {"ai.onnx"}))
            )
    for graph in _all_graphs(model):
        for node in graph.node:
            if node.domain not in ALLOWED_DOMAINS and node.domain not in function_domains:
                raise InvalidModelError(
                    f"node {node.name or node.op_type!r} uses operator domain {node.domain!r}, "
                    "which is not supported (custom operators cannot run here)"
                )


def _check_finite(model: onnx.ModelProto) -> None:
    for name, tensor in iter_tensors(model):
        if tensor.data_type not in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE):
            continue
        try:
            array = numpy_helper.to_array(tensor)
        except (ValueError, TypeError) as e:
            raise InvalidModelError(f"tensor {name!r} cannot be decoded: {clean_message(e)}") from e
        if not np.isfinite(array).all():
            raise InvalidModelError(f"tensor {name!r} holds NaN or infinite values")
