"""A clustered weight folded a block of rows at a time: the same file as folded whole, a block's memory."""

from __future__ import annotations

import tracemalloc
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper
from test_decoded import _ort_folded

from onnx_ops import decoded
from onnx_ops.passes._base import PassContext
from onnx_ops.passes.cluster import ClusterPass
from onnx_ops.plan import ClusterStep

# Row widths (12, 50, 18 values) that packed bytes (4 or 8 values each) and the blocks below cut mid-row, and row
# counts (1002, 36, 8) that the blocks' row counts do not divide.
_EMBEDDING, _LINEAR, _CONV = (1002, 12), (36, 50), (8, 2, 3, 3)


def _model(rng: np.random.Generator) -> onnx.ModelProto:
    """An embedding (Gather), a MatMul and a Conv (per-channel codebooks: along the last, last and first axis)."""
    table, linear, kernel = (rng.standard_normal(shape).astype(np.float32) for shape in (_EMBEDDING, _LINEAR, _CONV))
    nodes = [
        helper.make_node("Gather", ["table", "ids"], ["embedded"], name="embed", axis=0),
        helper.make_node("Reshape", ["embedded", "flat"], ["rows"], name="rows"),
        helper.make_node("MatMul", ["rows", "linear"], ["projected"], name="project"),
        helper.make_node("Reshape", ["projected", "image"], ["pixels"], name="pixels"),
        helper.make_node("Conv", ["pixels", "kernel"], ["out"], name="conv"),
    ]
    inits = [
        onnx.numpy_helper.from_array(table, "table"),
        onnx.numpy_helper.from_array(np.asarray([-1, 36], np.int64), "flat"),
        onnx.numpy_helper.from_array(linear, "linear"),
        onnx.numpy_helper.from_array(np.asarray([1, 2, 5, 5], np.int64), "image"),
        onnx.numpy_helper.from_array(kernel, "kernel"),
    ]
    graph = helper.make_graph(
        nodes,
        "decoders",
        [helper.make_tensor_value_info("ids", TensorProto.INT64, [1, 3])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, None)],
        inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _clustered(proto: onnx.ModelProto, step: ClusterStep, folder: Path) -> Path:
    """The model clustered by the cluster pass, written as a job writes it (weights in a data file)."""
    model = ir.from_proto(proto)
    cluster = ClusterPass(step, PassContext(workdir=folder))
    cluster.precheck(model)
    cluster(model)
    assert cluster.log.summary["folded_at_load"] is True
    path = folder / "clustered.onnx"
    ir.save(model, path, external_data="clustered.onnx.data", size_threshold_bytes=1024)
    return path


def _folded(path: Path, folder: Path) -> tuple[bytes, bytes]:
    """The folded model's file and its data file (named alike, in `folder`)."""
    folder.mkdir()
    out = folder / "folded.onnx"
    assert decoded.folded_file(path, out) == out
    return out.read_bytes(), Path(f"{out}.data").read_bytes()


_CASES = [(2, "layer"), (3, "channel"), (4, "layer"), (5, "channel"), (6, "layer"), (7, "channel"), (8, "layer")]


@pytest.mark.parametrize(("bits", "codebook"), [*_CASES, (8, "channel")])
def test_blocks_of_rows_write_the_file_folding_whole_writes(
    bits: int, codebook: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    step = ClusterStep(bits=bits, codebook=codebook, min_elements=64, iterations=3)  # type: ignore[arg-type]
    path = _clustered(_model(np.random.default_rng(bits)), step, tmp_path)
    monkeypatch.setattr(decoded, "_BLOCK", 1 << 40)  # every weight decoded whole, at once
    whole = _folded(path, tmp_path / "whole")
    for block in (70, 333):  # 5 and 27 rows of the embedding, 1 and 6 of the MatMul's weight, 3 and all of the Conv's
        monkeypatch.setattr(decoded, "_BLOCK", block)
        assert _folded(path, tmp_path / f"blocks{block}") == whole
    # And the weights are those ONNX Runtime's own folding computes.
    folded = onnx.load(tmp_path / "blocks70" / "folded.onnx")
    assert not {node.op_type for node in folded.graph.node} & {"BitShift", "Cast"}
    theirs = _ort_folded(path, tmp_path)
    weights = {t.name: onnx.numpy_helper.to_array(t, str(tmp_path / "blocks70")) for t in folded.graph.initializer}
    clustered = [name for name in weights if name.endswith("_clustered")]
    assert len(clustered) == 3
    for name in clustered:
        np.testing.assert_array_equal(weights[name], theirs[name])


def test_folding_a_weight_holds_a_block_of_it_not_the_whole(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Before: each decoder node computed whole in turn, the weight's int32 indices (4 bytes a value) beside its
    # float values (4 more) and the bytes unpacked from the stored ones.
    step = ClusterStep(bits=6, min_elements=64, iterations=1, op_types=["Gather"])
    proto = _model(np.random.default_rng(0))
    table = np.random.default_rng(1).standard_normal((2048, 500)).astype(np.float32)  # 1M values
    proto.graph.initializer[0].CopyFrom(onnx.numpy_helper.from_array(table, "table"))
    path = _clustered(proto, step, tmp_path)
    block = 1 << 14  # 32 rows of 500 values
    monkeypatch.setattr(decoded, "_BLOCK", block, raising=False)
    tracemalloc.start()
    try:
        folded = decoded.folded_file(path, tmp_path / "folded.onnx")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert folded is not None
    weights = {t.name: t for t in onnx.load(folded, load_external_data=False).graph.initializer}
    assert list(weights["table_clustered"].dims) == [2048, 500]
    # About 5 blocks of float32 values at the peak (0.34 MB); decoded whole, 6x the weight (24.6 MB).
    assert peak <= 16 * block * 4, f"{peak} bytes allocated at the peak, the weight is {table.nbytes}"
