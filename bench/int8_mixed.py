"""Mixed-precision static QDQ on ddddocr's captcha detector: where its int8 error comes from and what fixing it costs.

ONNX Runtime's quantizer only (no recovery, no folding; a few seconds a variant), calibrated on the detector
case's calibration images of bench.int8_recovery and measured on its held-out images: box F1 and box IoU against
fp32's boxes, and the CPU-time latency ratio against the fp32 file with its 95% interval (one thread,
interleaved pairs; bench.int8_recovery's timing settings). Variants:

- ``plain``: uint8 activations, int8 per-channel weights, the output tail (nodes after the last Conv) in float,
  as the quantize pass asks ONNX Runtime for.
- ``u16``: uint16 activations everywhere (TensorQuantOverrides need opset 21: ONNX Runtime raises it), int8 weights.
- ``u16_stage``: uint16 only on the tensors of the stage where the propagated Conv output error peaks
  (``--stage FIRST LAST``, node names), uint8 elsewhere.
- ``float_stage``: the same stage's nodes left in float.
- ``float_heads``: the detection heads (from the first head Conv to the output) left in float.
- ``weights_only``: float activations, the weights as ``plain`` rounded them: the floor int8 weights alone give.
- ``recovered``: the quantize pass's static int8 with recovery (bench.int8_recovery's ``static+recovery``).
- ``gptq_weights_only``: float activations, ``recovered``'s weights and biases: what its 8-bit activations cost.
- ``recovered_sigmoid_float``: ``recovered`` with SiLU's Sigmoid outputs in float (no Q/DQ pair on them).
- ``recovered_silu_only``: ``recovered`` with only the SiLU outputs (the Mul, the Convs' inputs) in 8 bits.

``--sweep N`` splits ``recovered``'s graph into N spans of as many Convs and, one span at a time, removes the
QuantizeLinear/DequantizeLinear pairs on the span's tensors (float activations there, its Convs then run in
float): box F1 and IoU with the span's share of the Conv multiply-adds (not timed).

``--errors`` prints, per Conv in graph order, the relative squared error of its output against fp32 on the
calibration images (``plain``, then ``weights_only``).

Measured before bench.boxes decoded YOLOX's rows (it ran NMS on the raw grid-cell rows at a 0.3 score, so the box
F1 and IoU below compare boxes that are not the detector's; on the decoded boxes at ddddocr's own 0.1 score, with
the captchas of bench.captchas, plain static int8 is within a point of fp32 against the true boxes: README,
"Static int8 with recovery"). The latency ratios stand. ``--errors --sweep 8``, rows in
bench/results/int8_mixed_ddddocr.json; latency: ratio (95% interval):

| variant | box F1 % | box IoU % | CPU time / fp32 |
|---|---|---|---|
| plain | 92.5 | 91.2 | 0.45 (0.42-0.45) |
| u16 (everywhere) | 96.9 | 96.4 | 2.09 (2.05-2.16) |
| u16_stage (Conv_107..Conv_124) | 91.2 | 90.9 | 0.52 (0.51-0.53) |
| float_stage (same) | 91.4 | 91.0 | 0.47 (0.46-0.47) |
| float_heads | 93.9 | 94.4 | 0.63 (0.63-0.65) |
| weights_only (round to nearest) | 97.6 | 96.6 | 1.00 |
| recovered | 94.1 | 91.3 | 0.44 (0.43-0.44) |
| gptq_weights_only | 98.9 | 98.7 | 1.00 |
| recovered_sigmoid_float (``--variants recovered_sigmoid_float``) | 93.1 | 91.2 | 0.66 (0.65-0.68) |
| recovered_silu_only (``--variants recovered_silu_only``) | 95.5 | 94.6 | 1.69 (1.67-1.75) |

16-bit activations have no integer Conv kernel in ONNX Runtime's CPU provider: the Convs they touch run in float
between 16-bit Q/DQ pairs, slower than float itself when everywhere. The peak of the Conv error profile (relative
squared error 0.85-1.19 at Conv_110..Conv_121, 0.003-0.007 with float activations) does not reach the boxes:
that stage in 16 bits or in float changes nothing. With float activations on one of 8 spans of ``recovered`` (7-21%
of the Conv multiply-adds each) box F1 stays within 93.4-95.0: the 8-bit activation error that costs the boxes is
spread over the whole network, and recovery's weights alone (float activations) reach 98.9.

Run:  python -m bench.int8_mixed [--variants NAME ...] [--errors] [--stage FIRST LAST] [--sweep N]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import itertools
import json
import tempfile
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import numpy_helper
from onnxruntime import quantization as ortq

from bench.boxes import box_f1 as _box_f1
from bench.boxes import yolox_boxes as _boxes
from bench.int8_recovery import TIMING, _build, detector_case
from bench.int8_recovery import VARIANTS as RECOVERY_VARIANTS
from onnx_ops.evaluate import Runner, compare_latency
from onnx_ops.passes.quantize import tail

VARIANTS = (
    "plain",
    "u16",
    "u16_stage",
    "float_stage",
    "float_heads",
    "weights_only",
    "recovered",
    "gptq_weights_only",
    "recovered_sigmoid_float",
    "recovered_silu_only",
)
STAGE = ("Conv_107", "Conv_124")  # the stride-16 CSP block where plain's Conv output error peaks (--errors)
HEADS = "Conv_287"  # the first head Conv in graph order


class _Reader(ortq.CalibrationDataReader):  # type: ignore[misc]
    def __init__(self, feeds: list[dict[str, np.ndarray]]) -> None:
        self.feeds = iter(feeds)

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self.feeds, None)


class Bench:
    """The detector case, its float model (opset 13, ONNX Runtime's pre-processing) and fp32's outputs."""

    def __init__(self, work: Path) -> None:
        self.case, self.work = detector_case(), work
        self.calibration = [{"images": x} for x in self.case.calibration["images"]]
        raw = work / "opset13.onnx"
        onnx.save(onnx.version_converter.convert_version(onnx.load(self.case.model), 13), raw)
        self.source = work / "float.onnx"
        ortq.quant_pre_process(str(raw), str(self.source), skip_symbolic_shape=True)
        self.graph = onnx.load(self.source).graph
        self.base = Runner(self.case.model.read_bytes(), threads=1)
        self.reference = [self.base.run(feed) for feed in self.case.evaluation]

    def span(self, first: str, last: str | None = None) -> list[str]:
        """Node names from `first` to `last` (the graph's end when None), in graph order."""
        names = [node.name for node in self.graph.node]
        return names[names.index(first) : names.index(last) + 1 if last else len(names)]

    def quantize(self, name: str, exclude: list[str], overrides: dict[str, object] | None = None) -> Path:
        target = self.work / f"{name}.onnx"
        with contextlib.redirect_stdout(io.StringIO()):
            ortq.quantize_static(
                str(self.source), str(target), _Reader(self.calibration), quant_format=ortq.QuantFormat.QDQ,
                per_channel=True, activation_type=ortq.QuantType.QUInt8, weight_type=ortq.QuantType.QInt8,
                nodes_to_exclude=tail.output_tail(self.graph) + exclude,
                extra_options={"TensorQuantOverrides": overrides} if overrides else {},
            )  # fmt: skip
        return target

    def build(self, variant: str, stage: tuple[str, str]) -> Path:
        if variant in ("plain", "weights_only"):
            plain = self.quantize("plain", [])
            return plain if variant == "plain" else self.weights_only(plain)
        if variant in ("recovered", "gptq_weights_only"):  # the pass's model, built once
            recovered = self.work / "recovered.onnx"
            if not recovered.exists():
                onnx.save(_build(self.case, RECOVERY_VARIANTS["static+recovery"])[0], recovered)
            return recovered if variant == "recovered" else self.weights_only(recovered)
        if variant.startswith("recovered_"):
            types = {"Sigmoid"} | ({"Conv"} if variant == "recovered_silu_only" else set())
            tensors = {node.output[0] for node in self.graph.node if node.op_type in types}
            return _float_activations(self.build("recovered", stage), tensors, self.work / f"{variant}.onnx")
        if variant == "u16":
            tensors = {out for node in self.graph.node for out in node.output} | {i.name for i in self.graph.input}
            return self.quantize(variant, [], {t: [{"quant_type": ortq.QuantType.QUInt16}] for t in tensors})
        if variant == "u16_stage":
            nodes = {node.name: node for node in self.graph.node}
            tensors = {out for name in self.span(*stage) for out in nodes[name].output} | {nodes[stage[0]].input[0]}
            return self.quantize(variant, [], {t: [{"quant_type": ortq.QuantType.QUInt16}] for t in tensors})
        return self.quantize(variant, self.span(*stage) if variant == "float_stage" else self.span(HEADS))

    def weights_only(self, qdq: Path) -> Path:
        """The float model with each Conv weight (and int32 bias) replaced by what `qdq`'s dequantizes to."""
        quantized = onnx.load(qdq)
        inits = {i.name: numpy_helper.to_array(i) for i in quantized.graph.initializer}
        rounded = {}
        for node in quantized.graph.node:
            level = inits.get(node.input[0]) if node.op_type == "DequantizeLinear" else None
            if level is not None and (level.ndim == 4 or level.dtype == np.int32):
                scale = inits[node.input[1]].astype(np.float64).reshape((-1,) + (1,) * (level.ndim - 1))
                rounded[node.input[0].removesuffix("_quantized")] = (level * scale).astype(np.float32)
        model = onnx.load(self.source)
        for init in model.graph.initializer:
            if init.name in rounded:
                init.CopyFrom(numpy_helper.from_array(rounded[init.name], init.name))
        target = self.work / f"{qdq.stem}_weights_only.onnx"
        onnx.save(model, target)
        return target

    def measure(self, variant: str, path: Path) -> dict[str, object]:
        runner = Runner(path.read_bytes(), threads=1)
        outputs = [runner.run(feed) for feed in self.case.evaluation]
        f1, iou = _box_f1(_boxes, outputs, self.reference)  # type: ignore[arg-type]
        timed = compare_latency(self.base, runner, self.case.evaluation[0], settings=TIMING).comparison
        return {"model": self.case.key, "variant": variant, "box F1 %": f1, "box IoU %": iou,
                "latency_ratio": timed.ratio, "latency_interval": [timed.ratio_low, timed.ratio_high],
                "basis": timed.basis}  # fmt: skip

    def conv_errors(self, path: Path) -> dict[str, float]:
        """Relative squared error of every Conv output against the float model on the calibration images."""
        convs = [node for node in self.graph.node if node.op_type == "Conv"]
        sums = np.zeros((len(convs), 2))
        sessions = [self._exposed(p, [c.output[0] for c in convs]) for p in (self.source, path)]
        for feed in self.calibration:
            want, got = (dict(zip([o.name for o in s.get_outputs()], s.run(None, feed), strict=True)) for s in sessions)
            for i, conv in enumerate(convs):
                name = conv.output[0]
                sums[i] += [float(np.sum((want[name] - got[name]) ** 2)), float(np.sum(want[name] ** 2))]
        return {conv.name: float(e / r) if r else 0.0 for conv, (e, r) in zip(convs, sums, strict=True)}

    def sweep(self, spans: int) -> None:
        """Print box F1/IoU of `recovered` with float activations on one span of Convs at a time."""
        recovered = self.build("recovered", STAGE)
        nodes = list(self.graph.node)
        convs = [i for i, node in enumerate(nodes) if node.op_type == "Conv"]
        size = -(-len(convs) // spans)
        starts = [convs[j] for j in range(0, len(convs), size)] + [len(nodes)]
        work = {n.name: _multiply_adds(n, self.source) for n in nodes if n.op_type == "Conv"}
        total = sum(work.values())
        for first, end in itertools.pairwise(starts):
            span = nodes[first:end]
            tensors = {out for node in span for out in node.output} | {span[0].input[0]}
            path = _float_activations(recovered, tensors, self.work / "span.onnx")
            runner = Runner(path.read_bytes(), threads=1)
            f1, iou = _box_f1(_boxes, [runner.run(feed) for feed in self.case.evaluation], self.reference)  # type: ignore[arg-type,misc]
            share = sum(work.get(node.name, 0) for node in span) / total
            print(json.dumps({"variant": f"recovered, float activations {span[0].name}..{span[-1].name}",
                              "conv_share": share, "box F1 %": f1, "box IoU %": iou}), flush=True)  # fmt: skip

    @staticmethod
    def _exposed(path: Path, names: list[str]) -> ort.InferenceSession:
        model = onnx.load(path)
        known = {o.name for o in model.graph.output}
        model.graph.output.extend(onnx.ValueInfoProto(name=n) for n in names if n not in known)
        return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])


_SHAPES: dict[Path, dict[str, list[int]]] = {}


def _multiply_adds(conv: onnx.NodeProto, source: Path) -> int:
    """A Conv's multiply-adds: output elements x weight elements per output channel."""
    if source not in _SHAPES:
        model = onnx.shape_inference.infer_shapes(onnx.load(source))
        values = list(model.graph.value_info) + list(model.graph.output)
        shapes = {v.name: [d.dim_value for d in v.type.tensor_type.shape.dim] for v in values}
        _SHAPES[source] = shapes | {i.name: list(i.dims) for i in model.graph.initializer}
    shapes = _SHAPES[source]
    return int(np.prod(shapes[conv.output[0]][1:]) * np.prod(shapes[conv.input[1]][1:]))


def _float_activations(path: Path, tensors: set[str], target: Path) -> Path:
    """`path`'s QDQ model without the QuantizeLinear -> DequantizeLinear pairs on `tensors`."""
    model = onnx.load(path)
    readers: dict[str, list[onnx.NodeProto]] = {}
    for node in model.graph.node:
        for name in node.input:
            readers.setdefault(name, []).append(node)
    dropped: set[int] = set()
    renamed: dict[str, str] = {}
    for node in model.graph.node:
        if node.op_type == "QuantizeLinear" and node.input[0] in tensors:
            after = [d for d in readers.get(node.output[0], []) if d.op_type == "DequantizeLinear"]
            if len(after) == len(readers.get(node.output[0], [])):
                renamed |= {d.output[0]: node.input[0] for d in after}
                dropped |= {id(d) for d in after} | {id(node)}
    kept = [node for node in model.graph.node if id(node) not in dropped]
    for node in kept:
        node.input[:] = [renamed.get(name, name) for name in node.input]
    del model.graph.node[:]
    model.graph.node.extend(kept)
    onnx.save(model, target)
    return target


def main() -> None:
    """Print one JSON row per variant (and the Conv error profile with --errors)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variants", nargs="*", choices=VARIANTS, default=list(VARIANTS))
    parser.add_argument("--stage", nargs=2, default=list(STAGE), metavar=("FIRST", "LAST"))
    parser.add_argument("--errors", action="store_true", help="print the per-Conv error profile")
    parser.add_argument("--sweep", type=int, default=0, help="float activations on one of N Conv spans at a time")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        bench = Bench(Path(folder))
        if args.errors:
            for variant in ("plain", "weights_only"):
                profile = bench.conv_errors(bench.build(variant, tuple(args.stage)))
                print(variant, " ".join(f"{k}:{v:.4f}" for k, v in profile.items()), flush=True)
        for variant in args.variants:
            print(json.dumps(bench.measure(variant, bench.build(variant, tuple(args.stage)))), flush=True)
        if args.sweep:
            bench.sweep(args.sweep)


if __name__ == "__main__":
    main()
