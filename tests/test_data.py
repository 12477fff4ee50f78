"""Data files are checked against the model's inputs, and shapes are resolved or refused clearly."""

from __future__ import annotations

import zipfile

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnx_ops import compress
from onnx_ops.data import input_specs, load_dataset, resolve_shapes, synthesize
from onnx_ops.errors import DataError, PassFailedError, PlanError

import models
from helpers import run

MB = 1 << 20
FAST = {"latency_runs": 2, "warmup_runs": 1, "max_samples": 4}


@pytest.fixture
def specs():
    return input_specs(models.mlp())


def _npz(tmp_path, **arrays):
    path = tmp_path / "data.npz"
    np.savez(path, **arrays)
    return path


def test_batch_dimension_defaults_to_one(specs):
    assert resolve_shapes(specs, {}) == {"x": [1, 64]}


def test_symbolic_non_batch_dimension_needs_a_shape():
    specs = input_specs(models.lstm())
    with pytest.raises(PlanError, match="symbolic dimension 'T' at axis 0|symbolic dimension 'N' at axis 1"):
        resolve_shapes(specs, {})
    assert resolve_shapes(specs, {"x": [5, 1, 16]}) == {"x": [5, 1, 16]}


def test_symbolic_dimensions_take_the_data_shape():
    specs = input_specs(_image_model())
    rows = load_dataset({"x": np.zeros((4, 3, 48, 192), np.float32)}, specs, role="evaluation", max_bytes=MB)
    batches = load_dataset({"x": np.zeros((2, 5, 3, 24, 32), np.float32)}, specs, role="calibration", max_bytes=MB)
    assert resolve_shapes(specs, {}, [rows]) == {"x": [1, 3, 48, 192]}
    assert resolve_shapes(specs, {}, [batches, rows]) == {"x": [5, 3, 24, 32]}  # the first data set given wins
    assert resolve_shapes(specs, {"x": [2, 3, 8, 8]}, [rows]) == {"x": [2, 3, 8, 8]}  # a given shape wins


def test_missing_shape_names_the_input_and_the_cli_flag():
    with pytest.raises(PlanError) as error:
        resolve_shapes(input_specs(_image_model()), {})
    message = error.value.message
    assert "input 'x' has a symbolic dimension 'h' at axis 2" in message
    assert "--input-shape x=1,3,16,16" in message and '"input_shapes": {"x": [1, 3, 16, 16]}' in message


def test_long_input_names_are_cut_in_messages():
    model = models.linear()
    model.graph.input[0].name = "x" * 100_000
    model.graph.node[0].input[0] = model.graph.input[0].name
    model.graph.input[0].type.tensor_type.shape.dim[1].dim_param = "features"
    with pytest.raises(PlanError) as error:
        resolve_shapes(input_specs(model), {})
    assert len(error.value.message) < 600
    with pytest.raises(DataError) as refused:
        load_dataset({"y" * 100_000: np.ones((2, 64))}, input_specs(model), role="evaluation", max_bytes=MB)
    assert len(refused.value.message) < 800


def test_given_shape_must_fit_fixed_dimensions(specs):
    with pytest.raises(PlanError, match="fixes it to 64"):
        resolve_shapes(specs, {"x": [1, 63]})
    with pytest.raises(PlanError, match="model's inputs are"):
        resolve_shapes(specs, {"y": [1, 64]})


def test_rows_become_batch_of_one(tmp_path, specs):
    data = load_dataset(_npz(tmp_path, x=np.ones((10, 64))), specs, role="calibration", max_bytes=MB)
    assert len(data.feeds) == 10 and data.feeds[0]["x"].shape == (1, 64) and data.feeds[0]["x"].dtype == np.float32


def test_whole_batches_per_sample(tmp_path, specs):
    x = np.ones((3, 8, 64), np.float32)
    labels = np.zeros((3, 8), np.int64)
    data = load_dataset(_npz(tmp_path, x=x, labels=labels), specs, role="evaluation", max_bytes=MB)
    assert len(data.feeds) == 3 and data.feeds[0]["x"].shape == (8, 64) and data.labels.shape == (3, 8)


@pytest.mark.parametrize(
    ("arrays", "message"),
    [
        ({"wrong": np.ones((2, 64), np.float32)}, r"missing \['x'\].*unexpected \['wrong'\].*x: float32"),
        ({"x": np.ones((2, 63), np.float32)}, "axis 1 of each sample is 63, the model expects 64"),
        ({"x": np.ones((2,), np.float32)}, "expected"),
        ({"x": np.ones((2, 64), np.int64)}, "dtype int64, the model expects float32"),
        ({"x": np.full((2, 64), np.nan, np.float32)}, "NaN"),
        ({"x": np.ones((0, 64), np.float32)}, "zero samples"),
    ],
)
def test_bad_data_is_refused(tmp_path, specs, arrays, message):
    with pytest.raises(DataError, match=message):
        load_dataset(_npz(tmp_path, **arrays), specs, role="calibration", max_bytes=MB)


