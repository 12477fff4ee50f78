"""The bounding helpers: texts cut to their limit, trees cut under a byte budget with what was cut named."""

from __future__ import annotations

import json

from onnx_ops.bounds import MAX_TEXT_CHARS, bound_within, cut


def test_cut_keeps_both_ends_within_the_limit() -> None:
    name = "/model/" + "x" * 5000 + "/fc1/MatMul"
    short = cut(name, 100)
    assert len(short) == 100
    assert short.startswith("/model/") and short.endswith("/fc1/MatMul") and "…" in short
    assert cut("short", 100) == "short"
    assert len(cut(b"\x01" * 10_000)) == MAX_TEXT_CHARS  # anything, through str()


def test_a_tree_is_cut_under_its_budget_and_keeps_its_fields() -> None:
    layer = {"name": "n" * 3000, "shape": [1, 2, 3, 4], "params": 24}
    tree = {"steps": [{"index": i, "layers": [layer] * 2000} for i in range(16)], "counts": {"Relu": 3}}
    bounded, notes = bound_within(tree, 100_000)
    assert len(json.dumps(bounded, indent=2, ensure_ascii=False).encode()) <= 100_000
    assert set(bounded) == {"steps", "counts"} and bounded["counts"] == {"Relu": 3}
    first = bounded["steps"][0]["layers"][0]
    assert set(first) == set(layer) and first["shape"] == [1, 2, 3, 4] and len(first["name"]) < 3000
    assert any("steps[0].layers: first" in n and "of 2000" in n for n in notes)


def test_a_small_tree_is_left_as_it_is() -> None:
    tree = {"a": ["x" * 100] * 10, "b": 1.5}
    assert bound_within(tree, 1 << 20) == (tree, [])
