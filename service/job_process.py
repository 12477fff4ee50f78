"""One job's own process: limits itself, then compresses the job folder's model and writes the results.

Run as ``python -m service.job_process JOB_DIR --threads N --memory-mb M --file-mb F --cpu-s C``. It sets
its resource limits before importing onnx or ONNX Runtime, so a memory bomb or a runaway model hits the
limit here and fails only this job. Exit codes: 0 done, 3 a known error (error.json written), 4 a bug.

With ``--standby`` instead of JOB_DIR it sets its limits, imports the libraries and then waits for one job
folder on standard input (a line; end of input: exit 0). The worker keeps one such process warm, so a job
does not wait for Python and ONNX Runtime to start; each process still runs exactly one job.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import json
import os
import resource
import signal
import sys
import tempfile
import traceback
from pathlib import Path

from service.job_files import atomic_write
from service.job_upload import drop_upload, model_of

EXIT_OK, EXIT_KNOWN_ERROR, EXIT_BUG = 0, 3, 4
RESULT_FILES = ("output.onnx", "output.zip", "report.json", "report.html")


def _limit(memory_mb: int, file_mb: int, cpu_s: int) -> None:
    # Past the file-size limit the kernel sends SIGXFSZ, which kills by default; ignored, write() fails
    # with EFBIG instead and the job ends with a clear reason.
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    for which, value in (
        (resource.RLIMIT_AS, memory_mb << 20),
        (resource.RLIMIT_FSIZE, file_mb << 20),
        (resource.RLIMIT_CPU, cpu_s),
        (resource.RLIMIT_NOFILE, 256),
        (resource.RLIMIT_CORE, 0),
    ):
        _, hard = resource.getrlimit(which)
        limit = value if hard == resource.RLIM_INFINITY else min(value, hard)
        resource.setrlimit(which, (limit, hard))


def _die_with_parent(parent_pid: int) -> bool:
    """Ask Linux to SIGKILL this process when its supervisor dies (even by SIGKILL); False if it already has."""
    if sys.platform.startswith("linux"):
        import ctypes

        pr_set_pdeathsig = 1
        ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGKILL, 0, 0, 0)
    # The supervisor may have died before prctl took effect: then we were re-parented already.
    return os.getppid() == parent_pid


def _write_json(path: Path, data: dict[str, object]) -> None:
    atomic_write(path, json.dumps(data).encode())


def main(argv: list[str] | None = None) -> int:
    """Run the job in JOB_DIR; see the module docstring."""
    parser = argparse.ArgumentParser()
    parser.add_argument("job_dir", type=Path, nargs="?")
    parser.add_argument("--standby", action="store_true", help="warm up, then read JOB_DIR from stdin")
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--memory-mb", type=int, default=8192)
    parser.add_argument("--file-mb", type=int, default=4096)
    parser.add_argument("--cpu-s", type=int, default=3600)
    parser.add_argument("--max-model-mb", type=int, default=512)
    parser.add_argument("--max-data-mb", type=int, default=256)
    parser.add_argument("--external-data-mb", type=int, default=2048, help="a larger result is returned as a zip")
    parser.add_argument("--parent-pid", type=int, default=0, help="die with this supervising process")
    args = parser.parse_args(argv)
    if (args.job_dir is None) != args.standby:
        parser.error("give either JOB_DIR or --standby")
    os.umask(0o077)  # every file and folder this process creates is private to the server's user
    os.environ["OMP_NUM_THREADS"] = str(args.threads or 1)
    _limit(args.memory_mb, args.file_mb, args.cpu_s)
    if args.parent_pid and not _die_with_parent(args.parent_pid):
        return EXIT_BUG
    # Address space held back so that a job that hits its memory limit still has room to say so.
    reserve: bytearray | None = bytearray(_RESERVE_BYTES)
    warm_up_error: BaseException | None = None
    if args.standby:
        try:
            _warm_up()
        except Exception as e:  # e.g. MemoryError under a small limit: it is the job's failure, told below
            warm_up_error = e
            reserve = None  # the job will only report this failure: give the room back now
        line = _read_line(0)
        if not line:
            return EXIT_OK  # the worker no longer needs this process
        folder = Path(line)
        os.chdir(folder)
        log = os.open(folder / "job.log", os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        os.dup2(log, 1)
        os.dup2(log, 2)
        os.close(log)
    else:
        folder = args.job_dir
    try:
        tmp = folder / "tmp"
        tmp.mkdir(exist_ok=True)
        # ONNX Runtime's calibrator and quant_pre_process write temp files: keep them in the job folder.
        os.environ["TMPDIR"] = str(tmp)
        tempfile.tempdir = None  # forget a temp dir looked up before this job was known
        if warm_up_error is not None:
            raise warm_up_error
        return _run(folder, args)
    except Exception as e:
        del reserve  # room to report the failure in
        out_of_memory = isinstance(e, MemoryError) or _at_memory_limit(args.memory_mb)
        if not isinstance(e, MemoryError):
            with contextlib.suppress(MemoryError):
                traceback.print_exc()
        _discard_results(folder)
        with contextlib.suppress(Exception):  # the job ends here: its upload goes (done already if _run began)
            drop_upload(folder)
        if out_of_memory:
            message = f"the job needed more than its {args.memory_mb} MB of memory"
            _write_json(folder / "error.json", {"code": "out_of_memory", "message": message})
            return EXIT_KNOWN_ERROR
        _write_json(
            folder / "error.json",
            {"code": "internal_error", "message": "the job failed unexpectedly; the server log has details"},
        )
        return EXIT_BUG


_RESERVE_BYTES = 8 << 20


def _read_line(fd: int) -> str:
    """One line from a file descriptor, read without Python's buffered text layer (it allocates more)."""
    data = b""
    while not data.endswith(b"\n"):
        chunk = os.read(fd, 4096)
        if not chunk:
            break
        data += chunk
    return data.decode().strip()