def test_bad_labels_are_refused(tmp_path, specs):
    path = _npz(tmp_path, x=np.ones((4, 64), np.float32), labels=np.ones(3))
    with pytest.raises(DataError, match="labels must be integer classes"):
        load_dataset(path, specs, role="evaluation", max_bytes=MB)


def test_pickled_objects_are_refused(tmp_path, specs):
    path = tmp_path / "data.npz"
    np.savez(path, x=np.array([{"a": 1}, None], dtype=object))
    with pytest.raises(DataError, match="pickles are refused"):
        load_dataset(path, specs, role="calibration", max_bytes=MB)


def test_zip_bomb_is_refused_before_decompression(tmp_path, specs):
    path = tmp_path / "bomb.npz"
    big = np.zeros((20_000, 64), np.float32)  # 5 MB of zeros, a few KB compressed
    np.savez_compressed(path, x=big)
    assert path.stat().st_size < 100_000
    with pytest.raises(DataError, match="more than 1048576 bytes"):
        load_dataset(path, specs, role="calibration", max_bytes=MB)


@pytest.mark.parametrize("content", [b"", b"not a zip at all", b"PK\x03\x04broken"])
def test_non_npz_files_are_refused(tmp_path, specs, content):
    path = tmp_path / "data.npz"
    path.write_bytes(content)
    with pytest.raises(DataError, match="not a valid .npz"):
        load_dataset(path, specs, role="calibration", max_bytes=MB)


def test_non_npy_member_is_refused(tmp_path, specs):
    path = tmp_path / "data.npz"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("x.txt", "hello")
    with pytest.raises(DataError, match="not a .npy array"):
        load_dataset(path, specs, role="calibration", max_bytes=MB)


def _member_flags(path, *, flag: int = 0, method: int | None = None) -> None:
    """Rewrite the flag bits and compression method of the first member in both zip headers."""
    data = bytearray(path.read_bytes())
    for signature, flags_at in ((b"PK\x03\x04", 6), (b"PK\x01\x02", 8)):
        at = data.index(signature) + flags_at
        data[at] |= flag
        if method is not None:
            data[at + 2 : at + 4] = method.to_bytes(2, "little")
    path.write_bytes(bytes(data))


@pytest.mark.parametrize(
    ("flag", "method", "message"),
    [
        (1, None, "member 'x.npy' is encrypted"),
        (0, 99, "member 'x.npy' uses zip compression method 99"),
        (0, zipfile.ZIP_BZIP2, "method 12; only stored and deflated"),
    ],
)
def test_encrypted_or_unknown_compression_member_is_invalid_data(tmp_path, specs, flag, method, message):
    path = _npz(tmp_path, x=np.ones((2, 64), np.float32))
    _member_flags(path, flag=flag, method=method)
    with pytest.raises(DataError, match=message):
        load_dataset(path, specs, role="calibration", max_bytes=MB)


