"""The corpus of hostile and careless inputs, generated in code: each case builds a request and states its outcome.

A case is refused at upload (`Refused`: HTTP status and error code), accepted and then failed by its job
(`Fails`: the job's error code), or accepted and run to success (`Succeeds`: careless but valid input).
Kinds: "http" (sizes, multipart, file names, tokens, hosts), "model" (model content), "data" (calibration
and evaluation files).
"""

from __future__ import annotations

import dataclasses
import gzip
import io
import json
import stat
import tarfile
import zipfile
from collections.abc import Callable, Iterator

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

import bundle_archives
import models

BOUNDARY = "hostile-boundary-5e2a"
TOKEN = "s3cret-token-for-the-hostile-corpus"
MB = 1 << 20

PRUNE = {"kind": "prune", "method": "unstructured", "sparsity": 0.5, "min_elements": 0}
# latency_seconds 0: time just latency_runs pairs (by default timing goes on for up to 10 s until the interval
# narrows, which on a loaded host it rarely does: 10 s of CPU per job). No test here reads the latency figures.
FAST = {"latency_runs": 2, "warmup_runs": 1, "synthetic_samples": 2, "latency_seconds": 0.0}


def plan(*steps: dict[str, object], **extra: object) -> str:
    """A quick plan as the form field's JSON text (prune by default)."""
    return json.dumps({"steps": list(steps or [PRUNE]), "evaluation": FAST} | extra)


@dataclasses.dataclass(frozen=True)
class Refused:
    """Refused at upload with this status and error code (None: the answer is not the JSON error shape)."""

    status: int
    code: str | None


@dataclasses.dataclass(frozen=True)
class Fails:
    """Accepted (202), then the job fails with one of these codes; `words` must appear in its message."""

    codes: tuple[str, ...]
    words: str = ""


@dataclasses.dataclass(frozen=True)
class Succeeds:
    """Accepted and run to success; `model_name` is what the job record must show, when given."""

    model_name: str | None = None


@dataclasses.dataclass(frozen=True)
class Request:
    """One HTTP request: body bytes (or chunks, sent without Content-Length) and headers."""

    body: bytes | list[bytes]
    headers: dict[str, str | bytes]
    method: str = "POST"
    path: str = "/api/jobs"


@dataclasses.dataclass(frozen=True)
class Case:
    """A named hostile input: `build()` makes the request; `protected`: sent to the token-protected app;
    `runs_forever`: sent to the app whose jobs have a deadline of a few seconds (the job can only end there)."""

    name: str
    kind: str
    build: Callable[[], Request]
    expected: Refused | Fails | Succeeds
    protected: bool = False
    xfail: str | None = None
    runs_forever: bool = False


Part = tuple[bytes, bytes | None, bytes]  # field name, file name (None: a text field), content


def body(parts: list[Part], boundary: str = BOUNDARY, end: bytes | None = None) -> bytes:
    """A multipart body from raw parts (names and file names as bytes, so they can be anything)."""
    out = bytearray()
    for name, filename, content in parts:
        disposition = b'form-data; name="' + name + b'"'
        if filename is not None:
            disposition += b'; filename="' + filename + b'"'
        out += f"--{boundary}\r\n".encode() + b"Content-Disposition: " + disposition + b"\r\n\r\n" + content + b"\r\n"
    out += f"--{boundary}--\r\n".encode() if end is None else end
    return bytes(out)


def multipart_headers(boundary: str = BOUNDARY, **extra: str) -> dict[str, str | bytes]:
    """Content-Type of a multipart form with this boundary, plus extra headers."""
    return {"Content-Type": f"multipart/form-data; boundary={boundary}"} | extra


def form(
    model: bytes | None,
    plan_text: str | None = None,
    *,
    model_name: bytes = b"net.onnx",
    calibration: bytes | None = None,
    evaluation: bytes | None = None,
    headers: dict[str, str] | None = None,
) -> Request:
    """A job upload request (parts that are None are left out)."""
    parts: list[Part] = [(b"plan", None, (plan_text if plan_text is not None else plan()).encode())]
    if model is not None:
        parts.append((b"model", model_name, model))
    if calibration is not None:
        parts.append((b"calibration", b"calib.npz", calibration))
    if evaluation is not None:
        parts.append((b"evaluation", b"eval.npz", evaluation))
    return Request(body(parts), multipart_headers(**(headers or {})))


def mlp() -> bytes:
    """The valid model of the corpus: input x [N, 64] float, 10 logits."""
    return models.mlp().SerializeToString()


def valid_request() -> Request:
    """A valid job: the MLP, pruned."""
    return form(mlp())


# ---------------------------------------------------------------- models


def _model(
    nodes: list[onnx.NodeProto],
    inputs: list[onnx.ValueInfoProto],
    outputs: list[onnx.ValueInfoProto],
    inits: list[onnx.TensorProto] = (),  # type: ignore[assignment]
    *,
    opsets: dict[str, int] | None = None,
    ir_version: int = 8,
    functions: list[onnx.FunctionProto] = (),  # type: ignore[assignment]
    sparse: list[onnx.SparseTensorProto] = (),  # type: ignore[assignment]
) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "hostile", inputs, outputs, list(inits), sparse_initializer=list(sparse))
    imports = [helper.make_opsetid(d, v) for d, v in (opsets or {"": 17}).items()]
    model = helper.make_model(graph, opset_imports=imports, functions=list(functions))
    model.ir_version = ir_version
    return model


def _x(shape: list[int | str] | None = None, dtype: int = TensorProto.FLOAT) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info("x", dtype, shape or ["N", 64])


def _y(shape: list[int | str] | None = None, dtype: int = TensorProto.FLOAT) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info("y", dtype, shape or ["N", 64])


def _w(name: str = "W", value: float | None = None, shape: tuple[int, ...] = (64, 64)) -> onnx.TensorProto:
    array = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    if value is not None:
        array.flat[7] = value
    return numpy_helper.from_array(array, name)


def linear(w: onnx.TensorProto | None = None, **kwargs: object) -> onnx.ModelProto:
    """y = x @ W, W 64x64: a model whose only flaw is what the caller changes."""
    node = helper.make_node("MatMul", ["x", "W"], ["y"], name="mm")
    return _model([node], [_x()], [_y(["N", 64])], [w or _w()], **kwargs)  # type: ignore[arg-type]


