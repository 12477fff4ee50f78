"""What every peer runner shares: its command line, the calibration feeds, and how it reports.

A runner runs in the peer's own virtual environment (numpy, onnx and the peer's packages; not this project), so
this file imports nothing else from the repository. It is put on the runner's import path by Python itself: a
script's folder is the first entry of sys.path.

Command line of every runner:
    python run_<peer>.py --model IN.onnx --calibration CAL.npz --setting NAME --family cnn|transformer
        --out OUT.onnx --result RESULT.json

The .npz holds one array per model input, the calibration samples stacked on a first axis (each slice is one
ready-to-run feed). RESULT.json gets {"seconds": ..., "note": ...} on success or {"error": "<first line>"}.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["Args", "constants_to_initializers", "feeds", "first_line", "fix_input_shapes", "run"]

Feed = dict[str, np.ndarray]


class Args(argparse.Namespace):
    """The parsed command line."""

    model: Path
    calibration: Path
    setting: str
    family: str
    out: Path
    result: Path


def feeds(path: Path) -> list[Feed]:
    """The calibration samples as a list of feed dicts."""
    with np.load(path) as data:
        arrays = {name: data[name] for name in data.files}
    count = len(next(iter(arrays.values())))
    return [{name: array[i] for name, array in arrays.items()} for i in range(count)]


def first_line(error: BaseException) -> str:
    """The exception's type and the first non-empty line of its message."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return f"{type(error).__name__}: {lines[0] if lines else ''}"[:300]


def run(settings: dict[str, Callable[[Args], str | None]]) -> None:
    """Parse the command line, run the named setting (it writes args.out, returns a note), write the result."""
    parser = argparse.ArgumentParser()
    for name in ("--model", "--calibration", "--out", "--result"):
        parser.add_argument(name, type=Path, required=True)
    parser.add_argument("--setting", required=True, choices=sorted(settings))
    parser.add_argument("--family", default="cnn", choices=["cnn", "transformer"])
    args = parser.parse_args(namespace=Args())
    start = time.perf_counter()
    result: dict[str, Any]
    try:
        note = settings[args.setting](args)
        if not args.out.exists():
            raise RuntimeError("the runner wrote no model")
        result = {"seconds": time.perf_counter() - start, "note": note or ""}
    except BaseException as e:  # every failure is a result: its first line goes back to the benchmark
        traceback.print_exc()
        result = {"error": first_line(e), "seconds": time.perf_counter() - start}
    args.result.write_text(json.dumps(result))
    sys.exit(0 if "error" not in result else 1)


def constants_to_initializers(model: Any) -> Any:
    """The model with its main graph's tensor-valued Constant nodes turned into initializers (same values)."""
    graph = model.graph
    kept = []
    for node in graph.node:
        value = [a for a in node.attribute if a.name == "value"] if node.op_type == "Constant" else []
        if node.domain in ("", "ai.onnx") and len(node.attribute) == 1 and value:
            tensor = value[0].t
            tensor.name = node.output[0]
            graph.initializer.append(tensor)
        else:
            kept.append(node)
    del graph.node[:]
    graph.node.extend(kept)
    return model


def fix_input_shapes(model: Any, feed: Feed) -> Any:
    """The model with each graph input's shape set to the sample's (for tools that cannot take dynamic sizes)."""
    for value in model.graph.input:
        if value.name in feed:
            dims = value.type.tensor_type.shape.dim
            for dim, size in zip(dims, feed[value.name].shape, strict=True):
                dim.Clear()
                dim.dim_value = int(size)
    return model
