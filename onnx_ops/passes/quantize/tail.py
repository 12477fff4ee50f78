"""The output tail of a static int8 model: nodes after the last layer with weights, left in float.

In a static QDQ model ONNX Runtime quantizes every supported node, also the ones between the last Conv or
MatMul and the model's outputs (a detector's Sigmoid, Concat, Reshape and Transpose). Quantizing them buys
no speed: no integer kernel follows, and the float ops are as fast as their QDQ forms. But it rounds the
outputs themselves, and a Concat takes one scale for all its inputs: on ddddocr's captcha detector (YOLOX
rows of box offsets, objectness and class scores) the objectness, below 0.03 on the calibration images,
shared a scale of 0.009 with the box offsets, and the graph output got a last QuantizeLinear of its own.
A node is in the tail when no node with a constant weight is reachable from its outputs.
"""

from __future__ import annotations

import collections

import onnx

__all__: list[str] = []  # package-private

# Layers whose quantization is the point of static int8 (their int8 kernels are what makes it fast).
_WEIGHT_LAYERS = frozenset({"Conv", "ConvTranspose", "MatMul", "Gemm"})


def output_tail(graph: onnx.GraphProto) -> list[str]:
    """Names of the nodes from whose outputs no weight layer can be reached, in graph order."""
    constants = {init.name for init in graph.initializer} | {
        out for node in graph.node if node.op_type == "Constant" for out in node.output
    }
    producer = {out: node for node in graph.node for out in node.output}
    weighted = [n for n in graph.node if n.op_type in _WEIGHT_LAYERS and any(i in constants for i in n.input[1:])]
    if not weighted:
        return []  # nothing int8 to protect the outputs from: not this rule's business
    upstream: set[int] = set()  # ids of the nodes that feed some weight layer, directly or not
    queue = collections.deque(weighted)
    while queue:
        node = queue.popleft()
        for name in node.input:
            source = producer.get(name)
            if source is not None and id(source) not in upstream:
                upstream.add(id(source))
                queue.append(source)
    is_weighted = {id(n) for n in weighted}
    return [
        n.name
        for n in graph.node
        if n.name and id(n) not in upstream and id(n) not in is_weighted and n.op_type != "Constant"
    ]
