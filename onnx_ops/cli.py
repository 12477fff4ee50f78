"""The onnx-compress command line: compress a model by a plan, print the plan schema, inspect a model.

``onnx-compress in.onnx out.onnx`` is short for ``onnx-compress compress in.onnx out.onnx``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
from collections.abc import Sequence
from pathlib import Path

from onnx_ops.errors import CompressionError, PlanError
from onnx_ops.plan import DEFAULT_PLAN, Plan

__all__ = ["main"]

# What a program killed by SIGPIPE reports, as `head` and `less` users expect when they stop reading.
_BROKEN_PIPE = 128 + int(getattr(signal, "SIGPIPE", 13))


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the process exit code (0 ok, 2 bad input, 1 a pass failed)."""
    parser, commands = _parser()
    args = parser.parse_args(_with_command(list(sys.argv[1:] if argv is None else argv), commands))
    if args.func is not _compress:
        logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(message)s")
    try:
        code = int(args.func(args))
        sys.stdout.flush()  # a closed pipe shows here rather than at exit
        return code
    except CompressionError as e:
        print(f"error ({e.code}): {e.message}", file=sys.stderr)  # noqa: T201
        return 1 if e.code == "pass_failed" else 2
    except BrokenPipeError:
        # The reader (e.g. `| head`) stopped reading: quietly stop writing. stdout goes to /dev/null so that
        # the interpreter's own flush at exit does not fail again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return _BROKEN_PIPE


def _with_command(argv: list[str], commands: set[str]) -> list[str]:
    """`onnx-compress in.onnx out.onnx` (as onnxslim and Olive users type it) means `compress in.onnx out.onnx`."""
    if not commands & set(argv) and any(a.lower().endswith(".onnx") for a in argv if not a.startswith("-")):
        return ["compress", *argv]  # compress takes every option the program does
    return argv


def _parser() -> tuple[argparse.ArgumentParser, set[str]]:
    parser = argparse.ArgumentParser(prog="onnx-compress", description=__doc__)
    parser.add_argument(
        "-v", "--verbose", action="count", default=0, help="log what each step does (-vv: ONNX Runtime's logs too)"
    )
    sub = parser.add_subparsers(required=True, metavar="COMMAND")
    run = sub.add_parser("compress", help="compress a model by a plan and write a report")
    run.add_argument("model", type=Path, help=".onnx file (external data files, if any, beside it in its folder)")
    run.add_argument("output", type=Path, nargs="?", help="where to write the compressed model (or -o)")
    run.add_argument("-o", "--output", type=Path, dest="output_option", metavar="OUTPUT", help="same as OUTPUT")
    run.add_argument(
        "--plan",
        help="plan JSON file, or inline JSON text (default: dynamic int8 quantization, which needs no data)",
    )
    run.add_argument("-q", "--quiet", action="store_true", help="no progress on stderr")
    run.add_argument("-v", "--verbose", action="count", default=argparse.SUPPRESS, help="as before the command")
    run.add_argument("--calibration", type=Path, help=".npz calibration data (static quantization)")
    run.add_argument("--eval", type=Path, dest="evaluation", help=".npz evaluation data, optionally with 'labels'")
    run.add_argument(
        "--external-data",
        action="store_true",
        help="write the output's weights to OUTPUT.data beside it (done anyway past protobuf's 2 GiB limit; the "
        "plan's external_data asks the same)",
    )
    run.add_argument("--report", type=Path, help="write the JSON report here")
    run.add_argument("--report-html", type=Path, help="write the HTML report (with charts) here")
    run.add_argument(
        "--input-shape",
        action="append",
        default=[],
        metavar="NAME=D0,D1,...",
        help="shape of one sample of an input with symbolic dimensions (repeatable); overrides the plan's",
    )
    run.set_defaults(func=_compress, usage_error=run.error)
    schema = sub.add_parser("plan-schema", help="print the plan's JSON schema (every field, documented)")
    schema.set_defaults(func=lambda args: print(json.dumps(Plan.model_json_schema(), indent=2)) or 0)  # noqa: T201
    inspect = sub.add_parser("inspect", help="validate a model and list its inputs, ops and weights")
    inspect.add_argument("model", type=Path)
    inspect.set_defaults(func=_inspect)
    try:  # the service's commands, when its extra is installed (onnx_ops itself never imports it)
        from service.cli import add_commands
    except ImportError:
        pass
    else:
        add_commands(sub)
    return parser, set(sub.choices)


def _compress(args: argparse.Namespace) -> int:
    # Imported here so `plan-schema` and `--help` answer without loading ONNX Runtime.
    from onnx_ops.cli_progress import ProgressDisplay
    from onnx_ops.html_report import render_html
    from onnx_ops.pipeline import compress, save_report
    from onnx_ops.validate import Limits

    output = _output(args)
    display = None if args.quiet else ProgressDisplay(sys.stderr, terminal=sys.stderr.isatty())
    _quiet_libraries(args.verbose, display.log_handler() if display else logging.StreamHandler())
    if args.plan is None:
        print(f"plan: {DEFAULT_PLAN} (the default; give --plan to choose another)", file=sys.stderr)  # noqa: T201
    plan = _read_plan(DEFAULT_PLAN if args.plan is None else args.plan, args.input_shape)
    try:
        # The user's own data files: checked, then read where they are (no copy of a model's weights on disk).
        limits = Limits(share_external_data=True)
        result = compress(
            args.model, plan, calibration=args.calibration, evaluation=args.evaluation, limits=limits, progress=display
        )
    finally:
        if display is not None:
            display.close()
    wanted = args.external_data or bool(result.report.plan.get("external_data"))
    result.save(output, external_data=True if wanted else None)
    if args.report:
        save_report(result.report, args.report)
    if args.report_html:
        args.report_html.write_text(render_html(result.report), encoding="utf-8")
    print(_summary(result.report))  # noqa: T201
    return 0


