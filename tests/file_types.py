"""Labelled inputs for Google's Magika file-type classifier, made here: files of 18 types, generated from a seed.

Magika (``pip install --no-deps magika``) ships its ONNX model in its wheel. Its input is 2048 byte values: the
first 1024 bytes of the file after leading whitespace and the last 1024 before trailing whitespace, each read
from at most 4096 bytes and padded with the token 256 (Magika's own feature extraction, re-done here so that
nothing but the model file is used). Its output is a probability per content type.
"""

from __future__ import annotations

import gzip
import importlib.metadata as md
import io
import json
import pathlib
import struct
import zipfile
import zlib
from collections.abc import Callable

import numpy as np
import onnx
from onnx import numpy_helper

_MODEL = "magika/models/standard_v3_3"
_WORDS = ["alpha", "beta", "gamma", "delta", "report", "data", "value", "index", "table", "model", "river", "stone"]
_BEG = _END = 1024
_BLOCK, _PAD = 4096, 256


def model_path() -> pathlib.Path | None:
    """The installed Magika model, or None when the magika wheel is not installed."""
    try:
        path = pathlib.Path(str(md.distribution("magika").locate_file(f"{_MODEL}/model.onnx")))
    except md.PackageNotFoundError:
        return None
    return path if path.is_file() else None


def finite_model(path: pathlib.Path) -> onnx.ModelProto:
    """The model with its one -inf constant (the floor of a Max) set to -1e4: the same outputs on real logits.

    The library refuses models holding infinite weights; Max(-inf, x) and Max(-1e4, x) agree for any x above -1e4.
    """
    model = onnx.load(path)
    for tensor in model.graph.initializer:
        array = numpy_helper.to_array(tensor)
        if array.dtype.kind == "f" and not np.isfinite(array).all():
            tensor.CopyFrom(numpy_helper.from_array(np.where(np.isfinite(array), array, -1e4).astype(array.dtype),
                                                    tensor.name))  # fmt: skip
    return model


def features(data: bytes) -> np.ndarray:
    """Magika's 2048 input values of one file."""
    n = min(_BLOCK, len(data))
    beg, end = data[:n].lstrip()[:_BEG], data[len(data) - n :].rstrip()[-_END:]
    return np.asarray([*beg, *[_PAD] * (_BEG - len(beg)), *[_PAD] * (_END - len(end)), *end], np.int32)


def dataset(per_type: int, seed: int = 0) -> dict[str, np.ndarray]:
    """{"bytes": [n, 2048] int32, "labels": [n] class indices}: `per_type` files of each type, shuffled."""
    space = _space()
    rng = np.random.default_rng(seed)
    rows = [(features(make(rng)), space.index(label)) for label, make in _MAKERS.items() for _ in range(per_type)]
    order = rng.permutation(len(rows))
    return {"bytes": np.stack([rows[i][0] for i in order]), "labels": np.asarray([rows[i][1] for i in order])}


_EXTENSIONS = {
    ".py": "python", ".json": "json", ".html": "html", ".xml": "xml", ".csv": "csv", ".sh": "shell",
    ".md": "markdown", ".ini": "ini", ".yaml": "yaml", ".yml": "yaml", ".css": "css", ".js": "javascript",
    ".c": "c", ".h": "c", ".txt": "txt", ".png": "png", ".gz": "gzip", ".zip": "zip", ".pdf": "pdf",
    ".so": "elf", ".pyc": "pythonbytecode", ".rst": "rst", ".svg": "svg", ".gif": "gif", ".jpg": "jpeg",
    ".pem": "pem", ".toml": "toml", ".tex": "latex",
}  # fmt: skip