def _external(tensor: onnx.TensorProto, location: str) -> onnx.TensorProto:
    tensor.ClearField("raw_data")
    tensor.ClearField("float_data")
    tensor.data_location = TensorProto.EXTERNAL
    for key, value in (("location", location), ("offset", "0"), ("length", "16384")):
        entry = tensor.external_data.add()
        entry.key, entry.value = key, value
    return tensor


def ext_initializer(location: str) -> bytes:
    """W stored outside the file, at `location`."""
    return linear(_external(_w(), location)).SerializeToString()


def ext_initializer_location_only() -> bytes:
    """external_data entries on a tensor that still says data_location DEFAULT."""
    w = _w()
    entry = w.external_data.add()
    entry.key, entry.value = "location", "weights.bin"
    return linear(w).SerializeToString()


def ext_initializer_no_entries() -> bytes:
    """data_location EXTERNAL without any entries."""
    w = _w()
    w.ClearField("raw_data")
    w.data_location = TensorProto.EXTERNAL
    return linear(w).SerializeToString()


def ext_constant_attr() -> bytes:
    """A Constant node whose value tensor is external."""
    const = helper.make_node("Constant", [], ["W"], name="const", value=_external(_w("value"), "../../etc/passwd"))
    mm = helper.make_node("MatMul", ["x", "W"], ["y"], name="mm")
    return _model([const, mm], [_x()], [_y(["N", 64])]).SerializeToString()


def _if_model(branch_init: onnx.TensorProto) -> onnx.ModelProto:
    then_graph = helper.make_graph(
        [helper.make_node("Identity", ["Wt"], ["t_out"])],
        "then",
        [],
        [helper.make_tensor_value_info("t_out", TensorProto.FLOAT, [64, 64])],
        [branch_init],
    )
    else_graph = helper.make_graph(
        [helper.make_node("Identity", ["We"], ["e_out"])],
        "else",
        [],
        [helper.make_tensor_value_info("e_out", TensorProto.FLOAT, [64, 64])],
        [_w("We")],
    )
    nodes = [
        helper.make_node("If", ["cond"], ["W"], name="if", then_branch=then_graph, else_branch=else_graph),
        helper.make_node("MatMul", ["x", "W"], ["y"], name="mm"),
    ]
    cond = numpy_helper.from_array(np.array(True), "cond")
    return _model(nodes, [_x()], [_y(["N", 64])], [cond])


def ext_subgraph_initializer() -> bytes:
    """An initializer inside an If branch is external."""
    return _if_model(_external(_w("Wt"), "/etc/passwd")).SerializeToString()


def nan_subgraph_initializer() -> bytes:
    """An initializer inside an If branch holds NaN."""
    return _if_model(_w("Wt", value=float("nan"))).SerializeToString()


def ext_sparse_initializer() -> bytes:
    """A sparse initializer whose values are external."""
    values = _external(numpy_helper.from_array(np.ones(4, np.float32), "S"), "sentinel.txt")
    indices = numpy_helper.from_array(np.array([0, 65, 130, 4095], np.int64), "S_idx")
    sparse = helper.make_sparse_tensor(values, indices, [64, 64])
    node = helper.make_node("MatMul", ["x", "S"], ["y"], name="mm")
    return _model([node], [_x()], [_y(["N", 64])], sparse=[sparse]).SerializeToString()


def _weights_function_model(const: onnx.NodeProto, defaults: list[onnx.AttributeProto] = ()) -> bytes:  # type: ignore[assignment]
    """The linear model with its MatMul in a local function whose weight comes from this Constant node."""
    fn = helper.make_function(
        "local.fn",
        "Weights",
        ["a"],
        ["b"],
        [const, helper.make_node("MatMul", ["a", "w"], ["b"])],
        [helper.make_opsetid("", 17)],
    )
    fn.attribute_proto.extend(defaults)
    node = helper.make_node("Weights", ["x"], ["y"], name="call", domain="local.fn")
    return _model([node], [_x()], [_y(["N", 64])], opsets={"": 17, "local.fn": 1}, functions=[fn]).SerializeToString()


def ext_function_node() -> bytes:
    """A local function whose Constant node's tensor is external."""
    return _weights_function_model(
        helper.make_node("Constant", [], ["w"], value=_external(_w("value"), "../data/queue.db"))
    )


def ext_function_attribute_default() -> bytes:
    """A local function's attribute default (attribute_proto) is an external tensor read through ref_attr_name."""
    const = helper.make_node("Constant", [], ["w"])
    const.attribute.add(name="value", ref_attr_name="weights", type=onnx.AttributeProto.TENSOR)
    return _weights_function_model(const, [helper.make_attribute("weights", _external(_w("weights"), "job.json"))])


def ext_training_info() -> bytes:
    """The linear model, plus training info whose initialization graph holds an external initializer."""
    model = linear()
    info = model.training_info.add()
    info.initialization.name = "init"
    info.initialization.initializer.append(_external(_w("step"), "../queue.db"))
    return model.SerializeToString()


def inf_identity_model() -> bytes:
    """MatMul -> Max(h, -inf) -> MatMul: a legitimate -inf constant (the identity of Max), as in published models."""
    nodes = [
        helper.make_node("MatMul", ["x", "W"], ["h"], name="mm"),
        helper.make_node("Max", ["h", "floor"], ["m"], name="max"),
        helper.make_node("MatMul", ["m", "W2"], ["y"], name="mm2"),
    ]
    floor = numpy_helper.from_array(np.array(-np.inf, np.float32), "floor")
    return _model(nodes, [_x()], [_y(["N", 64])], [_w(), floor, _w("W2")]).SerializeToString()


def unused_domain_import() -> bytes:
    """The linear model importing an operator domain that no node uses (paddle2onnx writes 'Paddle')."""
    return linear(opsets={"": 17, "Paddle": 1}).SerializeToString()