def test_corrupt_deflate_stream_is_invalid_data(tmp_path, specs):
    path = tmp_path / "data.npz"
    np.savez_compressed(path, x=np.random.default_rng(0).standard_normal((64, 64)).astype(np.float32))
    data = bytearray(path.read_bytes())
    data[len(data) // 2 : len(data) // 2 + 64] = b"\xff" * 64  # inside the deflated array
    path.write_bytes(bytes(data))
    with pytest.raises(DataError, match="not a valid .npz|cannot be read"):
        load_dataset(path, specs, role="calibration", max_bytes=MB)


def test_mapping_source_is_accepted(specs):
    data = load_dataset({"x": np.ones((2, 64), np.float32)}, specs, role="evaluation", max_bytes=MB)
    assert len(data.feeds) == 2 and data.labels is None


def test_synthesized_inputs_are_seeded_and_capped(specs):
    a = synthesize(specs, {"x": [1, 64]}, 2, seed=3, max_elements=1000)
    b = synthesize(specs, {"x": [1, 64]}, 2, seed=3, max_elements=1000)
    assert np.array_equal(a[1]["x"], b[1]["x"])
    with pytest.raises(PlanError, match="more than the limit"):
        synthesize(specs, {"x": [1, 64]}, 1, seed=0, max_elements=10)


def _image_model() -> onnx.ModelProto:
    """Conv -> Relu -> GlobalAveragePool -> Flatten -> MatMul on an image input declared [-1, 3, 'h', 'w']."""
    rng = np.random.default_rng(0)
    nodes = [
        helper.make_node("Conv", ["x", "Wc"], ["c"], pads=[1, 1, 1, 1], name="conv"),
        helper.make_node("Relu", ["c"], ["r"], name="relu"),
        helper.make_node("GlobalAveragePool", ["r"], ["p"], name="pool"),
        helper.make_node("Flatten", ["p"], ["f"], name="flatten"),
        helper.make_node("MatMul", ["f", "Wm"], ["y"], name="fc"),
    ]
    graph = helper.make_graph(
        nodes,
        "symbolic_image",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [-1, 3, "h", "w"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [-1, 10])],
        [
            numpy_helper.from_array(rng.standard_normal((16, 3, 3, 3)).astype(np.float32) / 5, "Wc"),
            numpy_helper.from_array(rng.standard_normal((16, 10)).astype(np.float32) / 4, "Wm"),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    return model


@pytest.mark.parametrize("mode", ["dynamic", "static"])
def test_symbolic_spatial_dimensions_compress_with_data_and_no_shape_given(tmp_path, mode):
    model = _image_model()
    x = np.random.default_rng(1).standard_normal((6, 3, 48, 192)).astype(np.float32)
    path = _npz(tmp_path, x=x)
    plan = {"steps": [{"kind": "quantize", "mode": mode}], "evaluation": FAST}
    result = compress(model, plan, calibration=path, evaluation=path)
    assert result.report.data.input_shapes == {"x": [1, 3, 48, 192]}
    assert result.report.steps[0].layers, "nothing was quantized"
    got, want = run(result.model, {"x": x[:2]}), run(model, {"x": x[:2]})
    cosine = float(np.dot(got[0].ravel(), want[0].ravel()) / np.linalg.norm(got[0]) / np.linalg.norm(want[0]))
    assert got[0].shape == (2, 10) and cosine > 0.99


def test_symbolic_spatial_dimensions_without_data_ask_for_the_shape():
    plan = {"steps": [{"kind": "quantize", "mode": "dynamic"}], "evaluation": FAST}
    with pytest.raises(PlanError, match="--input-shape x=1,3,16,16"):
        compress(_image_model(), plan)
    result = compress(_image_model(), plan | {"input_shapes": {"x": [1, 3, 24, 40]}})
    assert result.report.data.input_shapes == {"x": [1, 3, 24, 40]}


def _masked_encoder() -> onnx.ModelProto:
    """Token embeddings, a MatMul and BERT's additive attention bias ``(1 - mask) * finfo.min`` before Softmax.

    Token type ids index a table of two rows, as in BERT.
    """
    rng = np.random.default_rng(2)
    ints = [
        helper.make_tensor_value_info(name, TensorProto.INT64, ["batch", "seq"])
        for name in ("input_ids", "attention_mask", "token_type_ids")
    ]
    inits = [
        numpy_helper.from_array(rng.standard_normal((1000, 16)).astype(np.float32), "words"),
        numpy_helper.from_array(rng.standard_normal((2, 16)).astype(np.float32), "types"),
        numpy_helper.from_array(rng.standard_normal((16, 16)).astype(np.float32), "w"),
        numpy_helper.from_array(np.array(1.0, np.float32), "one"),
        numpy_helper.from_array(np.array(np.finfo(np.float32).min, np.float32), "lowest"),
    ]
    nodes = [
        helper.make_node("Gather", ["words", "input_ids"], ["e"]),
        helper.make_node("Gather", ["types", "token_type_ids"], ["t"]),
        helper.make_node("Add", ["e", "t"], ["h"]),
        helper.make_node("MatMul", ["h", "w"], ["y"]),
        helper.make_node("ReduceMean", ["y"], ["score"], axes=[-1], keepdims=0),
        helper.make_node("Cast", ["attention_mask"], ["m"], to=TensorProto.FLOAT),
        helper.make_node("Sub", ["one", "m"], ["off"]),
        helper.make_node("Mul", ["off", "lowest"], ["bias"]),
        helper.make_node("Add", ["score", "bias"], ["masked"]),
        helper.make_node("Softmax", ["masked"], ["p"], axis=-1),
    ]
    out = helper.make_tensor_value_info("p", TensorProto.FLOAT, ["batch", "seq"])
    graph = helper.make_graph(nodes, "masked", ints, [out], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_synthesized_masks_and_token_types_keep_a_transformer_finite():
    """Random ids in [0, 100) as a mask overflowed (1 - mask) * finfo.min: the float model's outputs were NaN."""
    model = _masked_encoder()
    shapes = {name: [2, 12] for name in ("input_ids", "attention_mask", "token_type_ids")}
    feeds = synthesize(input_specs(model), shapes, 4, seed=0, max_elements=1000)
    for feed in feeds:
        mask = feed["attention_mask"]
        assert set(np.unique(mask)) <= {0, 1} and mask[:, 0].all()  # a padding mask: a prefix of ones per row
        assert not feed["token_type_ids"].any() and feed["input_ids"].max() > 1
        assert np.isfinite(run(model, feed)[0]).all()
    plan = {"steps": [{"kind": "quantize", "mode": "dynamic"}], "evaluation": FAST, "input_shapes": shapes}
    result = compress(model, plan)  # no data: the default plan measures on synthesized inputs
    assert result.report.data.source == "synthetic" and result.report.steps[0].layers


def test_inputs_the_original_model_cannot_take_are_named_as_such(tmp_path):
    """A mask of 5 overflows the float model itself: the error says so instead of blaming the compression."""
    ids = np.arange(24).reshape(2, 12)
    path = _npz(tmp_path, input_ids=ids, attention_mask=np.full((2, 12), 5), token_type_ids=np.zeros((2, 12), int))
    plan = {"steps": [{"kind": "quantize", "mode": "dynamic"}], "evaluation": FAST}
    with pytest.raises(PassFailedError, match="original model's output 'p' already holds NaN"):
        compress(_masked_encoder(), plan, evaluation=path)
