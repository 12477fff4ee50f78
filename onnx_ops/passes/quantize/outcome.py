"""What static int8 recovery changed and measured (onnx_ops.passes.quantize.recovery), for the step's summary."""

from __future__ import annotations

import dataclasses

__all__: list[str] = []  # package-private


@dataclasses.dataclass
class Outcome:
    """What recovery changed and measured, for the step's summary."""

    layers: int = 0
    rounded: int = 0
    corrected: int = 0
    refit: int = 0  # layers (groups) aimed at the teacher whose refit cross-validation kept
    gptq_error: float = 0.0  # summed layer error trace(E H E^T) of GPTQ's rounding ...
    nearest_error: float = 0.0  # ... and of round-to-nearest, on the same inputs
    float_layers: list[str] = dataclasses.field(default_factory=list)
    depthwise: str = ""  # what happened to the depthwise Convs
    cosine_before: float | None = None
    cosine_after: float | None = None
    undone: list[str] = dataclasses.field(default_factory=list)  # layers whose stage moved the outputs away
    stages: int = 0  # stages judged
    deltas: dict[str, list[float]] = dataclasses.field(default_factory=dict)  # each layer's share of the counts

    def counts(self) -> list[float]:
        """The counts recovery adds to as it goes, in one list (see `deltas`)."""
        return [self.rounded, self.corrected, self.refit, self.gptq_error, self.nearest_error]

    def undo(self, layer: str) -> None:
        """Take a layer's share out of the counts: its recovery was undone."""
        delta = self.deltas.pop(layer, [0.0] * 5)
        self.rounded, self.corrected, self.refit = (int(a - b) for a, b in zip(self.counts()[:3], delta, strict=False))
        self.gptq_error -= delta[3]
        self.nearest_error -= delta[4]

    def summary(self) -> dict[str, float | int | str | list[str]]:
        """The step summary's recovery entries."""
        found: dict[str, float | int | str | list[str]] = {"recovery_layers": self.layers}
        if self.rounded:
            ratio = self.gptq_error / self.nearest_error if self.nearest_error > 0 else 1.0
            what = "distance to the float weights (refit layers leave them)" if self.refit else "layer error"
            found["recovery_rounding"] = f"gptq on {self.rounded} layers: {what} {ratio:.3f}x round-to-nearest"
        if self.refit:
            found["recovery_aimed"] = f"{self.refit} layers refit to the float model's outputs before rounding"
        if self.corrected:
            found["recovery_bias_correction"] = f"{self.corrected} biases"
        if self.undone:
            found["recovery_undone"] = (
                f"{len(self.undone)} of {self.layers} layers keep ONNX Runtime's rounding: recovering them moved the "
                f"calibration outputs away from the float model's ({self.stages} stages judged)"
            )
        if self.cosine_before is not None and self.cosine_after is not None:
            found["recovery_cosine"] = f"{self.cosine_before:.4f} -> {self.cosine_after:.4f} (calibration feeds)"
        if self.depthwise:
            found["recovery_depthwise"] = self.depthwise
        found["recovery_float_layers"] = self.float_layers
        return found
