"""AMD Quark's ONNX quantizer (quark.onnx.ModelQuantizer) with its own preset configurations.

Settings (the presets for our family of model: INT8_CNN_* or INT8_TRANSFORMER_*):
    int8 recommended: the *_DEFAULT preset (min-max calibration, QDQ, uint8 activations, int8 weights, with
        Quark's cross-layer equalization, which its configurations switch on by default).
    int8 adaround: the *_ACCURATE preset (percentile calibration and AdaRound fast finetuning).
    int8 adaquant: the *_DEFAULT preset with AdaQuant fast finetuning (Quark's default AdaQuant parameters).
"""

from __future__ import annotations

import copy
from typing import Any

from _common import Args, feeds, run
from onnxruntime.quantization import CalibrationDataReader
from quark.onnx import ModelQuantizer
from quark.onnx.quantization.config import Config, get_default_config
from quark.onnx.quantization.config.custom_config import DEFAULT_ADAQUANT_PARAMS


class _Reader(CalibrationDataReader):  # type: ignore[misc]
    """Our calibration samples, one feed at a time, rewindable (fine-tuning reads them again)."""

    def __init__(self, args: Args) -> None:
        self.samples = feeds(args.calibration)
        self.position = 0

    def get_next(self) -> dict[str, Any] | None:
        if self.position >= len(self.samples):
            return None
        self.position += 1
        return self.samples[self.position - 1]

    def rewind(self) -> None:
        self.position = 0

    def __len__(self) -> int:
        return len(self.samples)


def _quantize(args: Args, preset: str, adaquant: bool = False) -> str:
    name = f"INT8_{'TRANSFORMER' if args.family == 'transformer' else 'CNN'}_{preset}"
    config = get_default_config(name)
    if adaquant:
        config = copy.deepcopy(config)
        config.include_fast_ft = True
        config.extra_options["FastFinetune"] = copy.deepcopy(DEFAULT_ADAQUANT_PARAMS)
    ModelQuantizer(Config(global_quant_config=config)).quantize_model(str(args.model), str(args.out), _Reader(args))
    return f"preset {name}" + (" + AdaQuant" if adaquant else "")


if __name__ == "__main__":
    run(
        {
            "int8 recommended": lambda args: _quantize(args, "DEFAULT"),
            "int8 adaround": lambda args: _quantize(args, "ACCURATE"),
            "int8 adaquant": lambda args: _quantize(args, "DEFAULT", adaquant=True),
        }
    )
