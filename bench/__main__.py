"""Run the whole benchmark: real models against ONNX Runtime's tools, then the service's own figures.

Run from the repository root (see bench/README.md for the set-up step):

    python -m bench [--only KEY ...] [--runs 30] [--skip-service] [--upload-gib 1] [--out bench/results]
"""

from __future__ import annotations

import argparse
from pathlib import Path

from bench import compare, output, service_bench, tasks


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="*", default=None, help=f"models: {' '.join(tasks.BUILDERS)}")
    parser.add_argument("--runs", type=int, default=30, help="timed runs per latency block (3 blocks per ratio)")
    parser.add_argument("--skip-models", action="store_true", help="only the service figures")
    parser.add_argument("--skip-service", action="store_true", help="only the model figures")
    parser.add_argument("--upload-gib", type=float, default=1.0, help="size of the streamed upload")
    parser.add_argument("--repeats", type=int, default=3, help="HTTP/library job timings per model")
    parser.add_argument("--bert-layers", type=int, default=4, help="layers of the BERT-sized model sent as a job")
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    args = parser.parse_args()
    result = {"environment": compare.environment()}
    if not args.skip_models:
        result["models"] = compare.run_models(args.only, args.runs)
    if not args.skip_service:
        result |= service_bench.run(args.upload_gib, args.repeats, args.bert_layers)
    output.write(result, args.out)


if __name__ == "__main__":
    main()
