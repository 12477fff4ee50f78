"""The cluster pass asks ONNX Runtime about a miniature of each decoder: the same answer, a small model."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx_ir as ir
import pytest

from onnx_ops.passes import _cluster_folding
from onnx_ops.passes._base import PassContext
from onnx_ops.passes._cluster_folding import folds_alone
from onnx_ops.passes.cluster import ClusterPass
from onnx_ops.plan import ClusterStep

import models


def _clustered(bits: int, codebook: str, tmp_path: Path) -> ClusterPass:
    """The cluster pass, run on a small CNN (4-D Conv weights) and its Gemm/MatMul weights."""
    step = ClusterStep(bits=bits, codebook=codebook, min_elements=64)  # type: ignore[arg-type]
    cluster = ClusterPass(step, PassContext(workdir=tmp_path))
    model = ir.from_proto(models.conv_net(constant_weights=False))
    cluster.precheck(model)
    cluster(model)
    return cluster


def _dequantize_decoder(rows: int) -> list[ir.Node]:
    """A decoder ONNX Runtime keeps (it does not fold DequantizeLinear), of a rows x 64 weight."""
    levels = np.arange(rows * 64, dtype=np.int64).reshape(rows, 64).astype(np.int8)
    value = ir.Value(name="levels", shape=ir.Shape(levels.shape), type=ir.TensorType(ir.DataType.INT8),
                     const_value=ir.tensor(levels, name="levels"))  # fmt: skip
    scale = ir.Value(name="scale", shape=ir.Shape([]), type=ir.TensorType(ir.DataType.FLOAT),
                     const_value=ir.tensor(np.asarray(0.5, np.float32), name="scale"))  # fmt: skip
    node = ir.node("DequantizeLinear", [value, scale], name="w_decode")
    out = node.outputs[0]
    out.name, out.shape, out.type = "w_decode", ir.Shape([rows, 64]), ir.TensorType(ir.DataType.FLOAT)
    return [node]


@pytest.mark.parametrize(("bits", "codebook"), [(2, "layer"), (3, "channel"), (5, "layer"), (6, "channel"),
                                                (7, "channel"), (8, "layer"), (8, "channel")])  # fmt: skip
def test_the_miniature_gets_the_full_decoders_answer(
    bits: int, codebook: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cluster = _clustered(bits, codebook, tmp_path)
    assert cluster.log.summary["folded_at_load"] is True and len(cluster._decoders) >= 2
    decoders = [*cluster._decoders.values(), _dequantize_decoder(32)]
    opsets = {"": 11}
    small = [folds_alone(decoder, opsets, tmp_path) for decoder in decoders]
    with monkeypatch.context() as patch:  # the miniature at full size: the whole decoder, as before
        patch.setattr(_cluster_folding, "_small_shape", lambda shape: shape)
        full = [folds_alone(decoder, opsets, tmp_path) for decoder in decoders]
    assert small == full == [True] * (len(decoders) - 1) + [False]
    assert not list(tmp_path.iterdir())


def test_onnxruntime_gets_small_constants_and_each_structure_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    asked: list[int] = []  # the largest constant of each model handed to ONNX Runtime, bytes
    optimize = _cluster_folding.ort_basic_optimized

    def recording(model: ir.Model, workdir: Path, **options: bool) -> tuple[Path, int]:
        asked.append(max(v.const_value.nbytes for v in model.graph.initializers.values() if v.const_value))
        return optimize(model, workdir, **options)

    monkeypatch.setattr(_cluster_folding, "ort_basic_optimized", recording)
    step = ClusterStep(bits=3, codebook="channel", min_elements=1024)  # type: ignore[arg-type]
    cluster = ClusterPass(step, PassContext(workdir=tmp_path))
    cluster(ir.from_proto(models.mlp((64, 256, 256, 16))))
    largest = max(change.params_before for change in cluster.log.layers) * 4
    assert cluster.log.summary["folded_at_load"] is True and largest == 256 * 256 * 4
    assert len(cluster.log.layers) == 3 and len(asked) == 1  # three decoders of one structure: asked once
    assert 0 < max(asked) <= 2048, asked  # the probe's largest constant, against a 262144-byte weight


def test_a_weight_past_onnxruntimes_folding_limit_is_not_folded(tmp_path: Path) -> None:
    cluster = _clustered(8, "layer", tmp_path)
    decoder = next(iter(cluster._decoders.values()))
    assert folds_alone(decoder, {"": 11}, tmp_path) is True
    decoder[-1].outputs[0].shape = ir.Shape([1 << 16, 1 << 14])  # 4 GiB of float32: ONNX Runtime keeps it
    assert folds_alone(decoder, {"": 11}, tmp_path) is False