def ext_loop_body_constant() -> bytes:
    """A Constant inside a Loop body refers to external data (a subgraph's node attribute)."""
    body_graph = helper.make_graph(
        [
            helper.make_node("Constant", [], ["k"], value=_external(_w("value"), "/proc/self/environ")),
            helper.make_node("Identity", ["cond_in"], ["cond_out"]),
            helper.make_node("MatMul", ["v_in", "k"], ["v_out"]),
        ],
        "body",
        [
            helper.make_tensor_value_info("i", TensorProto.INT64, []),
            helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
            helper.make_tensor_value_info("v_in", TensorProto.FLOAT, ["N", 64]),
        ],
        [
            helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
            helper.make_tensor_value_info("v_out", TensorProto.FLOAT, ["N", 64]),
        ],
    )
    return _loop_model(body_graph, trip=2).SerializeToString()


def _loop_model(body_graph: onnx.GraphProto, trip: int) -> onnx.ModelProto:
    inits = [
        numpy_helper.from_array(np.array(trip, np.int64), "trip"),
        numpy_helper.from_array(np.array(True), "cond"),
    ]
    node = helper.make_node("Loop", ["trip", "cond", "x"], ["y"], name="loop", body=body_graph)
    return _model([node], [_x()], [_y(["N", 64])], inits)


def _then_matmul(nodes: list[onnx.NodeProto], inits: list[onnx.TensorProto]) -> bytes:
    """The bomb's nodes write h [N, 64]; y = h @ W gives the plan a weight to prune, so the job gets to run it."""
    nodes = [*nodes, helper.make_node("MatMul", ["h", "W"], ["y"], name="mm")]
    return _model(nodes, [_x()], [_y()], [*inits, _w()]).SerializeToString()


def cpu_bomb() -> bytes:
    """A Loop with a trip count of 2**62 around a Tanh: runs until the deadline."""
    body_graph = helper.make_graph(
        [
            helper.make_node("Identity", ["cond_in"], ["cond_out"]),
            helper.make_node("Tanh", ["v_in"], ["v_out"]),
        ],
        "body",
        [
            helper.make_tensor_value_info("i", TensorProto.INT64, []),
            helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
            helper.make_tensor_value_info("v_in", TensorProto.FLOAT, ["N", 64]),
        ],
        [
            helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
            helper.make_tensor_value_info("v_out", TensorProto.FLOAT, ["N", 64]),
        ],
    )
    inits = [
        numpy_helper.from_array(np.array(1 << 62, np.int64), "trip"),
        numpy_helper.from_array(np.array(True), "cond"),
    ]
    return _then_matmul([helper.make_node("Loop", ["trip", "cond", "x"], ["h"], name="loop", body=body_graph)], inits)


def memory_bomb() -> bytes:
    """ConstantOfShape [N * 65536, 65536] floats (16 GB for one sample), shaped from the input so nothing folds it."""
    nodes = [
        helper.make_node("Shape", ["x"], ["xs"], name="shape"),
        helper.make_node("Mul", ["xs", "factor"], ["big_shape"], name="scale"),
        helper.make_node("ConstantOfShape", ["big_shape"], ["big"], name="alloc"),
        helper.make_node("ReduceSum", ["big"], ["s"], name="sum", keepdims=0),
        helper.make_node("Add", ["x", "s"], ["h"], name="add"),
    ]
    return _then_matmul(nodes, [numpy_helper.from_array(np.array([65536, 1024], np.int64), "factor")])


def expand_bomb() -> bytes:
    """Expand x [N, 64, 1] to [N, 64, 2**24]: 4 GB per sample."""
    nodes = [
        helper.make_node("Unsqueeze", ["x", "axis"], ["x3"], name="unsq"),
        helper.make_node("Expand", ["x3", "shape"], ["big"], name="expand"),
        helper.make_node("ReduceSum", ["big", "axis"], ["h"], name="sum", keepdims=0),
    ]
    inits = [
        numpy_helper.from_array(np.array([2], np.int64), "axis"),
        numpy_helper.from_array(np.array([1, 64, 1 << 24], np.int64), "shape"),
    ]
    return _then_matmul(nodes, inits)


def relu_model(shape: list[int | str], dtype: int = TensorProto.FLOAT) -> bytes:
    """y = Relu(x) @ W with the declared input shape and type (its last axis must be 64)."""
    nodes = [
        helper.make_node("Relu", ["x"], ["h"], name="relu"),
        helper.make_node("MatMul", ["h", "W"], ["y"], name="mm"),
    ]
    out = [*shape[:-1], 64]
    return _model(nodes, [_x(shape, dtype)], [_y(out, dtype)], [_w()]).SerializeToString()


def custom_domain_op() -> bytes:
    """A node in a custom operator domain."""
    node = helper.make_node("Exploit", ["x"], ["y"], name="evil", domain="com.evil")
    return _model([node], [_x()], [_y()], opsets={"": 17, "com.evil": 1}).SerializeToString()


def unknown_microsoft_op() -> bytes:
    """An op that does not exist in the allowed com.microsoft domain."""
    node = helper.make_node("NoSuchKernel", ["x"], ["y"], name="nope", domain="com.microsoft")
    return _model([node], [_x()], [_y()], opsets={"": 17, "com.microsoft": 1}).SerializeToString()


def no_kernel_for_type() -> bytes:
    """A valid ONNX op in a type combination ONNX Runtime has no CPU kernel for (Sin on int32)."""
    nodes = [helper.make_node("Sin", ["x"], ["y"], name="sin")]
    return _model(nodes, [_x(None, TensorProto.INT32)], [_y(None, TensorProto.INT32)]).SerializeToString()


def version_model(ir_version: int = 8, opsets: dict[str, int] | None = None) -> bytes:
    """The linear model with the given IR version and opset imports."""
    return linear(ir_version=ir_version, opsets=opsets).SerializeToString()


def cycle() -> bytes:
    """Two nodes that feed each other."""
    nodes = [
        helper.make_node("Add", ["x", "b"], ["a"], name="first"),
        helper.make_node("Relu", ["a"], ["b"], name="second"),
        helper.make_node("Identity", ["a"], ["y"], name="out"),
    ]
    return _model(nodes, [_x()], [_y()]).SerializeToString()


