"""Qualcomm AIMET for ONNX (aimet-onnx): its quantization simulation exported as a QDQ model.

Settings:
    int8 quantsim: batch norms folded into the weights (fold_all_batch_norms_to_weight), a QuantizationSimModel
        with its defaults (int8 weights and activations, min-max), encodings computed on the calibration
        samples, exported with to_onnx_qdq (weights stored quantized). The inputs' sizes are fixed to the
        calibration samples' first (AIMET makes random inputs of the declared shape, which fails on -1 sizes).
    int8 adaround: the same with AdaRound (apply_adaround, 2000 iterations a layer: AIMET recommends 10000,
        too slow for a CPU benchmark) on the calibration samples before the encodings are computed.
"""

from __future__ import annotations

import onnx
from _common import Args, feeds, fix_input_shapes, run
from aimet_onnx import apply_adaround, compute_encodings
from aimet_onnx.batch_norm_fold import fold_all_batch_norms_to_weight
from aimet_onnx.quantsim import QuantizationSimModel


def _quantize(args: Args, adaround: bool) -> str:
    samples = feeds(args.calibration)
    model = fix_input_shapes(onnx.load(str(args.model)), samples[0])  # AIMET makes inputs for -1 sizes: it fails
    fold_all_batch_norms_to_weight(model)
    sim = QuantizationSimModel(model, dummy_input=samples[0], providers=["CPUExecutionProvider"])
    if adaround:
        apply_adaround(sim, samples, num_iterations=2000)
    with compute_encodings(sim):
        for feed in samples:
            sim.session.run(None, feed)
    onnx.save(sim.to_onnx_qdq(prequantize_constants=True), str(args.out))
    return "AdaRound, 2000 iterations a layer" if adaround else ""


if __name__ == "__main__":
    run({"int8 quantsim": lambda args: _quantize(args, False), "int8 adaround": lambda args: _quantize(args, True)})
