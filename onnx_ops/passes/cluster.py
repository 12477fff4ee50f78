"""K-means weight clustering: each chosen weight becomes a codebook of 2^bits floats and bits-bit indices.

Each constant float32 weight of the chosen MatMul, Gemm, Conv and Gather (embedding) nodes is clustered on its own
(one-dimensional k-means, see _kmeans.py): its values are replaced by the nearest of at most 2^bits centroids (with
``codebook: channel``, each output channel has its own centroids, see _channel_codebook.py). When
at least 1% of its values are exact zeros (a pruned weight) and ``keep_zero`` is set, 0 is one of the centroids and
never moves, so zeros stay zeros.

Storage, so that ONNX Runtime decodes each weight once, when it loads the model (its constant folding runs these
nodes, all of whose inputs are constants, and keeps the float result as the layer's weight, so the layer runs as
fast as before), with standard operators only:

* 8 bits: the indices as a uint8 tensor of the weight's shape -> Cast(int32) -> Gather(codebook); per-channel
  codebooks add each channel's offset into the flat table of codebooks (an int32 per channel) before the Gather;
* 2 to 7 bits: the indices' bits split into chunks of 4, 2 and 1 bits (6 = 4 + 2, 7 = 4 + 2 + 1), each chunk
  packed 8 / width values to a byte, so the file holds exactly ``bits`` bits a value. Each chunk is unpacked by
  two BitShifts on the bytes (left by [0, w, 2w, ...] to drop the higher values, right by 8 - w; opset 11), then
  Reshape, Cast(int32), Mul by its place value and Add; Gather(codebook) gives the weight. On a 2-core host ONNX
  Runtime spent about 1.8 s decoding an 11.7M-value embedding at 6 bits when loading it (0.7 s at 8 bits).

The pass then checks with ONNX Runtime's basic optimizer that every decoding was folded away (the summary's
``folded_at_load``), and the report gives each weight's relative error (Frobenius norm) and bytes before and after.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import numpy as np
import onnx_ir as ir

from onnx_ops import job_files
from onnx_ops.errors import PassFailedError, PlanError
from onnx_ops.passes._base import PassContext, PassLog, is_constant_weight, non_finite_reason, release_proto
from onnx_ops.passes._channel_codebook import ChannelClusters, kmeans_channels, output_axis
from onnx_ops.passes._cluster_folding import folds_alone
from onnx_ops.passes._kmeans import Clusters, kmeans_1d
from onnx_ops.plan import ClusterStep
from onnx_ops.report import LayerChange
from onnx_ops.validate import short_name

__all__ = ["ClusterPass"]

logger = logging.getLogger(__name__)

_SPARSE = 0.01  # weights with at least this fraction of exact zeros keep 0 as a centroid (keep_zero)
# Which inputs of each node type may hold the weight.
_WEIGHT_INPUTS = {"MatMul": (0, 1), "Gemm": (0, 1), "Conv": (1,), "Gather": (0,)}
# The indices' bits, low to high, as chunks packed 8 / width to a byte (a width of 8: one uint8 per index).
_CHUNKS = {2: (2,), 3: (2, 1), 4: (4,), 5: (4, 1), 6: (4, 2), 7: (4, 2, 1), 8: (8,)}
_BITSHIFT_OPSET = 11
_WEIGHTS_SHARE = 0.9  # of the step's progress; the rest: ONNX Runtime folding each weight's decoder alone


class ClusterPass(ir.passes.InPlacePass):
    """Replace chosen weights by a per-weight codebook and packed indices that ONNX Runtime decodes at load."""

    def __init__(self, step: ClusterStep, context: PassContext) -> None:
        super().__init__()
        self.step = step
        self.context = context
        self.log = PassLog()
        self._shared: dict[int, tuple[ir.Value, ir.Value]] = {}
        self._graph: ir.Graph | None = None
        self._decoders: dict[str, list[ir.Node]] = {}  # weight name -> the nodes decoding it

    def precheck(self, model: ir.Model) -> None:
        """Raise PlanError when the step names nodes the model lacks or no weight can be clustered."""
        if missing := sorted(set(self.step.exclude_nodes) - {node.name or "" for node in model.graph.all_nodes()}):
            raise PlanError(f"exclude_nodes names nodes the model does not have: {', '.join(missing)}")
        opset = model.opset_imports.get("", 1)
        if self.step.bits < 8 and opset < _BITSHIFT_OPSET:
            raise PlanError(
                f"cluster with fewer than 8 bits unpacks its indices with BitShift, which needs opset 11; this model "
                f"has opset {opset}: use bits 8"
            )
        chosen, skipped = self._candidates(model)
        if not chosen:
            why = f" ({skipped[0][1]}{f', and {len(skipped) - 1} more' if len(skipped) > 1 else ''})" if skipped else ""
            raise PlanError(
                f"no {'/'.join(self.step.op_types)} node has a constant float32 weight of at least "
                f"{self.step.min_elements} elements to cluster{why}"
            )

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        """Cluster the chosen weights of model, in place."""
        chosen, skipped = self._candidates(model)
        for label, reason in skipped:
            self.log.skip(label, reason)
        progress = self.context.progress
        # The last share of the step: ONNX Runtime folds each decoder alone (its peak can be the step's).
        counter = progress.part(0.0, _WEIGHTS_SHARE).counter("weight", len(chosen)) if progress else None
        self._graph = model.graph
        total_before = total_after = 0
        for done, (weight, label, op_type) in enumerate(chosen):
            if counter is not None:
                counter(done)
            change, stored = self._cluster(model.graph, weight, label, op_type)
            # Out of the graph now: its pages (mapped from the job's file) leave memory here, not when the pass ends.
            weight.const_value = None
            self.log.layers.append(change)
            total_before, total_after = total_before + change.params_before * 4, total_after + stored
        if counter is not None:
            counter(len(chosen))
        release_proto(model)  # the float weights' protobuf arena goes before ONNX Runtime folds the decoders
        if progress is not None:
            progress.stage("does ONNX Runtime fold the decoders", _WEIGHTS_SHARE)
        folded = self._check_folding(model)
        self.log.summary.update(
            bits=self.step.bits,
            weights_clustered=len(self.log.layers),
            weight_bytes_before=total_before,
            weight_bytes_after=total_after,
            folded_at_load=folded,
        )
        logger.info("cluster: %d weights, %d -> %d bytes", len(self.log.layers), total_before, total_after)
        return ir.passes.PassResult(model, modified=bool(self.log.layers))

    def _candidates(self, model: ir.Model) -> tuple[list[tuple[ir.Value, str, str]], list[tuple[str, str]]]:
        """(weight, node label, op type) of each weight to cluster, and (label, reason) of each left alone."""
        step = self.step
        chosen: list[tuple[ir.Value, str, str]] = []
        skipped: list[tuple[str, str]] = []
        seen: set[str] = set()
        for node in model.graph:
            if node.op_type not in step.op_types or node.domain not in ("", "ai.onnx"):
                continue
            label = node.name or node.op_type
            if label in step.exclude_nodes:
                skipped.append((label, "excluded by the plan"))
                continue
            for index in _WEIGHT_INPUTS[node.op_type]:
                value = node.inputs[index] if index < len(node.inputs) else None
                if value is None or not is_constant_weight(value) or (value.name or "") in seen:
                    continue
                seen.add(value.name or "")
                reason = self._reason(value, node)
                self._remap(value)
                if reason:
                    skipped.append((label, reason))
                else:
                    chosen.append((value, label, node.op_type))
        return chosen, skipped

    def _reason(self, value: ir.Value, node: ir.Node) -> str:
        """Why this weight stays as it is ("" when it can be clustered)."""
        tensor, name = value.const_value, short_name(value.name or "")
        assert tensor is not None
        if tensor.dtype != ir.DataType.FLOAT or len(tensor.shape) < 2:
            return f"weight {name} is not a float32 tensor of 2 or more dimensions"
        if tensor.size < self.step.min_elements:
            return f"weight {name} has {tensor.size} elements (< min_elements {self.step.min_elements})"
        if tensor.size % (group := max(8 // width for width in _CHUNKS[self.step.bits])):
            return (
                f"weight {name} has {tensor.size} elements, not a multiple of {group} (packed {group} indices a byte)"
            )
        if value.is_graph_output():
            return f"weight {name} is also a graph output"
        readers = [user for user, _ in value.uses()]
        if any(user.graph is not node.graph for user in readers):
            return f"weight {name} is also read inside a subgraph"
        if other := next((u for u in readers if u is not node and not self._selected(u)), None):
            return f"weight {name} is also read by {other.op_type} node {other.name or '?'}, which is not clustered"
        return non_finite_reason(value) or ""

    def _remap(self, value: ir.Value) -> None:
        """A checked weight of the job's file (first step: as on disk) mapped afresh: its pages leave memory."""
        unchanged = self.context.unchanged_source is not None
        fresh = job_files.remapped(value.const_value) if unchanged and value.const_value else None
        if fresh is not None:
            value.const_value = fresh

    def _selected(self, node: ir.Node) -> bool:
        return node.op_type in self.step.op_types and (node.name or node.op_type) not in self.step.exclude_nodes

    def _cluster(self, graph: ir.Graph, weight: ir.Value, label: str, op_type: str) -> tuple[LayerChange, int]:
        """Replace one weight by its codebook and decoder; its report line and its stored bytes."""
        step = self.step
        array = weight.const_value.numpy()  # type: ignore[union-attr]
        sparse = step.keep_zero and bool(np.count_nonzero(array == 0) >= _SPARSE * array.size)
        found: Clusters | ChannelClusters
        if step.codebook == "channel":  # one codebook per output channel (see _channel_codebook)
            user, index = next(iter(weight.uses()))
            found = kmeans_channels(
                array, output_axis(user, index, array.ndim), 1 << step.bits,
                init=step.init, iterations=step.iterations, pin_zero=sparse, seed=step.seed,
            )  # fmt: skip
        else:
            found = kmeans_1d(
                array, 1 << step.bits, init=step.init, iterations=step.iterations, pin_zero=sparse, seed=step.seed
            )
        name = weight.name or f"{label}_weight"
        codebook = self._constant(f"{name}_codebook", found.codebook)
        nodes, indices = self._decoder(name, found.indices.ravel(), array.shape)
        if isinstance(found, ChannelClusters):
            offsets = self._constant(f"{name}_offsets", found.offsets)
            nodes.append(ir.node("Add", [indices, offsets], name=f"{name}_channel"))
            indices = _typed(nodes[-1].outputs[0], f"{name}_channel", array.shape)
        gather = ir.node("Gather", [codebook, indices], attributes={"axis": 0}, name=f"{name}_decode")
        out = gather.outputs[0]
        out.name, out.shape, out.type = f"{name}_clustered", weight.shape, ir.TensorType(ir.DataType.FLOAT)
        first = min((user for user, _ in weight.uses()), key=_position(graph))
        graph.insert_before(first, [*nodes, gather])
        self._decoders[name] = [*nodes, gather]
        weight.replace_all_uses_with(out)
        graph.initializers.pop(weight.name or "")
        restored = found.restored() if isinstance(found, ChannelClusters) else found.codebook[found.indices]
        norm = float(np.linalg.norm(array)) or 1.0
        tables = found.codebook.nbytes + (found.offsets.nbytes if isinstance(found, ChannelClusters) else 0)
        stored = tables + array.size * step.bits // 8
        zero = ", 0 kept" if sparse else ""
        zero += f", {found.offsets.size} channel codebooks" if isinstance(found, ChannelClusters) else ""
        return LayerChange(
            name=label, op_type=op_type, weight=name, shape_before=list(array.shape), shape_after=list(array.shape),
            params_before=int(array.size), params_after=int(array.size),
            rel_error=float(np.linalg.norm(restored.reshape(array.shape) - array)) / norm,
            note=f"cluster {step.bits} bits ({found.codebook.size} centroids{zero}): {array.nbytes} -> {stored} bytes",
        ), stored  # fmt: skip

    def _decoder(self, name: str, indices: np.ndarray, shape: tuple[int, ...]) -> tuple[list[ir.Node], ir.Value]:
        """Nodes turning the stored indices into int32 indices of the weight's shape, and their output."""
        target = self._constant(f"{name}_shape", np.asarray(shape, np.int64))
        nodes: list[ir.Node] = []
        total: ir.Value | None = None
        offset = 0
        for width in _CHUNKS[self.step.bits]:
            part = (indices >> offset) & ((1 << width) - 1)
            label = f"{name}_idx{offset}"
            if width == 8:
                values = self._constant(f"{label}_uint8", part.reshape(shape))
            else:
                per_byte = 8 // width
                shifts = (width * np.arange(per_byte - 1, -1, -1)).astype(np.uint8)
                packed = np.bitwise_or.reduce(part.reshape(-1, per_byte) << shifts, axis=1, dtype=np.uint8)
                stored = self._constant(f"{label}_packed", packed.reshape(-1, 1))
                left, right = self._shifts(width)
                high = ir.node("BitShift", [stored, left], attributes={"direction": "LEFT"}, name=f"{label}_left")
                low = ir.node("BitShift", [high.outputs[0], right], attributes={"direction": "RIGHT"}, name=label)
                shaped = ir.node("Reshape", [low.outputs[0], target], name=f"{label}_shaped")
                nodes += [high, low, shaped]
                values = shaped.outputs[0]
            wide = ir.node("Cast", [values], attributes={"to": ir.DataType.INT32}, name=f"{label}_int32")
            nodes.append(wide)
            part_value = wide.outputs[0]
            if offset:
                scale = self._constant(f"{label}_scale", np.asarray(1 << offset, np.int32))
                nodes.append(ir.node("Mul", [part_value, scale], name=f"{label}_scaled"))
                part_value = nodes[-1].outputs[0]
            if total is not None:
                nodes.append(ir.node("Add", [total, part_value], name=f"{label}_sum"))
                part_value = nodes[-1].outputs[0]
            total, offset = part_value, offset + width
        for node in nodes:
            node.outputs[0].name = node.name
        assert total is not None
        total.type, total.shape = ir.TensorType(ir.DataType.INT32), ir.Shape(shape)
        return nodes, total

    def _shifts(self, width: int) -> tuple[ir.Value, ir.Value]:
        """The left shifts [0, width, 2 width, ...] and the right shift 8 - width that unpack one byte, shared."""
        if width not in self._shared:
            per_byte = 8 // width
            left = (width * np.arange(per_byte)).astype(np.uint8).reshape(1, per_byte)
            self._shared[width] = (
                self._constant(f"cluster_shift_left_{width}", left),
                self._constant(f"cluster_shift_right_{width}", np.asarray(8 - width, np.uint8)),
            )
        return self._shared[width]

    def _check_folding(self, model: ir.Model) -> bool:
        """True when ONNX Runtime's basic optimizer folds every decoding (warns and returns False otherwise).

        Each weight's decoder is asked as a miniature, alone (see _cluster_folding): the whole model would hold every
        weight decoded at once, and one full decoder its intermediates. Decoders of one structure are asked once.
        """
        opsets = dict(model.opset_imports)
        left = []
        answers: dict[tuple[object, ...], bool] = {}
        for change in self.log.layers:
            try:
                folds = folds_alone(self._decoders[change.weight], opsets, self.context.workdir, answers)
            except PassFailedError as e:
                raise PassFailedError(f"the clustered model does not load in ONNX Runtime: {e.message}") from e
            if not folds:
                left.append(change.weight)
        if left:
            self.log.warnings.append(
                f"cluster: ONNX Runtime does not fold the decoding of {len(left)} weight(s) at load "
                f"({', '.join(left[:3])}{'...' if len(left) > 3 else ''}): they are decoded on every run (slower)"
            )
        return not left

    def _constant(self, name: str, array: np.ndarray) -> ir.Value:
        """A new initializer of the graph being clustered."""
        assert self._graph is not None
        tensor = ir.tensor(np.ascontiguousarray(array), name=name)
        value = ir.Value(name=name, shape=ir.Shape(array.shape), type=ir.TensorType(tensor.dtype), const_value=tensor)
        self._graph.register_initializer(value)
        return value


def _typed(value: ir.Value, name: str, shape: tuple[int, ...] | None) -> ir.Value:
    value.name, value.type = name, ir.TensorType(ir.DataType.INT32)
    if shape is not None:
        value.shape = ir.Shape(shape)
    return value


def _position(graph: ir.Graph) -> Callable[[ir.Node], int]:
    """A sort key: a node's place in the graph."""
    order = {id(node): i for i, node in enumerate(graph)}
    return lambda node: order.get(id(node), len(order))