def type_mismatch() -> bytes:
    """An int64 input multiplied with a float weight."""
    node = helper.make_node("MatMul", ["x", "W"], ["y"], name="mm")
    return _model([node], [_x(None, TensorProto.INT64)], [_y()], [_w()]).SerializeToString()


def duplicate_output_names() -> bytes:
    """Two nodes write the same tensor name."""
    nodes = [
        helper.make_node("Relu", ["x"], ["y"], name="a"),
        helper.make_node("Sigmoid", ["x"], ["y"], name="b"),
    ]
    return _model(nodes, [_x()], [_y()]).SerializeToString()


def undefined_input() -> bytes:
    """A node reads a tensor nobody produces."""
    nodes = [helper.make_node("Add", ["x", "ghost"], ["y"], name="add")]
    return _model(nodes, [_x()], [_y()]).SerializeToString()


def raw_data_shorter_than_dims() -> bytes:
    """A float initializer declaring 2**40 elements with 16 bytes of data."""
    w = TensorProto(name="W", data_type=TensorProto.FLOAT, dims=[1 << 20, 1 << 20], raw_data=b"\0" * 16)
    return linear(w).SerializeToString()


def nan_constant_attr() -> bytes:
    """A Constant node's float16 value holds NaN."""
    value = numpy_helper.from_array(np.array([1.0, np.nan], np.float16), "value")
    nodes = [
        helper.make_node("Constant", [], ["c"], name="const", value=value),
        helper.make_node("Cast", ["c"], ["c32"], name="cast", to=TensorProto.FLOAT),
        helper.make_node("ReduceSum", ["c32"], ["s"], name="sum", keepdims=0),
        helper.make_node("Add", ["x", "s"], ["y"], name="add"),
    ]
    return _model(nodes, [_x()], [_y()]).SerializeToString()


def _field(number: int, payload: bytes | int) -> bytes:
    """One protobuf field: a varint, or length-delimited bytes."""

    def varint(value: int) -> bytes:
        out = bytearray()
        while True:
            out.append((value & 0x7F) | (0x80 if value > 0x7F else 0))
            value >>= 7
            if not value:
                return bytes(out)

    if isinstance(payload, int):
        return varint(number << 3) + varint(payload)
    return varint(number << 3 | 2) + varint(len(payload)) + payload


def nested_ifs(depth: int) -> bytes:
    """If inside If inside If ... `depth` levels, written as raw protobuf (too deep for protobuf to build)."""
    graph = _field(1, _field(2, b"y") + _field(4, b"Identity") + _field(1, b"x"))
    for _ in range(depth):
        attribute = _field(1, b"then_branch") + _field(20, onnx.AttributeProto.GRAPH) + _field(6, graph)
        node = _field(1, b"cond") + _field(2, b"y") + _field(4, b"If") + _field(5, attribute)
        graph = _field(1, node) + _field(2, b"g")
    return _field(1, 8) + _field(7, graph) + _field(8, _field(2, 17))


def recursive_function() -> bytes:
    """A local function that calls itself."""
    fn = helper.make_function(
        "local.rec",
        "Again",
        ["a"],
        ["b"],
        [helper.make_node("Again", ["a"], ["b"], domain="local.rec")],
        [helper.make_opsetid("", 17), helper.make_opsetid("local.rec", 1)],
    )
    node = helper.make_node("Again", ["x"], ["y"], name="call", domain="local.rec")
    return _model([node], [_x()], [_y()], opsets={"": 17, "local.rec": 1}, functions=[fn]).SerializeToString()


def sequence_input() -> bytes:
    """The graph input is a sequence of tensors, not a tensor."""
    seq = helper.make_tensor_sequence_value_info("x", TensorProto.FLOAT, ["N", 64])
    node = helper.make_node("SequenceAt", ["x", "zero"], ["y"], name="at")
    zero = numpy_helper.from_array(np.array(0, np.int64), "zero")
    return _model([node], [seq], [_y()], [zero]).SerializeToString()


def empty_graph() -> bytes:
    """A ModelProto with a graph that has no node and no output."""
    return _model([], [], []).SerializeToString()


def zip_of(name: str, data: bytes, method: int = zipfile.ZIP_DEFLATED) -> bytes:
    """A zip archive with one member."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", method) as archive:
        archive.writestr(name, data)
    return buffer.getvalue()


# ---------------------------------------------------------------- data files


def npz(compress: bool = False, **arrays: np.ndarray) -> bytes:
    """An .npz file's bytes."""
    buffer = io.BytesIO()
    (np.savez_compressed if compress else np.savez)(buffer, **arrays)  # type: ignore[arg-type]
    return buffer.getvalue()


def x_data(samples: int = 8, dtype: str = "float32", features: int = 64) -> np.ndarray:
    """Samples for the MLP's input x."""
    return np.random.default_rng(2).standard_normal((samples, features)).astype(dtype)


def npy_bytes(array: np.ndarray, allow_pickle: bool = False) -> bytes:
    """One .npy file's bytes."""
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=allow_pickle)
    return buffer.getvalue()


