"""Models written once for capture's ONNX Runtime sessions, so a session maps their weights instead of copying them.

A session built from a serialized model holds those bytes and copies every weight out of them; capture used to
build one per sequential level, each from a fresh ``ir.to_proto`` of the student (three copies of the weights for
a moment, on top of the teacher's). Here the model is written once to a folder with its weights in an aligned data
file (``onnx_ops.large.save_model``'s layout) and sessions are built from that file (``capture.Session`` given a
Path). When a refit changes some weights, only their bytes are rewritten in place (same shape and type, so the
same offsets); the graph itself must not change meanwhile.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
from onnx import external_data_helper, numpy_helper

from onnx_ops.large import save_model

__all__ = ["ModelFile", "write_proto"]

_ALIGN = 1 << 16
_INLINE = 1024  # smaller tensors stay in the model file (shape inference reads small constants there)


def write_proto(model: onnx.ModelProto, path: Path) -> Path:
    """Write a proto with its weights in a data file beside `path` (the proto is left unchanged); `path`."""
    save_model(model, path, external_data=True)
    return path


class ModelFile:
    """An IR model written to ``folder/name`` (weights in ``name.data``), whose changed weights can be rewritten.

    Attributes:
        path: The model file (give it to ``capture.Session``).
    """

    def __init__(self, model: ir.Model, folder: Path, name: str = "student.onnx") -> None:
        self.path = folder / name
        self._data = folder / f"{name}.data"
        ir.save(model, self.path, external_data=self._data.name, size_threshold_bytes=_INLINE, alignment=_ALIGN)
        self._graph = onnx.load(self.path, load_external_data=False)
        self._places: dict[str, tuple[int, int]] = {}
        for tensor in self._graph.graph.initializer:
            if external_data_helper.uses_external_data(tensor):
                info = external_data_helper.ExternalDataInfo(tensor)
                self._places[tensor.name] = (int(info.offset or 0), int(info.length or 0))

    @property
    def large(self) -> bool:
        """Whether the weights' file is large enough (64 MiB) that freed memory is worth returning at once."""
        return self._data.exists() and self._data.stat().st_size >= 64 << 20

    def update(self, values: Iterable[ir.Value | None]) -> None:
        """Write these initializers' current arrays over their old bytes (their shape and type are unchanged)."""
        inline = False
        with self._data.open("r+b") as f:
            for value in values:
                if value is None or value.const_value is None or not value.name:
                    continue
                place = self._places.get(value.name)
                data = value.const_value.tobytes()
                if place is None:
                    self._set_inline(value.name, value.const_value.numpy())
                    inline = True
                    continue
                if len(data) != place[1]:
                    raise ValueError(f"weight {value.name!r} changed size ({place[1]} -> {len(data)} bytes)")
                f.seek(place[0])
                f.write(data)
        if inline:
            self.path.write_bytes(self._graph.SerializeToString())

    def _set_inline(self, name: str, array: np.ndarray) -> None:
        """Replace an initializer kept in the model file itself (e.g. an empty tensor)."""
        for tensor in self._graph.graph.initializer:
            if tensor.name == name:
                if tuple(tensor.dims) != array.shape:
                    raise ValueError(f"weight {name!r} changed size ({list(tensor.dims)} -> {list(array.shape)})")
                tensor.CopyFrom(numpy_helper.from_array(np.asarray(array), name))
                return
        raise ValueError(f"weight {name!r} is not in the written model")
