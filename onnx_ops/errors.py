"""Exceptions raised by onnx_ops.

Every error a user can cause derives from :class:`CompressionError` and carries a stable ``code``
(used by the CLI's exit message and the HTTP layer) and a message that names the problem without
server paths, cut to a fixed length (:func:`onnx_ops.bounds.cut`)::

    CompressionError                 code
     ├─ InvalidModelError            invalid_model      not protobuf, checker/ORT refuse it, external data, too big
     ├─ PlanError                    invalid_plan       the plan does not fit the model or the data given
     ├─ DataError                    invalid_data       .npz names/dtypes/shapes/values do not match the inputs
     ├─ PassFailedError              pass_failed        a pass (ours or ONNX Runtime's) failed on this model
     └─ ResourceLimitError           out_of_memory      the model needs more memory than this process may use
"""

from __future__ import annotations

from onnx_ops.bounds import cut

__all__ = ["CompressionError", "DataError", "InvalidModelError", "PassFailedError", "PlanError", "ResourceLimitError"]


class CompressionError(Exception):
    """Base class of every error a caller of onnx_ops is expected to handle."""

    code = "compression_error"

    def __init__(self, message: str) -> None:
        message = cut(message)  # it may quote the model's own names, of any length
        super().__init__(message)
        self.message = message


class InvalidModelError(CompressionError):
    """The model cannot be used: it does not parse, fails validation, or breaks a limit."""

    code = "invalid_model"


class PlanError(CompressionError):
    """The plan cannot work for this model or this data (refused before any work is done)."""

    code = "invalid_plan"


class DataError(CompressionError):
    """A calibration or evaluation data file does not match the model's inputs."""

    code = "invalid_data"


class PassFailedError(CompressionError):
    """A compression step failed on this model."""

    code = "pass_failed"


class ResourceLimitError(CompressionError):
    """Running the model needed more memory than allowed (a memory bomb, or limits set too low)."""

    code = "out_of_memory"
