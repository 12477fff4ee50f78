"""A graph cut down to the nodes some tensors depend on: a capture Session's copy that outputs only them."""

from __future__ import annotations

import onnx

__all__ = ["keep_ancestors"]


def keep_ancestors(graph: onnx.GraphProto, wanted: list[str]) -> None:
    """Make the wanted tensors the graph's only outputs and drop every node they do not depend on."""
    needed = set(wanted)
    kept = []
    for node in reversed(graph.node):
        if needed.intersection(node.output):
            kept.append(node)
            needed.update(_node_inputs(node))
    del graph.output[:]
    kept.reverse()
    del graph.node[:]
    graph.node.extend(kept)


def _node_inputs(node: onnx.NodeProto) -> set[str]:
    """A node's inputs, with every name its subgraphs (If, Loop, Scan) read from the enclosing scope."""
    names = set(node.input)
    for attribute in node.attribute:
        for sub in [attribute.g] if attribute.HasField("g") else list(attribute.graphs):
            for inner in sub.node:
                names |= _node_inputs(inner)
    return names
