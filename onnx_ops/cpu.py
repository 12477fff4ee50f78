"""Pre-flight note on this CPU: does it have the int8 instructions that make int8 models pay off?

Read from /proc/cpuinfo flags on Linux (x86 ``flags``, ARM ``Features``); elsewhere the note says the
features are unknown instead of guessing. The settings listed as slow are the ones this project measured
slow on x86 or ONNX Runtime documents as slow; nothing here is estimated for the report's figures.
"""

from __future__ import annotations

import platform
from pathlib import Path

from onnx_ops.report import CpuNote

__all__ = ["cpu_note"]

_CPUINFO = Path("/proc/cpuinfo")
# Report name -> /proc/cpuinfo flags that mean it (any one of them).
_X86 = {
    "avx2": ("avx2",),
    "avx512": ("avx512f",),
    "avx512_vnni": ("avx512_vnni",),
    "avx_vnni": ("avx_vnni",),
    "amx_int8": ("amx_int8",),
}
_ARM = {"arm_dotprod": ("asimddp",), "arm_i8mm": ("i8mm",), "arm_sve": ("sve",)}


def cpu_note(cpuinfo: str | None = None) -> CpuNote:
    """Int8-relevant features of this CPU and the quantization settings known to be slow on it.

    Args:
        cpuinfo: Text of /proc/cpuinfo (read from the system when None; tests pass their own).
    """
    if cpuinfo is None:
        try:
            cpuinfo = _CPUINFO.read_text(encoding="utf-8", errors="replace")
        except OSError:
            cpuinfo = ""
    flags = _flags(cpuinfo)
    machine = platform.machine().lower() or "unknown"
    arm = any(key in cpuinfo for key in ("Features\t", "CPU implementer")) or machine in ("aarch64", "arm64")
    table = _ARM if arm else _X86
    if not flags:
        return CpuNote(
            arch=machine,
            features={},
            known=False,
            int8_fast=None,
            slow_settings=_x86_slow(False) if not arm else [],
            note="CPU features could not be read on this system (no /proc/cpuinfo flags); whether int8 pays "
            "off here is unknown: compare latencies in the report.",
        )
    features = {name: any(f in flags for f in wanted) for name, wanted in table.items()}
    if arm:
        fast = features["arm_dotprod"]
        note = (
            "ARM dot-product instructions (asimddp) are present: int8 matrix products have a fast path."
            if fast
            else "no ARM dot-product instructions (asimddp): int8 gains here are small; measure before shipping."
        )
        slow = [] if fast else ["int8 MatMul/Conv without dot-product instructions gain little over float"]
        return CpuNote(arch=machine, features=features, known=True, int8_fast=fast, slow_settings=slow, note=note)
    vnni = features["avx512_vnni"] or features["avx_vnni"]
    if features["amx_int8"]:
        note = "AMX int8 tiles and VNNI are present: int8 matrix products run on the fastest x86 paths."
    elif vnni:
        note = "VNNI is present (" + ", ".join(n for n in ("avx512_vnni", "avx_vnni") if features[n]) + "): "
        note += "uint8 x int8 products run in one instruction, so static QDQ and dynamic MatMul int8 pay off."
    else:
        note = (
            "no VNNI: int8 products need several instructions and can saturate; gains from int8 are smaller, "
            "and reduce_range (7-bit weights) avoids saturation."
        )
    return CpuNote(
        arch=machine, features=features, known=True, int8_fast=vnni or features["amx_int8"],
        slow_settings=_x86_slow(vnni), note=note,
    )  # fmt: skip


def _flags(cpuinfo: str) -> set[str]:
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            return set(value.split())
    return set()


def _x86_slow(vnni: bool) -> list[str]:
    slow = [
        "dynamic quantization of Conv (ConvInteger): ran 1.2-6x slower than float Conv on x86 here",
        "int8 (signed) activations in static QDQ: ran 1.4-2.4x slower than uint8 activations on x86 here",
        "int8 activations with int8 weights in QOperator format: documented slow on x86 by ONNX Runtime",
    ]
    if not vnni:
        slow.append("uint8 x int8 without reduce_range: may saturate on CPUs without VNNI (AVX2/AVX512 only)")
    return slow
