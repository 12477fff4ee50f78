"""auto's search space: int8 with 4-bit embedding tables, and plain k-means when the best plan prunes."""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from onnx_ops import auto_sensitivity as sens
from onnx_ops import compress
from onnx_ops.auto_formats import FormatSearch
from onnx_ops.auto_quantize import embedding_share, four_bit_embeddings, repairable
from onnx_ops.auto_ranking import Ranking
from onnx_ops.plan import AutoStep, DistillStep, PruneStep, QuantizeStep, Step
from onnx_ops.report import AutoCandidate
from tests import models

FAST = {"latency_runs": 3, "latency_seconds": 0.0, "warmup_runs": 1}


def test_four_bit_embeddings_only_where_the_step_quantizes_gather() -> None:
    assert four_bit_embeddings(QuantizeStep()) == QuantizeStep(embedding_bits=4)
    assert four_bit_embeddings(QuantizeStep(op_types=["MatMul", "Gather"])) is not None
    assert four_bit_embeddings(QuantizeStep(op_types=["MatMul"])) is None
    assert four_bit_embeddings(QuantizeStep(exclude_op_types=["Gather"])) is None
    assert four_bit_embeddings(QuantizeStep(embedding_bits=4)) is None


def test_embedding_share_counts_the_gather_tables() -> None:
    encoder = sens.prepared(models.tiny_encoder())  # 512 x 64 table, 4 + 2 64-wide MatMuls, a pooler
    assert 0.3 < embedding_share(encoder) < 0.5
    assert embedding_share(sens.prepared(models.mlp())) == 0.0


def _embedding_net(vocab: int = 512, hidden: int = 64) -> onnx.ModelProto:
    """Token ids -> embedding Gather -> MatMul: the table holds 8/9 of the weights, as in a small encoder."""
    rng = np.random.default_rng(0)
    weights = [
        numpy_helper.from_array(rng.standard_normal((vocab, hidden)).astype(np.float32), "embed"),
        numpy_helper.from_array((rng.standard_normal((hidden, hidden)) / 8).astype(np.float32), "W"),
    ]
    nodes = [
        helper.make_node("Gather", ["embed", "input_ids"], ["emb"], name="embeddings"),
        helper.make_node("MatMul", ["emb", "W"], ["out"], name="dense"),
    ]
    graph = helper.make_graph(
        nodes,
        "embedding_net",
        [helper.make_tensor_value_info("input_ids", TensorProto.INT64, [1, 8])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, [1, 8, hidden])],
        weights,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_auto_tries_int8_with_four_bit_embeddings_on_an_encoder() -> None:
    model = _embedding_net()
    ids = np.random.default_rng(0).integers(0, 512, (6, 1, 8)).astype(np.int64)
    step = {"kind": "auto", "families": ["quantize"], "goal": "smallest", "allow_slower": True, "max_candidates": 5}
    auto = compress(model, {"steps": [step], "evaluation": FAST}, evaluation={"input_ids": ids}).report.auto
    assert auto is not None
    four = [c for c in auto.candidates if c.steps[-1].get("embedding_bits") == 4]
    assert len(four) == 1 and four[0].label.endswith(", 4-bit embeddings") and four[0].status == "measured", four
    eight = next(c for c in auto.candidates if c.label == four[0].label.removesuffix(", 4-bit embeddings"))
    assert (four[0].size_bytes or 0) < 0.7 * (eight.size_bytes or 0)  # the table holds 8/9 of the weights


class _Recorder:
    """Candidates whose budget verdict is given by label (a stand-in for the measurement, to test the order)."""

    def __init__(self, meets: set[str]) -> None:
        self.meets, self.labels = meets, list[str]()

    def __call__(self, label: str, steps: list[Step]) -> AutoCandidate:
        self.labels.append(label)
        fields: dict[str, Any] = {"status": "measured", "meets_budget": label in self.meets}
        return AutoCandidate(index=len(self.labels) - 1, label=label, steps=[], seconds=0, **fields)


def _pruned_best() -> AutoCandidate:
    steps = [PruneStep(sparsity=0.5), DistillStep(), QuantizeStep()]
    dumped = [s.model_dump(mode="json") for s in steps]
    return AutoCandidate(index=0, label="best", steps=dumped, seconds=0, status="measured", meets_budget=True)


def _cluster_labels(
    meets: set[str], goal: str = "balanced", sizes: tuple[int, ...] = (64, 128, 128, 10), pruned: bool = True
) -> list[str]:
    attempt = _Recorder(meets)
    step = AutoStep(goal=goal, families=["cluster"])  # type: ignore[arg-type]
    model = sens.prepared(models.mlp(sizes))
    FormatSearch(step, model, True, attempt, _pruned_best if pruned else lambda: None, lambda: False).run()
    return attempt.labels


def test_plain_kmeans_is_tried_when_the_pruned_one_misses_or_needs_more_bits() -> None:
    after = " after prune + distill"
    pruned = [f"k-means {b} bits{after}" for b in (4, 6, 8)]
    assert _cluster_labels(set()) == [*pruned, "k-means 4 bits", "k-means 6 bits", "k-means 8 bits"]
    # The pruned plan fits at 6 bits: plain k-means can only be smaller below that.
    assert _cluster_labels({pruned[1], "k-means 4 bits"}) == [*pruned[:2], "k-means 4 bits"]
    # The pruned plan fits at 4 bits: plain k-means at 4 stores as many indices; only smallest goes to 3.
    assert _cluster_labels({pruned[0]}) == [pruned[0]]
    smallest = _cluster_labels({pruned[0]}, goal="smallest")
    assert smallest == [pruned[0], f"k-means 3 bits{after}", "k-means 3 bits"]


def test_channel_codebooks_are_tried_where_they_cost_less_than_two_more_bits() -> None:
    # 1024 x 256 and 256 x 16 weights: 272 channels of 16 centroids and an offset, 18 kB < 2 bits of 266k values.
    wide = _cluster_labels(set(), sizes=(1024, 256, 16), pruned=False)
    assert wide == ["k-means 4 bits", "k-means 4 bits per channel", "k-means 6 bits", "k-means 8 bits"]
    met = _cluster_labels({"k-means 4 bits per channel"}, sizes=(1024, 256, 16), pruned=False)
    assert met == ["k-means 4 bits", "k-means 4 bits per channel"]
    # 64 x 128 and 128 x 128: 128-value channels, where 16 centroids a channel cost more than 2 bits a value.
    assert "k-means 4 bits per channel" not in _cluster_labels(set(), pruned=False)


def test_four_bit_embedding_misses_are_not_repaired_by_leaving_int8_layers_in_float() -> None:
    def miss(index: int, cosine: float, bits: int) -> AutoCandidate:
        step = QuantizeStep(embedding_bits=bits).model_dump(mode="json")  # type: ignore[arg-type]
        return AutoCandidate(
            index=index, label=f"{bits}", steps=[step], seconds=0, status="measured", cosine=cosine, size_ratio=0.2
        )

    ranking = Ranking(AutoStep(min_cosine=0.99), [miss(0, 0.987, 4), miss(1, 0.95, 8)])
    assert [c.index for c in ranking.promising()] == [0, 1]
    assert [c.index for c in ranking.promising(repairable)] == [1]
