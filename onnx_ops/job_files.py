"""A job's models on disk while it is measured: weights in a data file beside the model, which ONNX Runtime maps.

A session built from bytes keeps those bytes and copies every weight; one built from a model file whose weights
sit in a data file maps them instead. The model given to `spill` is emptied of its weights (they move to the data
file) until `restore` reads them back, so the job does not hold the proto and the sessions' weights at once.
"""

from __future__ import annotations

from pathlib import Path

import onnx
from onnx import external_data_helper

__all__ = ["load", "restore", "spill"]

_THRESHOLD = 1024  # tensors of at least this many bytes go to the data file


def spill(model: onnx.ModelProto, path: Path) -> Path:
    """Write `model` to `path` with its weights in ``<name>.data`` beside it, moving them out of `model`.

    Returns:
        `path`. `model` keeps its graph; its large tensors refer to the data file until `restore` is called.
    """
    onnx.save_model(model, path, save_as_external_data=True, location=f"{path.name}.data", size_threshold=_THRESHOLD)
    return path


def restore(model: onnx.ModelProto, folder: Path) -> None:
    """Read the weights `spill` moved out of `model` back into it, exactly as they were (no location field left)."""
    for tensor in external_data_helper._get_all_tensors(model):
        if external_data_helper.uses_external_data(tensor):
            external_data_helper.load_external_data_for_tensor(tensor, str(folder))
            tensor.ClearField("data_location")


def load(path: Path) -> onnx.ModelProto:
    """A model `spill` (or `onnx_ops.external.save_model`) wrote, with its weights read back in."""
    model = onnx.load(path, load_external_data=False)
    restore(model, path.parent)
    return model
