"""Peak memory of each pass alone (no validation, no measurement), on the transformer-shaped models of bench.memory.

Usage, from the repository root:

    python -m bench.pass_memory [--models enc100] [--passes quantize prune svd ...] [--load proto mapped]

Each pass runs in a child process on the model loaded one of two ways: ``proto`` (the file parsed into a
ModelProto and wrapped by the IR: every weight lives in the proto's arena, counted once loaded) or ``mapped``
(the weights in a data file beside the model, each a copy-on-write memory map: pages count as the pass reads
them, so up to one copy of the weights is part of the figure). The figure is the child's peak RSS while the pass
runs, above its RSS once the model is loaded, over the model file's size.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import gc
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.memory import MODELS, model_file

PLANS: dict[str, dict[str, object]] = {
    "quantize": {"kind": "quantize", "mode": "dynamic"},
    "quantize-nocheck": {"kind": "quantize", "mode": "dynamic", "speed_check": False},
    "svd": {"kind": "svd", "energy": 0.99},
    "prune": {"kind": "prune", "sparsity": 0.5},
    "prune-global": {"kind": "prune", "sparsity": 0.5, "scope": "global"},
    "cluster": {"kind": "cluster", "bits": 4},
    "int4": {"kind": "int4"},
    "fp16": {"kind": "fp16"},
}


def _status(key: str) -> float:
    with open("/proc/self/status", encoding="ascii") as f:
        return int(next(line for line in f if line.startswith(key)).split()[1]) * 1024 / 1e6


def _mapped(path: str) -> object:
    """The model with each weight a copy-on-write memory map of its data file (pages read as a pass touches them)."""
    import numpy as np
    import onnx
    import onnx_ir as ir

    model = ir.from_proto(onnx.load(path, load_external_data=False))
    folder = Path(path).parent
    for value in model.graph.initializers.values():
        tensor = value.const_value
        if isinstance(tensor, ir.ExternalTensor) and tensor.size:
            shape = tuple(int(d) for d in tensor.shape.numpy())
            dtype = np.dtype(tensor.dtype.numpy()).newbyteorder("<")
            array = np.memmap(folder / tensor.location, dtype=dtype, mode="c", offset=tensor.offset or 0, shape=shape)
            value.const_value = ir.Tensor(array, dtype=tensor.dtype, name=tensor.name)
    return model


def _child(path: str, load: str, step_name: str) -> dict[str, float]:
    import onnx
    import onnx_ir as ir

    from onnx_ops.passes._base import PassContext
    from onnx_ops.pipeline import parse_plan
    from onnx_ops.run_plan import _pass_registry

    plan = parse_plan({"steps": [PLANS[step_name]]})
    step = plan.steps[0]
    imported = _status("VmRSS:")
    model = ir.from_proto(onnx.load(path)) if load == "proto" else _mapped(path)
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):  # glibc only: give freed pages back
        ctypes.CDLL(None).malloc_trim(0)
    loaded = _status("VmRSS:")
    with open("/proc/self/clear_refs", "w", encoding="ascii") as f:
        f.write("5")  # the high-water mark starts again from here
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as workdir:
        step_pass = _pass_registry()[type(step)](step, PassContext(workdir=Path(workdir)))
        step_pass.precheck(model)
        step_pass(model)
    seconds = time.perf_counter() - start
    return {"imported_mb": imported, "loaded_mb": loaded, "peak_mb": _status("VmHWM:"), "seconds": seconds}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="*", default=["enc100"], choices=list(MODELS))
    parser.add_argument("--passes", nargs="*", default=list(PLANS), choices=list(PLANS))
    parser.add_argument("--load", nargs="*", default=["proto", "mapped"], choices=["proto", "mapped"])
    parser.add_argument("--dir", type=Path, default=Path(tempfile.gettempdir()) / "bench-memory", help="model files")
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(_child(*args.child)))
        return
    print("| model | file | load | pass | loaded RSS | pass peak above loaded / file | time |")
    print("|---|---|---|---|---|---|---|")
    for name in args.models:
        path = model_file(name, args.dir)
        size = path.stat().st_size / 1e6
        mapped = args.dir / "mapped" / path.name
        if "mapped" in args.load and not mapped.is_file():
            import onnx_ir as ir

            mapped.parent.mkdir(exist_ok=True)
            ir.save(ir.load(path), mapped, external_data=f"{mapped.name}.data")
        for load in args.load:
            for step in args.passes:
                source = str(path if load == "proto" else mapped)
                cmd = [sys.executable, "-m", "bench.pass_memory", "--child", source, load, step]
                done = subprocess.run(cmd, capture_output=True, text=True, check=False)
                if done.returncode:
                    print(f"| {name} | {size:.0f} MB | {load} | {step} | failed: {done.stderr.strip()[-200:]} | | |")
                    continue
                found = json.loads(done.stdout.strip().splitlines()[-1])
                above = (found["peak_mb"] - found["loaded_mb"]) / size
                row = f"| {name} | {size:.0f} MB | {load} | {step} | {found['loaded_mb']:.0f} MB | {above:.2f}x "
                print(row + f"| {found['seconds']:.0f} s |", flush=True)


if __name__ == "__main__":
    main()