def real_files(roots: list[pathlib.Path], per_type: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Like `dataset`, from files found under `roots` (at most `per_type` of each type, by extension)."""
    space = _space()
    found: dict[str, list[pathlib.Path]] = {}
    for root in roots:
        for path in sorted(root.rglob("*")):
            label = _EXTENSIONS.get(path.suffix)
            chosen = found.setdefault(label or "", [])
            usable = label in space and len(chosen) < per_type and path.is_file() and not path.is_symlink()
            if usable and path.stat().st_size >= 64:
                chosen.append(path)
    rows = [(features(p.read_bytes()), space.index(label)) for label, paths in found.items() for p in paths]
    order = np.random.default_rng(seed).permutation(len(rows))
    return {"bytes": np.stack([rows[i][0] for i in order]), "labels": np.asarray([rows[i][1] for i in order])}


def _space() -> list[str]:
    config = pathlib.Path(str(md.distribution("magika").locate_file(f"{_MODEL}/config.min.json")))
    return list(json.loads(config.read_text())["target_labels_space"])


def _words(rng: np.random.Generator, n: int) -> list[str]:
    return [str(w) for w in rng.choice(_WORDS, n)]


def _lines(rng: np.random.Generator, make: Callable[[int], str], low: int = 8, high: int = 60) -> bytes:
    return "\n".join(make(i) for i in range(int(rng.integers(low, high)))).encode() + b"\n"


def _python(rng: np.random.Generator) -> bytes:
    head = "import os\nimport sys\n\n\n"
    return head.encode() + _lines(rng, lambda i: (
        f"def {'_'.join(_words(rng, 2))}_{i}(value, count={i}):\n    \"\"\"Return the {_words(rng, 1)[0]}.\"\"\"\n"
        f"    if value > count:\n        return [v * {i} for v in range(count)]\n    return None\n"
    ))  # fmt: skip


def _json(rng: np.random.Generator) -> bytes:
    items = [{w: int(rng.integers(0, 999)), "name": " ".join(_words(rng, 3)), "ok": bool(i % 2)}
             for i, w in enumerate(_words(rng, int(rng.integers(4, 40))))]  # fmt: skip
    return json.dumps({"items": items, "version": int(rng.integers(1, 9))}, indent=2).encode()


def _markup(rng: np.random.Generator, kind: str) -> bytes:
    body = _lines(rng, lambda i: f'  <p id="p{i}">{" ".join(_words(rng, 8))}</p>').decode()
    if kind == "html":
        title = _words(rng, 1)[0]
        return (
            f"<!DOCTYPE html>\n<html>\n<head><title>{title}</title></head>\n<body>\n{body}</body>\n</html>\n".encode()
        )
    items = body.replace("<p ", "<item ").replace("</p>", "</item>")
    return f'<?xml version="1.0" encoding="UTF-8"?>\n<catalog>\n{items}</catalog>\n'.encode()


def _png(rng: np.random.Generator) -> bytes:
    w, h = int(rng.integers(8, 64)), int(rng.integers(8, 64))
    raw = b"".join(b"\x00" + rng.integers(0, 256, w * 3, dtype=np.uint8).tobytes() for _ in range(h))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")


def _zip(rng: np.random.Generator) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for i in range(int(rng.integers(1, 5))):
            archive.writestr(f"{_words(rng, 1)[0]}_{i}.txt", " ".join(_words(rng, 200)))
    return buffer.getvalue()


def _pdf(rng: np.random.Generator) -> bytes:
    text = " ".join(_words(rng, 12))
    objects = [
        "<< /Type /Catalog /Pages 2 0 R >>", "<< /Type /Pages /Kids [3 0 R] /Count 1 >>",
        "<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Contents 4 0 R >>",
        f"<< /Length {len(text) + 20} >>\nstream\nBT /F1 12 Tf ({text}) Tj ET\nendstream",
    ]  # fmt: skip
    body = "".join(f"{i + 1} 0 obj\n{o}\nendobj\n" for i, o in enumerate(objects))
    return f"%PDF-1.4\n{body}trailer\n<< /Root 1 0 R >>\n%%EOF\n".encode()


_MAKERS: dict[str, Callable[[np.random.Generator], bytes]] = {
    "python": _python,
    "json": _json,
    "html": lambda rng: _markup(rng, "html"),
    "xml": lambda rng: _markup(rng, "xml"),
    "csv": lambda rng: _lines(rng, lambda i: ",".join([str(i), *_words(rng, 2), str(rng.integers(0, 1000))])),
    "shell": lambda rng: (
        b"#!/bin/sh\nset -e\n" + _lines(rng, lambda i: f'echo "{" ".join(_words(rng, 3))}" > /tmp/f{i}')
    ),
    "markdown": lambda rng: _lines(rng, lambda i: f"## {' '.join(_words(rng, 3))}\n\n- {' '.join(_words(rng, 6))}\n"),
    "ini": lambda rng: _lines(rng, lambda i: f"[{_words(rng, 1)[0]}{i}]\nname = {_words(rng, 1)[0]}\nsize = {i}\n"),
    "yaml": lambda rng: _lines(rng, lambda i: f"{_words(rng, 1)[0]}_{i}:\n  name: {_words(rng, 1)[0]}\n  size: {i}"),
    "css": lambda rng: _lines(rng, lambda i: f".{_words(rng, 1)[0]}-{i} {{\n  margin: {i}px;\n  color: #{i:06x};\n}}"),
    "javascript": lambda rng: _lines(
        rng, lambda i: f"function {_words(rng, 1)[0]}{i}(a, b) {{\n  const x = a + b * {i};\n  return x;\n}}"
    ),
    "c": lambda rng: (
        b"#include <stdio.h>\n#include <stdlib.h>\n\n"
        + _lines(rng, lambda i: f"static int {_words(rng, 1)[0]}_{i}(int a) {{\n    return a * {i};\n}}\n")
    ),
    "txt": lambda rng: _lines(rng, lambda i: " ".join(_words(rng, 12)).capitalize() + "."),
    "png": _png,
    "gzip": lambda rng: gzip.compress(" ".join(_words(rng, 400)).encode(), mtime=0),
    "zip": _zip,
    "pdf": _pdf,
    "randombytes": lambda rng: rng.integers(0, 256, int(rng.integers(200, 5000)), dtype=np.uint8).tobytes(),
}