def _at_memory_limit(memory_mb: int) -> bool:
    """True when this process's address space came close to its limit.

    Under a tight limit, running out of memory does not always raise MemoryError: a failed mmap while
    importing an extension module surfaces as ImportError or even SystemError. The peak size tells.
    """
    try:
        status = Path("/proc/self/status").read_text()
    except OSError:
        return False
    for line in status.splitlines():
        if line.startswith("VmPeak:"):
            return int(line.split()[1]) * 1024 >= 0.85 * (memory_mb << 20)
    return False


def _warm_up() -> None:
    """Import what a job needs (after the limits are set), so that it starts at once when it arrives."""
    import onnxruntime.quantization  # noqa: F401

    import onnx_ops.html_report
    import onnx_ops.pipeline  # noqa: F401

    with contextlib.suppress(Exception):  # only a head start: the job itself reports what fails
        _exercise()


def _exercise() -> None:
    """Compress a tiny model once, so that one-time set-up happens before the job arrives.

    ONNX Runtime, the quantizer and the report template each have some (measured: the first compress() in a
    process took 0.4-0.9 s longer than the next ones).
    """
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    from onnx_ops import compress
    from onnx_ops.html_report import render_html

    weight = numpy_helper.from_array(np.linspace(-1, 1, 256, dtype=np.float32).reshape(16, 16), "w")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])],
        "warm_up",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 16])],
        [weight],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    plan = {"steps": [{"kind": "quantize", "mode": "dynamic"}], "evaluation": {"latency_runs": 2, "warmup_runs": 1}}
    render_html(compress(model, plan).report)


def _run(folder: Path, args: argparse.Namespace) -> int:
    # Imported only now, after the limits are set (TMPDIR, set in main, also steers Python's tempfile).
    from onnx_ops import CompressionError, Limits, Report, compress, save_report
    from onnx_ops.html_report import render_html
    from onnx_ops.large import PROTOBUF_LIMIT
    from service.bundles import save_result

    sys.stderr.write(f"job process: memory limit {args.memory_mb} MB, file size limit {args.file_mb} MB\n")
    job = json.loads((folder / "job.json").read_bytes())
    plan = dict(job["plan"])
    evaluation = dict(plan.get("evaluation") or {})
    asked = int(evaluation.get("threads") or 0)  # never more than this server gives a job (--threads)
    evaluation["threads"] = min(asked, args.threads) if asked and args.threads else asked or args.threads
    plan["evaluation"] = evaluation
    capped = f"the plan asked for {asked} threads; this server gives a job {args.threads} (COMPRESS_THREADS_PER_JOB)"
    if asked > evaluation["threads"]:
        sys.stderr.write(capped + "\n")  # the job's log
    limits = Limits(
        max_model_bytes=min(args.max_model_mb << 20, PROTOBUF_LIMIT),
        max_data_bytes=args.max_data_mb << 20,
        max_external_bytes=args.max_model_mb << 20,
    )

    def progress(stage: str, fraction: float) -> None:
        _write_json(folder / "progress.json", {"stage": stage, "fraction": round(fraction, 4)})

    def optional(name: str) -> Path | None:
        path = folder / name
        return path if path.exists() else None

    try:
        model, limits = model_of(folder, limits)
        result = compress(
            model,
            plan,
            calibration=optional("calibration.npz"),
            evaluation=optional("evaluation.npz"),
            limits=limits,
            progress=progress,
            validated=lambda: drop_upload(folder),  # the job has its own copy: the upload's files go
        )
        if asked > evaluation["threads"]:
            result.report.warnings.append(capped)
        progress("writing results", 0.99)
        external = bool(plan.get("external_data"))
        save_result(result, folder, threshold=min(args.external_data_mb << 20, PROTOBUF_LIMIT), external_data=external)
        # The report as it is serialized (bounded: the model's names can be of any length and number);
        # the HTML is rendered from that same bounded report.
        report = Report.model_validate_json(result.report.model_dump_json())
        save_report(report, folder / "report.json")
        atomic_write(folder / "report.html", render_html(report).encode())
    except CompressionError as e:
        _discard_results(folder)
        message = e.message
        if e.code == "out_of_memory":  # the library cannot know the limit this process was given
            message = f"the job needed more than its {args.memory_mb} MB of memory: {message}"
        _write_json(folder / "error.json", {"code": e.code, "message": message})
        return EXIT_KNOWN_ERROR
    except OSError as e:
        _discard_results(folder)  # a result written before the failure must not outlive it
        if e.errno in (errno.EFBIG, errno.ENOSPC):  # the file-size limit or a full disk
            _write_json(
                folder / "error.json",
                {"code": "disk_full", "message": "no room to write the results (disk full or file too large)"},
            )
            return EXIT_KNOWN_ERROR
        raise
    finally:
        drop_upload(folder)  # a job that failed before its model was validated reads it no more either
    progress("done", 1.0)
    return EXIT_OK


def _discard_results(folder: Path) -> None:
    """Remove whatever part of the results was written before a failure (and free its disk space)."""
    for name in RESULT_FILES:
        (folder / name).unlink(missing_ok=True)


if __name__ == "__main__":
    sys.exit(main())
