"""Model validation refuses bad models with a message naming the problem."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnx_ops.errors import InvalidModelError
from onnx_ops.validate import Limits, clean_message, load_model

import models


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


def test_nan_weight_is_refused(tmp_path):
    model = models.linear()
    w = numpy_helper.to_array(model.graph.initializer[0]).copy()
    w[0, 0] = np.nan
    model.graph.initializer[0].CopyFrom(numpy_helper.from_array(w, "W"))
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
