"""The peers' own virtual environments and runner scripts (used by bench/peers.py).

Each peer is installed from PyPI, at pinned versions, into its own virtual environment under a cache folder, and
compresses a model through a small script of this folder run with that environment's Python (the scripts import
only numpy, onnx, `_common.py` and the peer). Nothing of this project is imported there, and nothing of the peers
is imported here: the compressed models come back as files and are measured by bench/peers.py.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

__all__ = ["PEERS", "Peer", "PeerError", "cache_folder", "ensure_env", "run_setting"]

HERE = Path(__file__).resolve().parent
_ORT = "onnxruntime==1.32.0"


@dataclasses.dataclass(frozen=True)
class Peer:
    """A peer tool: what to pip-install, its runner script, and its settings by matched group."""

    name: str
    requirements: tuple[str, ...]
    script: str
    settings: dict[str, str]  # setting -> group ("int8", "prune 50%", "int4", "kmeans 4-bit")


PEERS: dict[str, Peer] = {
    peer.name: peer
    for peer in (
        Peer(
            "onnxsim",
            ("onnxsim==0.8.1", _ORT),
            "run_onnxsim.py",
            {
                "int8 static": "int8",
                "int8 static + bias correction": "int8",
                "int8 static + adaquant": "int8",
                "prune magnitude": "prune 50%",
                "prune magnitude + finetune": "prune 50%",
                "prune wanda": "prune 50%",
                "prune sparsegpt": "prune 50%",
                "int4 rtn": "int4",
                "int4 gptq": "int4",
                "int4 adaround": "int4",
                "kmeans 4-bit": "kmeans 4-bit",
            },
        ),
        Peer(
            "nncf",
            ("nncf==3.4.0", "onnx==1.23.2", _ORT),
            "run_nncf.py",
            {
                "int8 quantize": "int8",
                "int8 accuracy control": "int8",
                "int4 weights": "int4",
                "int4 weights + awq + scale estimation": "int4",
            },
        ),
        Peer(
            "quark",
            ("amd-quark==0.13", _ORT, "torch==2.14.1"),
            "run_quark.py",
            {"int8 recommended": "int8", "int8 adaround": "int8", "int8 adaquant": "int8"},
        ),
        Peer(
            "aimet",
            ("aimet-onnx==2.42.0", _ORT),
            "run_aimet.py",
            {"int8 quantsim": "int8", "int8 adaround": "int8"},
        ),
    )
}


class PeerError(Exception):
    """A peer that could not be installed or could not compress a model; the message is one line."""


def cache_folder(option: str | None) -> Path:
    """Where the environments live: the option, else $ONNX_COMPRESS_PEERS_CACHE, else ~/.cache/onnx-compress-peers."""
    chosen = option or os.environ.get("ONNX_COMPRESS_PEERS_CACHE") or "~/.cache/onnx-compress-peers"
    return Path(chosen).expanduser()


def _python(env: Path) -> Path:
    return env / ("Scripts/python.exe" if os.name == "nt" else "bin/python")


def _first_error_line(text: str) -> str:
    """The line that says what went wrong: pip's first ERROR line, else a traceback's last line, else the last."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("ERROR")]
    return (errors[0] if errors else lines[-1] if lines else "no output")[:300]


def ensure_env(peer: Peer, cache: Path, *, install: bool = True, timeout: float = 1800.0) -> Path:
    """The Python of the peer's environment, created and pip-installed when missing or out of date.

    Raises:
        PeerError: the environment is missing and `install` is false, or creating or installing it failed.
    """
    env = cache / peer.name
    marker = env / "onnx-compress-peers.json"
    wanted = json.dumps(sorted(peer.requirements))
    if marker.is_file() and marker.read_text() == wanted and _python(env).exists():
        return _python(env)
    if not install:
        raise PeerError(f"{peer.name} is not installed in {cache} (run without --no-install)")
    env.parent.mkdir(parents=True, exist_ok=True)
    log = cache / f"{peer.name}.install.log"
    steps = [[sys.executable, "-m", "venv", str(env)], [str(_python(env)), "-m", "pip", "install", *peer.requirements]]
    with log.open("w") as out:
        for step in steps:
            try:
                done = subprocess.run(step, stdout=out, stderr=subprocess.STDOUT, timeout=timeout, check=False)
            except subprocess.TimeoutExpired:
                raise PeerError(f"installing {peer.name} took more than {timeout:.0f} s") from None
            if done.returncode:
                raise PeerError(f"installing {peer.name} failed: {_first_error_line(log.read_text())}")
    marker.write_text(wanted)
    return _python(env)


def run_setting(
    python: Path, peer: Peer, setting: str, model: Path, calibration: Path, family: str, out: Path, timeout: float
) -> tuple[float, str]:
    """Run one setting of a peer in its environment; (seconds, note) when it wrote `out`.

    Raises:
        PeerError: the runner failed (its error's first line), timed out, or wrote nothing.
    """
    with tempfile.TemporaryDirectory(prefix=f"peer-{peer.name}-") as tmp:
        result = Path(tmp) / "result.json"
        command = [str(python), str(HERE / peer.script), "--model", str(model), "--calibration", str(calibration)]
        command += ["--setting", setting, "--family", family, "--out", str(out), "--result", str(result)]
        process = subprocess.Popen(
            command, cwd=tmp, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
        )
        try:
            output, _ = process.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, 9)  # the runner and any worker it started
            process.communicate()
            raise PeerError(f"timed out after {timeout:.0f} s") from None
        if result.is_file():
            reported = json.loads(result.read_text())
            if "error" in reported:
                raise PeerError(str(reported["error"]))
            if out.is_file():
                return float(reported["seconds"]), str(reported.get("note", ""))
        raise PeerError(f"the runner exited with code {process.returncode}: {_first_error_line(output)}")
