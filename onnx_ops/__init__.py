"""onnx_ops: compress ONNX models (pruning, SVD factorization, int8 quantization) and measure the result.

from onnx_ops import compress
result = compress("model.onnx", {"steps": [{"kind": "quantize", "mode": "dynamic"}]})
result.save("small.onnx")
print(result.report.after.size_bytes, result.report.latency_after.p50_ms)
"""

from __future__ import annotations

from onnx_ops.errors import (
    CompressionError,
    DataError,
    InvalidModelError,
    PassFailedError,
    PlanError,
    ResourceLimitError,
)
from onnx_ops.pipeline import CompressionResult, compress, parse_plan, save_report
from onnx_ops.plan import EvaluationOptions, Plan, PruneStep, QuantizeStep, SvdStep
from onnx_ops.report import Report
from onnx_ops.validate import Limits

__all__ = [
    "CompressionError",
    "CompressionResult",
    "DataError",
    "EvaluationOptions",
    "InvalidModelError",
    "Limits",
    "PassFailedError",
    "Plan",
    "PlanError",
    "PruneStep",
    "QuantizeStep",
    "Report",
    "ResourceLimitError",
    "SvdStep",
    "compress",
    "parse_plan",
    "save_report",
]

__version__ = "0.1.0"