def _output(args: argparse.Namespace) -> Path:
    given: list[Path] = [path for path in (args.output, args.output_option) if path is not None]
    if not given:
        args.usage_error("give where to write the compressed model: `compress in.onnx out.onnx` or `-o out.onnx`")
    if len(given) == 2 and given[0] != given[1]:
        args.usage_error(f"two outputs given ({given[0]} and -o {given[1]}); give one")
    return given[0]


def _quiet_libraries(verbose: int, handler: logging.Handler) -> None:
    """Our warnings (and with -v our steps) on stderr; ONNX Runtime's own log lines only with -vv."""
    handler.setFormatter(logging.Formatter("%(levelname)s %(message)s"))
    if verbose < 2:
        handler.addFilter(lambda record: record.name.startswith("onnx_ops") or record.levelno >= logging.ERROR)
        import onnxruntime as ort

        ort.set_default_logger_severity(3)  # sessions ONNX Runtime's tools open (calibration, pre-processing)
    root = logging.getLogger()
    root.addHandler(handler)
    root.setLevel(logging.INFO if verbose >= 2 else logging.WARNING)
    logging.getLogger("onnx_ops").setLevel(logging.INFO if verbose else logging.WARNING)


def _read_plan(text: str, input_shapes: list[str]) -> Plan:
    from onnx_ops.pipeline import parse_plan

    path = Path(text)
    if not text.lstrip().startswith("{"):
        if not path.is_file():
            raise PlanError(f"--plan: no such file {text!r} (give a JSON file or inline JSON text)")
        text = path.read_text(encoding="utf-8")
    try:
        raw = json.loads(text)
    except json.JSONDecodeError as e:
        raise PlanError(f"--plan is not valid JSON: {e}") from e
    if input_shapes and isinstance(raw, dict):
        shapes = dict(raw.get("input_shapes") or {})
        for item in input_shapes:
            name, _, dims = item.partition("=")
            try:
                shapes[name] = [int(d) for d in dims.split(",")]
            except ValueError as e:
                raise PlanError(f"--input-shape {item!r}: expected NAME=D0,D1,... with integer dimensions") from e
        raw["input_shapes"] = shapes
    return parse_plan(raw)


def _summary(report: object) -> str:
    from onnx_ops.report import Report
    from onnx_ops.timing import basis_text, speed_text

    assert isinstance(report, Report)
    b, a = report.before, report.after
    lines = [
        f"size        {b.size_bytes:>12,} -> {a.size_bytes:>12,} bytes  ({b.size_bytes / a.size_bytes:.2f}x smaller)",
        f"gzip        {b.gzip_bytes:>12,} -> {a.gzip_bytes:>12,} bytes  ({b.gzip_bytes / a.gzip_bytes:.2f}x smaller)"
        + (", estimated from samples" if b.gzip_estimated or a.gzip_estimated else ""),
        f"parameters  {b.parameters:>12,} -> {a.parameters:>12,}        "
        f"(zeros {b.zero_fraction:.1%} -> {a.zero_fraction:.1%})",
        f"latency p50 {report.latency_before.p50_ms:>12.3f} -> {report.latency_after.p50_ms:>12.3f} ms     "
        f"(wall-clock, {report.host['threads']} threads, interleaved)",
    ]
    if report.latency is not None:
        lines.append(f"speed       {speed_text(report.latency)}, on {basis_text(report.latency)}")
    for out in report.agreement.outputs:
        top1 = "" if out.top1_agreement is None else f", top-1 agreement {out.top1_agreement:.1%}"
        lines.append(
            f"output {out.name!r}: cosine {out.cosine:.5f}, max abs err {out.max_abs_err:.4g}, "
            f"SNR {out.snr_db:.1f} dB{top1}"
        )
    acc = report.agreement.accuracy
    if acc:
        lines.append(
            f"accuracy    {acc.before:.2%} -> {acc.after:.2%} on {acc.samples} labels "
            f"(drop {acc.drop_points:.2f} points)"
        )
    lines.append(f"data: {report.data.source} ({report.data.samples} samples)")
    lines += [f"warning: {w}" for w in report.warnings]
    return "\n".join(lines)


def _inspect(args: argparse.Namespace) -> int:
    import onnxruntime as ort

    from onnx_ops.data import input_specs
    from onnx_ops.evaluate import Runner, model_stats
    from onnx_ops.validate import load_model

    if args.verbose < 2:
        ort.set_default_logger_severity(3)
    model = load_model(args.model)
    Runner(model)  # ONNX Runtime must accept it too
    stats = model_stats(model)
    info = {
        "inputs": [{"name": s.name, "dtype": str(s.dtype), "shape": list(s.shape)} for s in input_specs(model)],
        "outputs": [o.name for o in model.graph.output],
        **stats.model_dump(),
    }
    print(json.dumps(info, indent=2))  # noqa: T201
    return 0


if __name__ == "__main__":
    sys.exit(main())
