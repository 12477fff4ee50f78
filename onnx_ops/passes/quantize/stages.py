"""Sequential stages of a QDQ model's weight layers: each layer comes after every layer it reads through any path.

Recovery that fits a layer to the teacher from the student's own inputs needs those inputs final: every
weight layer upstream already recovered. Layers that do not depend on one another (parallel branches, the
heads of a detector) share a stage and one capture run.
"""

from __future__ import annotations

import onnx

from onnx_ops.passes.quantize.qdq import QdqLayer

__all__: list[str] = []  # package-private


def stages(graph: onnx.GraphProto, layers: list[QdqLayer]) -> list[list[QdqLayer]]:
    """The layers grouped by their depth in weight layers (1 + the deepest weight layer they read), in order.

    The graph's nodes must be in topological order (ONNX requires it).
    """
    by_node = {layer.node: layer for layer in layers}
    depth: dict[str, int] = {}  # tensor -> the deepest stage among the weight layers it depends on
    stage: dict[str, int] = {}
    for node in graph.node:
        level = max((depth.get(name, 0) for name in node.input if name), default=0)
        if node.name in by_node:
            level += 1
            stage[node.name] = level
        for name in node.output:
            depth[name] = level
    found: dict[int, list[QdqLayer]] = {}
    for layer in layers:
        found.setdefault(stage.get(layer.node, 1), []).append(layer)
    return [found[level] for level in sorted(found)]


def last_layers(graph: onnx.GraphProto, layers: list[QdqLayer]) -> set[str]:
    """The layers (node names) whose outputs reach no other weight layer: a network's output heads."""
    names = {layer.node for layer in layers}
    feeds_a_layer: set[str] = set()  # tensors some weight layer reads, through any path
    last = set()
    for node in reversed(graph.node):
        downstream = any(name in feeds_a_layer for name in node.output)
        if node.name in names and not downstream:
            last.add(node.name)
        if downstream or node.name in names:
            feeds_a_layer.update(name for name in node.input if name)
    return last