def npz_members(members: dict[str, bytes], method: int = zipfile.ZIP_STORED) -> bytes:
    """An .npz built member by member (so members can be anything)."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", method) as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    return buffer.getvalue()


def npz_flags(data: bytes, *, flag: int = 0, method: int | None = None) -> bytes:
    """An .npz whose first member has these general purpose flag bits and compression method, in both headers."""
    out = bytearray(data)
    for signature, flags_at in ((b"PK\x03\x04", 6), (b"PK\x01\x02", 8)):
        at = out.index(signature) + flags_at
        out[at] |= flag
        if method is not None:
            out[at + 2 : at + 4] = method.to_bytes(2, "little")
    return bytes(out)


def npy_header_declaring(shape: tuple[int, ...], dtype: str = "<f4") -> bytes:
    """A .npy header declaring `shape` followed by only 64 bytes of data."""
    header = {"descr": dtype, "fortran_order": False, "shape": shape}
    buffer = io.BytesIO()
    np.lib.format.write_array_header_1_0(buffer, header)
    return buffer.getvalue() + b"\0" * 64


def npy_with_header(header: str) -> bytes:
    """A version 1.0 .npy whose header is this text (padded as numpy pads it), then 256 zero bytes."""
    raw = header.encode("latin-1")
    raw += b" " * (63 - (10 + len(raw)) % 64) + b"\n"
    return b"\x93NUMPY\x01\x00" + len(raw).to_bytes(2, "little") + raw + b"\0" * 256


def pickled_object_array() -> bytes:
    """x as an object array (a pickle inside the .npy)."""
    array = np.empty(8, dtype=object)
    array[:] = [{"boom": i} for i in range(8)]
    return npz_members({"x.npy": npy_bytes(array, allow_pickle=True)})


def zip_bomb(megabytes: int = 64) -> bytes:
    """x declared and really stored as `megabytes` MB of zeros, deflated to a few hundred KB."""
    rows = (megabytes * MB) // (64 * 4)
    return npz(compress=True, x=np.zeros((rows, 64), np.float32))


def eval_case(evaluation: Callable[[], bytes]) -> Callable[[], Request]:
    """A pruning job of the MLP with this evaluation file."""
    return lambda: form(mlp(), evaluation=evaluation())


def calib_case(calibration: Callable[[], bytes]) -> Callable[[], Request]:
    """A static quantization job of the MLP with this calibration file."""
    return lambda: form(mlp(), plan({"kind": "quantize", "mode": "static"}), calibration=calibration())


# ---------------------------------------------------------------- HTTP layer


def chunked(data: bytes, size: int = 64 * 1024) -> list[bytes]:
    """The body in chunks: sent with Transfer-Encoding: chunked, no Content-Length."""
    return [data[i : i + size] for i in range(0, len(data), size)]


def over_cap_model(chunks: bool) -> Request:
    """A 2 MB + 1 byte model, over the 2 MB cap."""
    request = form(b"\0" * (2 * MB + 1))
    return dataclasses.replace(request, body=chunked(request.body)) if chunks else request  # type: ignore[arg-type]


def parts_request(parts: list[Part], **kwargs: object) -> Callable[[], Request]:
    """A request with these raw parts."""
    return lambda: Request(body(parts, **kwargs), multipart_headers())  # type: ignore[arg-type]


def with_headers(headers: dict[str, str]) -> Callable[[], Request]:
    """A valid job sent with these extra headers."""
    return lambda: form(mlp(), headers=headers)


def _model_parts() -> list[Part]:
    return [(b"plan", None, plan().encode()), (b"model", b"net.onnx", mlp())]


def _http_cases() -> Iterator[Case]:
    invalid = Refused(422, "invalid_request")
    malformed = Refused(400, "malformed_upload")
    yield Case(
        "model over the cap with Content-Length",
        "http",
        lambda: over_cap_model(False),
        Refused(413, "upload_too_large"),
    )
    yield Case(
        "model over the cap, chunked without Content-Length",
        "http",
        lambda: over_cap_model(True),
        Refused(413, "upload_too_large"),
    )
    yield Case(
        "calibration over the data cap",
        "http",
        lambda: form(mlp(), calibration=b"\0" * (MB + 1)),
        Refused(413, "upload_too_large"),
    )
    yield Case(
        "plan field over 64 KB",
        "http",
        lambda: form(mlp(), " " * (65 * 1024) + plan()),
        Refused(413, "upload_too_large"),
    )
    yield Case(
        "multipart content type without a boundary",
        "http",
        lambda: Request(body(_model_parts()), {"Content-Type": "multipart/form-data"}),
        Refused(415, "unsupported_media_type"),
    )
    yield Case(
        "body boundary differs from the declared one",
        "http",
        lambda: Request(body(_model_parts(), boundary="other-boundary"), multipart_headers()),
        malformed,
    )
    yield Case("body without the final boundary", "http", parts_request(_model_parts(), end=b""), malformed)
    yield Case(
        "part with headers and no body",
        "http",
        lambda: Request(
            f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="model"; filename="a.onnx"\r\n'.encode(),
            multipart_headers(),
        ),
        Refused(422, "invalid_plan"),
    )
    yield Case(
        "1000 parts",
        "http",
        parts_request([(b"plan", None, b"{}")] * 1000),
        Refused(422, "invalid_request"),
    )
    yield Case(
        "model part sent twice",
        "http",
        parts_request([*_model_parts(), (b"model", b"second.onnx", mlp())]),
        invalid,
    )
    yield Case(
        "plan field sent as a file part",
        "http",
        parts_request([(b"plan", b"plan.json", plan().encode()), (b"model", b"net.onnx", mlp())]),
        Succeeds(),
    )
    yield Case(
        "field named like a path",
        "http",
        parts_request([*_model_parts(), (b"../../etc/cron.d/x", b"x", b"* * * * * root true")]),
        invalid,
    )
    yield Case(
        "field name in invalid UTF-8",
        "http",
        parts_request([*_model_parts(), (b"mod\xffel", b"x.onnx", b"abc")]),
        invalid,
    )
    yield Case(
        "part without Content-Disposition",
        "http",
        lambda: Request(
            f"--{BOUNDARY}\r\nContent-Type: text/plain\r\n\r\nhello\r\n--{BOUNDARY}--\r\n".encode(),
            multipart_headers(),
        ),
        invalid,
    )
    yield Case(
        "plan bytes that are not UTF-8",
        "http",
        parts_request([(b"plan", None, b'{"steps": [\xff\xfe]}'), (b"model", b"net.onnx", mlp())]),
        invalid,
    )
    yield Case("plan that is not JSON", "http", lambda: form(mlp(), "steps: prune"), Refused(422, "invalid_plan"))
    yield Case("plan that is a JSON array", "http", lambda: form(mlp(), "[1, 2, 3]"), Refused(422, "invalid_plan"))
    yield Case(
        "plan nested 30000 levels deep",
        "http",
        lambda: form(mlp(), "[" * 30000 + "]" * 30000),
        Refused(422, "invalid_plan"),
    )
    yield Case(
        "plan with a huge number",
        "http",
        lambda: form(mlp(), '{"steps": [{"kind": "svd", "rank": ' + "9" * 5000 + "}]}"),
        Refused(422, "invalid_plan"),
    )
    yield Case("only the closing boundary", "http", parts_request([]), Refused(422, "invalid_plan"))
    yield Case("empty body", "http", lambda: Request(b"", multipart_headers()), Refused(422, "invalid_plan"))
    yield Case(
        "file name with ../ traversal", "http", lambda: form(mlp(), model_name=b"../../x.onnx"), Succeeds("x.onnx")
    )
    yield Case(
        "file name that is an absolute path", "http", lambda: form(mlp(), model_name=b"/etc/passwd"), Succeeds("passwd")
    )
    yield Case(
        "file name with a Windows path",
        "http",
        lambda: form(mlp(), model_name=b"..\\..\\win.onnx"),
        Succeeds("win.onnx"),
    )
    yield Case("file name with a NUL byte", "http", lambda: form(mlp(), model_name=b"a\x00b.onnx"), Succeeds("ab.onnx"))
    yield Case(
        "file name in invalid UTF-8",
        "http",
        lambda: form(mlp(), model_name=b"m\xff\xfe.onnx"),
        Succeeds("m\ufffd\ufffd.onnx"),
    )
    yield Case(
        "file name 1000 characters long",
        "http",
        lambda: form(mlp(), model_name=b"n" * 1000 + b".onnx"),
        Succeeds("n" * 200),
    )
    yield Case(
        "file name 10000 characters long", "http", lambda: form(mlp(), model_name=b"n" * 10000 + b".onnx"), malformed
    )
    yield Case(
        "file name with CRLF header injection",
        "http",
        lambda: form(mlp(), model_name=b"a.onnx\r\nX-Evil: 1"),
        Succeeds(),
    )
    yield Case("file name of only dots", "http", lambda: form(mlp(), model_name=b".."), Succeeds())
    yield Case("no token", "http", valid_request, Refused(401, "unauthorized"), protected=True)
    yield Case(
        "wrong token",
        "http",
        with_headers({"Authorization": "Bearer wrong"}),
        Refused(401, "unauthorized"),
        protected=True,
    )
    yield Case(
        "token with a suffix",
        "http",
        with_headers({"Authorization": f"Bearer {TOKEN}x"}),
        Refused(401, "unauthorized"),
        protected=True,
    )
    yield Case(
        "token as Basic auth",
        "http",
        with_headers({"Authorization": f"Basic {TOKEN}"}),
        Refused(401, "unauthorized"),
        protected=True,
    )
    yield Case(
        "empty Bearer token",
        "http",
        with_headers({"Authorization": "Bearer "}),
        Refused(401, "unauthorized"),
        protected=True,
    )
    yield Case(
        "token of non-ASCII garbage",
        "http",
        lambda: dataclasses.replace(
            valid_request(), headers=multipart_headers() | {"Authorization": b"Bearer \xe9\xff" * 500}
        ),
        Refused(401, "unauthorized"),
        protected=True,
    )
    yield Case(
        "right token, lowercase scheme",
        "http",
        with_headers({"Authorization": f"bearer {TOKEN}"}),
        Succeeds(),
        protected=True,
    )
    yield Case("Host not on the allow-list", "http", with_headers({"Host": "evil.example"}), Refused(400, "bad_host"))
    yield Case(
        "Host allowed name as a suffix",
        "http",
        with_headers({"Host": "testserver.evil.example"}),
        Refused(400, "bad_host"),
    )
    yield Case(
        "Host with userinfo", "http", with_headers({"Host": "testserver@evil.example"}), Refused(400, "bad_host")
    )
    yield Case("empty Host", "http", with_headers({"Host": ""}), Refused(400, "bad_host"))
    yield Case("Host allowed name with a port", "http", with_headers({"Host": "testserver:8000"}), Succeeds())
    yield Case(
        "PUT on the jobs collection",
        "http",
        lambda: dataclasses.replace(valid_request(), method="PUT"),
        Refused(405, "method_not_allowed"),
    )


def _model_cases() -> Iterator[Case]:
    bad = ("invalid_model",)

    def case(
        name: str, build: Callable[[], bytes], codes: tuple[str, ...] = bad, words: str = "", **kw: object
    ) -> Case:
        return Case(name, "model", lambda: form(build()), Fails(codes, words), **kw)  # type: ignore[arg-type]

    ext = "external data"
    yield case("random bytes", lambda: np.random.default_rng(5).bytes(4096), words="ONNX")
    yield case("truncated model", lambda: mlp()[: len(mlp()) // 2], words="does not parse")
    yield case("text file renamed .onnx", lambda: b"this is a README, not a model\n" * 20)
    yield case("JSON file", lambda: json.dumps({"graph": {"node": []}}).encode())
    yield Case("zip of a model (a bundle)", "model", lambda: form(zip_of("model.onnx", mlp())), Succeeds())
    yield case("gzip of a model", lambda: gzip.compress(mlp()))
    yield case("parses but has no graph", empty_graph, words="no ONNX graph")
    yield case("external initializer at ../../etc/passwd", lambda: ext_initializer("../../etc/passwd"), words=ext)
    yield case("external initializer at an absolute path", lambda: ext_initializer("/etc/passwd"), words=ext)
    yield case(
        "external initializer naming the sentinel in the cwd", lambda: ext_initializer("sentinel.txt"), words=ext
    )
    yield case("external initializer naming a symlink", lambda: ext_initializer("link-to-root/etc/shadow"), words=ext)
    yield case("external initializer naming the job's own input", lambda: ext_initializer("input.onnx"), words=ext)
    yield case("external_data entries with data_location DEFAULT", ext_initializer_location_only, words=ext)
    yield case("data_location EXTERNAL without entries", ext_initializer_no_entries, words=ext)
    yield case("external Constant attribute", ext_constant_attr, words=ext)
    yield case("external initializer in an If branch", ext_subgraph_initializer, words=ext)
    yield case("external Constant in a Loop body", ext_loop_body_constant, words=ext)
    yield case("external sparse initializer", lambda: ext_sparse_initializer(), words=ext)
    yield case("external Constant in a local function", ext_function_node, words=ext)
    yield case("external tensor as a local function's attribute default", ext_function_attribute_default, words=ext)
    yield case("external initializer in training info", ext_training_info, words=ext)
    yield Case(
        "-inf constant as the identity of Max (legitimate)", "model", lambda: form(inf_identity_model()), Succeeds()
    )
    yield Case("unused foreign domain import (legitimate)", "model", lambda: form(unused_domain_import()), Succeeds())
    yield case("custom operator domain", custom_domain_op, words="domain")
    yield case("unknown com.microsoft op", unknown_microsoft_op, words="ONNX Runtime cannot load")
    yield case("op without an ONNX Runtime kernel for its type", no_kernel_for_type, words="ONNX Runtime cannot load")
    yield case("opset 99", lambda: version_model(opsets={"": 99}), words="opset 99")
    yield case("opset 0", lambda: version_model(opsets={"": 0}))
    yield case("ai.onnx.ml opset 99", lambda: version_model(opsets={"": 17, "ai.onnx.ml": 99}))
    yield case("IR version 99", lambda: version_model(ir_version=99), words="IR version 99")
    yield case("IR version 2", lambda: version_model(ir_version=2), words="IR version 2")
    yield case("IR version missing", lambda: version_model(ir_version=0))
    yield case("cycle in the graph", cycle, words="topologically sorted")
    yield case("int input to a float MatMul", type_mismatch, words="ONNX Runtime cannot load")
    yield case("two nodes write one tensor", duplicate_output_names, words="SSA")
    yield case("node reads an undefined tensor", undefined_input, words="ghost")
    yield case("NaN weight", lambda: linear(_w(value=float("nan"))).SerializeToString(), words="NaN")
    yield case(
        "Inf inside the only weight the plan would change",
        lambda: linear(_w(value=float("inf"))).SerializeToString(),
        ("invalid_plan",),
        "'W' holds infinite values",
    )
    yield case("NaN in a float16 Constant", nan_constant_attr, words="NaN")
    yield case("NaN in an If branch initializer", nan_subgraph_initializer, words="NaN")
    yield case("initializer declaring 2**40 elements with 16 bytes", raw_data_shorter_than_dims, words="too small")
    yield case("If nested 200 levels deep", lambda: nested_ifs(200), words="does not parse")
    yield case("local function that calls itself", recursive_function, words="recursive")
    yield case("input declared [1, 1000000, 64]", lambda: relu_model([1, 1_000_000, 64]), ("invalid_plan",), "elements")
    yield case("input declared [1, 2**62, 64]", lambda: relu_model([1, 1 << 62, 64]), ("invalid_plan",), "elements")
    yield case("input with a negative dimension", lambda: relu_model([1, -5, 64]), ("invalid_plan",), "input_shapes")
    yield case(
        "symbolic non-batch dimension, no input_shapes",
        lambda: relu_model(["N", "S", 64]),
        ("invalid_plan",),
        "input_shapes",
    )
    yield case("string input", lambda: relu_model(["N", 64], TensorProto.STRING), words="tensor(string)")
    yield case("sequence input", sequence_input, ("invalid_plan",), "not a tensor")
    yield case("ConstantOfShape allocating 4 GB", memory_bomb, ("out_of_memory", "crashed"))
    yield case("Expand allocating 4 GB per sample", expand_bomb, ("out_of_memory", "crashed"))
    yield case("Loop with 2**62 iterations", cpu_bomb, ("timeout",), runs_forever=True)


def _data_cases() -> Iterator[Case]:
    data = Fails(("invalid_data",))

    def case(
        name: str, file: Callable[[], bytes], expected: Fails | Succeeds = data, calibration: bool = False
    ) -> Case:
        return Case(name, "data", (calib_case if calibration else eval_case)(file), expected)

    yield case("wrong input name", lambda: npz(input=x_data()), Fails(("invalid_data",), "expects x"))
    yield case("wrong feature count", lambda: npz(x=x_data(features=32)), Fails(("invalid_data",), "expects 64"))
    yield case("wrong rank", lambda: npz(x=np.ones(8, np.float32)))
    yield case("strings instead of floats", lambda: npz(x=np.array(["a"] * 8)), Fails(("invalid_data",), "dtype"))
    yield case(
        "integers instead of floats", lambda: npz(x=np.ones((8, 64), np.int32)), Fails(("invalid_data",), "dtype")
    )
    yield case("complex numbers", lambda: npz(x=np.ones((8, 64), np.complex64)))
    yield case("booleans", lambda: npz(x=np.ones((8, 64), bool)))
    yield case("pickled object array", pickled_object_array, Fails(("invalid_data",), "pickle"))
    yield case("zip bomb: 64 MB of zeros deflated", zip_bomb, Fails(("invalid_data",), "bytes in memory"))
    yield case(
        "header declaring 2**40 floats",
        lambda: npz_members({"x.npy": npy_header_declaring((1 << 20, 1 << 20))}, zipfile.ZIP_DEFLATED),
        Fails(("invalid_data",), "bytes in memory"),
    )
    yield case(
        "header declaring more data than stored",
        lambda: npz_members({"x.npy": npy_header_declaring((64, 64))}),
        Fails(("invalid_data",), "cannot be read safely"),
    )
    yield case("corrupt .npy header", lambda: npz_members({"x.npy": b"\x93NUMPY\x01\x00\x10\x00{'descr': <f4 oops"}))
    yield case(
        "header with a negative dimension",
        lambda: npz_members(
            {"x.npy": npy_with_header("{'descr': '<f4', 'fortran_order': False, 'shape': (-5, 64), }")}
        ),
    )
    yield case(
        "header with shape nested 5000 levels",
        lambda: npz_members(
            {
                "x.npy": npy_with_header(
                    "{'descr': '<f4', 'fortran_order': False, 'shape': " + "(" * 5000 + ")" * 5000 + "}"
                )
            }
        ),
    )
    yield case(
        "header with a structured dtype of duplicate fields",
        lambda: npz_members(
            {"x.npy": npy_with_header("{'descr': [('a', '<f4')] * 3, 'fortran_order': False, 'shape': (8, 64)}")}
        ),
    )
    yield case(".npy version 3", lambda: npz_members({"x.npy": b"\x93NUMPY\x03\x00" + b"\0" * 64}))
    yield case("member that is not .npy", lambda: npz_members({"x.npy": npy_bytes(x_data()), "run.sh": b"rm -rf /"}))
    yield case("member named ../../x.npy", lambda: npz_members({"../../x.npy": npy_bytes(x_data())}))
    yield case("NaN values", lambda: npz(x=np.full((8, 64), np.nan, np.float32)), Fails(("invalid_data",), "NaN"))
    yield case("encrypted member", lambda: npz_flags(npz(x=x_data()), flag=1), Fails(("invalid_data",), "encrypted"))
    yield case(
        "member with an unknown compression method",
        lambda: npz_flags(npz(x=x_data()), method=99),
        Fails(("invalid_data",), "compression method 99"),
    )
    yield case(
        "bzip2 member (a method numpy never writes)",
        lambda: npz_flags(npz(x=x_data()), method=zipfile.ZIP_BZIP2),
        Fails(("invalid_data",), "compression method 12"),
    )
    yield case("Inf values", lambda: npz(x=np.full((8, 64), -np.inf, np.float32)), Fails(("invalid_data",), "NaN"))
    yield case("zero samples", lambda: npz(x=np.zeros((0, 64), np.float32)), Fails(("invalid_data",), "zero samples"))
    yield case(
        "labels of the wrong shape",
        lambda: npz(x=x_data(), labels=np.zeros((3, 3), np.int64)),
        Fails(("invalid_data",), "labels"),
    )
    yield case(
        "float labels", lambda: npz(x=x_data(), labels=np.zeros(8, np.float32)), Fails(("invalid_data",), "labels")
    )
    yield case("not a zip", lambda: np.random.default_rng(3).bytes(2048), Fails(("invalid_data",), ".npz"))
    yield case("an .npy instead of an .npz", lambda: npy_bytes(x_data()), Fails(("invalid_data",), ".npz"))
    yield case("zero-byte data file", lambda: b"", Fails(("invalid_data",), ".npz"))
    yield case(
        "extra unexpected array", lambda: npz(x=x_data(), extra=x_data()), Fails(("invalid_data",), "unexpected")
    )
    yield case(
        "2000 tiny members", lambda: npz_members({f"a{i}.npy": npy_bytes(np.zeros(1, np.float32)) for i in range(2000)})
    )
    yield case("calibration: wrong input name", lambda: npz(input=x_data()), calibration=True)
    yield case("calibration: NaN values", lambda: npz(x=np.full((8, 64), np.nan, np.float32)), calibration=True)
    yield case(
        "calibration: labels are not an input", lambda: npz(x=x_data(), labels=np.zeros(8, np.int64)), calibration=True
    )
    yield case("float64 data (careless, cast)", lambda: npz(x=x_data(dtype="float64")), Succeeds())
    yield case("big-endian float32 (careless, cast)", lambda: npz(x=x_data(dtype=">f4")), Succeeds())


def _bundle_cases() -> Iterator[Case]:
    files = bundle_archives.external_mlp()
    model = files["net.onnx"]
    link = {"net.onnx.data": stat.S_IFLNK | 0o777}

    def case(name: str, build: Callable[[], bytes], words: str) -> Case:
        return Case(name, "model", lambda: form(build(), model_name=b"net.zip"), Fails(("invalid_model",), words))

    yield Case(
        "bundle: zip of a model and its external data (legitimate)",
        "model",
        lambda: form(bundle_archives.zip_bundle(files), model_name=b"net.zip"),
        Succeeds(),
    )
    yield Case(
        "bundle: tar of a folder with a model and its external data (legitimate)",
        "model",
        lambda: form(bundle_archives.tar_bundle({f"net/{k}": v for k, v in files.items()}), model_name=b"net.tar"),
        Succeeds(),
    )
    yield case("bundle: member named ../", lambda: bundle_archives.zip_bundle({"../net.onnx": model}), "no '..'")
    yield case(
        "bundle: zip member that is a symlink",
        lambda: bundle_archives.zip_bundle({"net.onnx": model, "net.onnx.data": b"/etc"}, modes=link),
        "is a link",
    )
    yield case(
        "bundle: tar member that is a hard link to the job's record",
        lambda: bundle_archives.tar_bundle({"net.onnx": model}, {"net.onnx.data": (tarfile.LNKTYPE, "../job.json")}),
        "is a link",
    )
    yield case(
        "bundle: zip bomb",
        lambda: bundle_archives.zip_bundle({"net.onnx": model, "zeros.bin": bytes(64 << 20)}),
        "more than 100 times",
    )
    yield case("bundle: duplicate names", lambda: bundle_archives.zip_twice("net.onnx", model), "appears twice")
    yield case(
        "bundle: external data naming the job's record",
        lambda: bundle_archives.zip_bundle({"net.onnx": bundle_archives.with_location(model, "../job.json")}),
        "external data",
    )
    yield case(
        "bundle: external data naming the job's own upload",
        lambda: bundle_archives.zip_bundle({"net.onnx": bundle_archives.with_location(model, "../input.onnx")}),
        "external data",
    )
    yield case(
        "bundle: external data at an absolute path",
        lambda: bundle_archives.zip_bundle(
            {"net.onnx": bundle_archives.with_location(model, "/etc/passwd"), "net.onnx.data": files["net.onnx.data"]}
        ),
        "not a relative name",
    )
    yield case(
        "bundle: tar member with an absolute name",
        lambda: bundle_archives.tar_bundle({"net.onnx": model, "/tmp/net.onnx.data": files["net.onnx.data"]}),
        "not a relative name",
    )
    yield case(
        "bundle: unpacks past the size cap, every member under the ratio check",
        # 1 MiB members of zeros are below the size the ratio is checked from; three of them pass the 2 MB cap
        lambda: bundle_archives.zip_bundle({"net.onnx": model, **{f"z{i}.bin": bytes(1 << 20) for i in range(3)}}),
        "unpacks to more than the limit",
    )
    yield case(
        "bundle: a member larger than the cap on one file",
        # 2.5 MB that deflates to about 1 MB: within the upload cap and the ratio, past the 2 MB per file
        lambda: bundle_archives.zip_bundle(
            {"net.onnx": model, "big.bin": np.random.default_rng(4).bytes(1 << 20) + bytes(3 << 19)}
        ),
        "per file",
    )


def cases() -> list[Case]:
    """The whole corpus."""
    return [*_http_cases(), *_model_cases(), *_bundle_cases(), *_data_cases()]
