"""Dynamic int8 through ONNX Runtime's quantizer, then per-column embedding tables and optional GPTQ rounding.

Called by the pass in place of its one call into ``quantize_dynamic`` (activation smoothing, when asked, was
applied to the float model before, in the pass: onnx_ops.passes.quantize.smoothing):

1. ONNX Runtime quantizes the model as it is.
2. Every quantized Gather table gets one scale per column (onnx_ops.passes.quantize.embeddings).
3. Optionally (``dynamic_rounding: gptq``) the MatMul weights are re-rounded with GPTQ inside the scales
   ONNX Runtime chose (onnx_ops.passes.quantize.dynamic_rounding). Not by default: on MiniLM it brought the
   calibration outputs closer (cosine 0.9995 -> 0.9998) and the held-out ones slightly further (0.99915 ->
   0.99909): 16 calibration sentences give fewer token rows than the FFN has inputs.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import onnx

from onnx_ops.passes._base import Feed, PassLog
from onnx_ops.passes.quantize import dynamic_rounding, embeddings
from onnx_ops.plan import QuantizeStep

__all__: list[str] = []  # package-private


def quantize(
    source: Path,
    target: Path,
    call: Callable[[Path, Path], None],
    *,
    step: QuantizeStep,
    feeds: Sequence[Feed],
    log: PassLog,
    clean: Callable[[BaseException], str],
) -> None:
    """Quantize the float model file `source` into `target` with `call` (ONNX Runtime's dynamic quantizer).

    Args:
        source: The float model ONNX Runtime reads.
        target: Where the int8 model goes.
        call: Runs ONNX Runtime's dynamic quantizer from one file into another.
        step: The quantize step (dynamic_rounding).
        feeds: Calibration feeds (none: no re-rounding).
        log: The pass's log (summary entries and warnings).
        clean: Turns an exception into a message without paths.
    """
    call(source, target)
    teacher = onnx.load(source)
    quantized = onnx.load(target)
    if tables := embeddings.per_column_tables(quantized, teacher):
        log.summary["embedding_scales"] = f"one per column in {len(tables)} Gather tables"
        onnx.save(quantized, target)
    del quantized, teacher
    if feeds and step.dynamic_rounding == "gptq":
        dynamic_rounding.round_file(source, target, feeds, log, clean)
