"""Bounded load test of the service on loopback: many concurrent uploads, CPU-heavy jobs, status latency.

    python bench/load_test.py --mode embedded|redis|both --uploads 200 --clients 50

Starts the server itself (a temp data dir, a free loopback port): `embedded` runs `onnx-compress serve` with its
in-process worker; `redis` runs redis-server, `serve --no-worker` and two `worker` processes. Settings are tight
(few uploads in flight, a short queue) so that refusals happen. Every client thread submits uploads from a shared
budget; a 503 must carry Retry-After, and the client retries after it a few times. Meanwhile a poller measures
GET /api/jobs/{id} and /healthz. At the end every accepted job must finish and be intact on disk.

Exits 1 when a job is lost, a job folder is incomplete, or any answer other than 202/503(+Retry-After) appears.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import json
import os
import random
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

import models  # noqa: E402 - the shared test model builders

TERMINAL = frozenset({"succeeded", "failed"})


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Stack:
    """The server processes of one mode, in a temp dir; stop() always ends every one of them."""

    def __init__(self, mode: str, tmp: Path, env: dict[str, str]) -> None:
        self.mode, self.tmp, self.data = mode, tmp, tmp / "data"
        self.port = _free_port()
        self.env = {**os.environ, **env, "COMPRESS_DATA_DIR": str(self.data), "PYTHONPATH": str(ROOT)}
        self.procs: list[tuple[str, subprocess.Popen[bytes]]] = []

    def _start(self, name: str, args: list[str]) -> None:
        log = open(self.tmp / f"{name}.log", "wb")  # noqa: SIM115 - lives as long as the process
        proc = subprocess.Popen(args, env=self.env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        self.procs.append((name, proc))

    def start(self, workers: int) -> None:
        cli = [sys.executable, "-m", "onnx_ops.cli"]
        if self.mode == "redis":
            redis = shutil.which("redis-server")
            if redis is None:
                raise SystemExit("redis-server is not installed")
            redis_port = _free_port()
            self.env["COMPRESS_REDIS_URL"] = f"redis://127.0.0.1:{redis_port}/0"
            self._start(
                "redis",
                [redis, "--port", str(redis_port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
            )
            self._start("api", [*cli, "serve", "--no-worker", "--port", str(self.port)])
            for i in range(workers):
                self._start(f"worker{i}", [*cli, "worker"])
        else:
            self._start("api", [*cli, "serve", "--port", str(self.port)])
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            for name, proc in self.procs:
                if proc.poll() is not None:
                    raise RuntimeError(f"{name} exited with {proc.returncode}; see {self.tmp / (name + '.log')}")
            with contextlib.suppress(OSError):
                status, _, _ = request("GET", f"{self.url}/healthz", timeout=2)
                if status == 200:
                    return
            time.sleep(0.2)
        raise RuntimeError("the API did not answer /healthz within 60 s")

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        for _, proc in reversed(self.procs):
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
        for _, proc in self.procs:
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def request(
    method: str, url: str, body: bytes | None = None, headers: dict[str, str] | None = None, timeout: float = 60
) -> tuple[int, dict[str, str], bytes]:
    """(status, headers, body) of one HTTP request; HTTP errors are answers, not exceptions."""
    req = urllib.request.Request(url, data=body, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, dict(r.headers), r.read()
    except urllib.error.HTTPError as e:
        with e:
            return e.code, dict(e.headers), e.read()


def _read_response(sock: socket.socket, buffered: bytes = b"") -> tuple[int, dict[str, str], bytes, bytes]:
    """(status, headers, body, bytes after it) of one response read from the socket (Content-Length bodies)."""
    data = buffered
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError(f"the server closed the connection before answering ({len(data)} bytes)")
        data += chunk
    head, _, rest = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    length = int(headers.get("content-length", "0"))
    while len(rest) < length:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError("the server closed the connection in the middle of its answer")
        rest += chunk
    return status, headers, rest[:length], rest[length:]


def post_upload(
    port: int, body: bytes, boundary: str, expect_continue: bool, timeout: float = 120
) -> tuple[int, dict[str, str], bytes]:
    """POST /api/jobs over a raw socket; with Expect: 100-continue the body is sent only once the server asks.

    Waiting for "100 Continue" spares a refused client sending its body at all (curl does it for large
    bodies); without it (--no-expect) the server reads and discards a refused body for a few seconds so that
    the client still gets to read the 503.
    """
    head = (
        f"POST /api/jobs HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n"
        f"Content-Type: multipart/form-data; boundary={boundary}\r\nContent-Length: {len(body)}\r\n"
        + ("Expect: 100-continue\r\n" if expect_continue else "")
        + "\r\n"
    ).encode()
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        if not expect_continue:
            sock.sendall(head + body)
            status, headers, answer, _ = _read_response(sock)
            return status, headers, answer
        sock.sendall(head)
        status, headers, answer, rest = _read_response(sock)
        if status != 100:
            return status, headers, answer
        sock.sendall(body)
        status, headers, answer, _ = _read_response(sock, rest)
        return status, headers, answer


def multipart(model: bytes, plan: dict[str, Any]) -> tuple[bytes, str]:
    """A multipart/form-data body with the plan and model parts, and its boundary."""
    boundary = uuid.uuid4().hex
    head = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="plan"\r\n\r\n{json.dumps(plan)}\r\n'
        f'--{boundary}\r\nContent-Disposition: form-data; name="model"; filename="mlp.onnx"\r\n'
        "Content-Type: application/octet-stream\r\n\r\n"
    ).encode()
    return head + model + f"\r\n--{boundary}--\r\n".encode(), boundary


@dataclass
class Tally:
    """Everything the clients and the poller saw (appended under one lock)."""

    lock: threading.Lock = field(default_factory=threading.Lock)
    accepted: list[str] = field(default_factory=list)
    first_try_refused: int = 0
    refusals: int = 0  # every 503 answer, retries included
    refusals_without_retry_after: int = 0
    refusal_reasons: collections.Counter[str] = field(default_factory=collections.Counter)
    accepted_after_retry: int = 0
    finally_refused: int = 0
    errors: list[str] = field(default_factory=list)  # anything but 202 / 503
    upload_s: list[float] = field(default_factory=list)
    status_s: list[float] = field(default_factory=list)
    health_s: list[float] = field(default_factory=list)
    poll_errors: list[str] = field(default_factory=list)


def client(port: int, body: bytes, boundary: str, budget: list[int], tally: Tally, args: argparse.Namespace) -> None:
    """Take uploads from the shared budget until it is spent; retry 503s after Retry-After."""
    retries, retry_cap = args.retries, args.retry_cap
    while True:
        with tally.lock:
            if budget[0] <= 0:
                return
            budget[0] -= 1
        for attempt in range(retries + 1):
            started = time.monotonic()
            try:
                status, answer_headers, answer = post_upload(port, body, boundary, not args.no_expect)
            except OSError as e:
                with tally.lock:
                    tally.errors.append(f"connection error: {e!r}")
                break
            elapsed = time.monotonic() - started
            if status == 202:
                with tally.lock:
                    tally.accepted.append(json.loads(answer)["id"])
                    tally.upload_s.append(elapsed)
                    tally.accepted_after_retry += attempt > 0
                break
            if status != 503:
                with tally.lock:
                    tally.errors.append(f"POST /api/jobs -> {status}: {answer[:200]!r}")
                break
            retry_after = answer_headers.get("retry-after")
            with tally.lock:
                tally.refusals += 1
                tally.first_try_refused += attempt == 0
                tally.refusal_reasons[_message(answer)] += 1
                if retry_after is None or not retry_after.isdigit():
                    tally.refusals_without_retry_after += 1
            if attempt == retries:
                with tally.lock:
                    tally.finally_refused += 1
                break
            # Honour Retry-After (capped for a bounded run), with jitter so the clients do not return in lockstep.
            wait = min(float(retry_after or 5), retry_cap)
            time.sleep(wait * random.uniform(0.8, 1.2))


def _message(answer: bytes) -> str:
    try:
        return str(json.loads(answer)["error"]["message"])
    except (ValueError, KeyError, TypeError):
        return answer[:80].decode("utf-8", "replace")


def poller(url: str, tally: Tally, stop: threading.Event) -> None:
    """GET a random accepted job and /healthz in turns, recording each answer's latency."""
    while not stop.is_set():
        with tally.lock:
            job_id = random.choice(tally.accepted) if tally.accepted else None
        for path, sink in ((f"/api/jobs/{job_id}", tally.status_s), ("/healthz", tally.health_s)):
            if job_id is None and path.startswith("/api"):
                continue
            started = time.monotonic()
            try:
                status, _, answer = request("GET", url + path, timeout=30)
            except OSError as e:
                tally.poll_errors.append(f"GET {path}: {e!r}")
                continue
            elapsed = time.monotonic() - started
            if status != 200:
                tally.poll_errors.append(f"GET {path} -> {status}: {answer[:200]!r}")
            sink.append(elapsed)
        stop.wait(0.02)


def _pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))] * 1000


def wait_for_jobs(url: str, ids: list[str], timeout: float) -> dict[str, dict[str, Any]]:
    """The last record of every accepted job, polling until all are finished or the deadline passes."""
    records: dict[str, dict[str, Any]] = {}
    deadline = time.monotonic() + timeout
    pending = list(ids)
    while pending and time.monotonic() < deadline:
        still = []
        for job_id in pending:
            status, _, answer = request("GET", f"{url}/api/jobs/{job_id}", timeout=30)
            records[job_id] = json.loads(answer) if status == 200 else {"state": f"http {status}"}
            if records[job_id].get("state") not in TERMINAL:
                still.append(job_id)
        pending = still
        if pending:
            time.sleep(1)
    return records


def check_disk(jobs_dir: Path, ids: list[str], records: dict[str, dict[str, Any]]) -> list[str]:
    """Problems on disk: accepted jobs without a folder, folders without a record, missing or half-written results."""
    problems = []
    folders = {p.name for p in jobs_dir.iterdir() if p.is_dir()}
    for job_id in ids:
        folder = jobs_dir / job_id
        if job_id not in folders:
            problems.append(f"{job_id}: accepted but its folder is gone")
            continue
        if not (folder / "job.json").is_file():
            problems.append(f"{job_id}: no job.json")
        state = records.get(job_id, {}).get("state")
        for result in ("output.onnx", "report.json", "report.html"):
            present = (folder / result).is_file() and (folder / result).stat().st_size > 0
            if state == "succeeded" and not present:
                problems.append(f"{job_id}: succeeded without {result}")
        leftovers = [p.name for p in folder.iterdir() if p.name.startswith(".") and ".tmp" in p.name]
        if leftovers:
            problems.append(f"{job_id}: temp files left in the job folder: {leftovers}")
    strays = folders - set(ids)
    problems.extend(f"{name}: a folder of no accepted upload (a refused upload left behind?)" for name in strays)
    return problems


def run(mode: str, args: argparse.Namespace) -> bool:
    """One load run against a fresh stack; prints the summary and returns True when nothing went wrong."""
    sizes = tuple(int(s) for s in args.sizes.split(","))
    model = models.mlp(sizes).SerializeToString()
    plan = {
        "steps": [
            {"kind": "prune", "method": "unstructured", "sparsity": 0.5},
            {"kind": "quantize", "mode": "dynamic"},
        ],
        "evaluation": {"latency_runs": args.latency_runs, "warmup_runs": 2},
    }
    body, boundary = multipart(model, plan)
    env = {
        "COMPRESS_MAX_UPLOADS_IN_FLIGHT": str(args.max_in_flight),
        # Every client thread connects from 127.0.0.1: one address may use every slot here.
        "COMPRESS_MAX_UPLOADS_PER_CLIENT": str(args.max_in_flight),
        "COMPRESS_MAX_QUEUED_JOBS": str(args.max_queued),
        "COMPRESS_HEARTBEAT_S": "1",
        "COMPRESS_MIN_FREE_DISK_MB": "256",
    }
    if mode == "redis":
        env["COMPRESS_THREADS_PER_JOB"] = "1"  # two worker processes on this host share its cores
    tmp = Path(tempfile.mkdtemp(prefix=f"load-{mode}-"))
    stack = Stack(mode, tmp, env)
    tally = Tally()
    ok = False
    try:
        stack.start(workers=2)
        stop = threading.Event()
        watcher = threading.Thread(target=poller, args=(stack.url, tally, stop), daemon=True)
        watcher.start()
        started = time.monotonic()
        budget = [args.uploads]
        clients = [
            threading.Thread(
                target=client,
                args=(stack.port, body, boundary, budget, tally, args),
                daemon=True,
            )
            for _ in range(args.clients)
        ]
        for t in clients:
            t.start()
        for t in clients:
            t.join()
        uploads_done = time.monotonic() - started
        records = wait_for_jobs(stack.url, tally.accepted, args.wait_timeout)
        elapsed = time.monotonic() - started
        stop.set()
        watcher.join(timeout=60)
        status, _, listing = request("GET", f"{stack.url}/api/jobs", timeout=60)
        listed = {j["id"] for j in json.loads(listing)} if status == 200 else set()
        problems = check_disk(stack.data / "jobs", tally.accepted, records)
        lost = [i for i in tally.accepted if i not in listed]
        states = collections.Counter(r.get("state") for r in records.values())
        codes = collections.Counter(r["error"]["code"] for r in records.values() if r.get("error"))
        unfinished = [i for i, r in records.items() if r.get("state") not in TERMINAL]
        handled = len(tally.accepted) + tally.finally_refused + len(tally.errors)
        print(f"\n=== {mode}: {args.uploads} uploads of {len(model) / 1e6:.1f} MB from {args.clients} clients ===")
        print(f"server: max_uploads_in_flight={args.max_in_flight} max_queued_jobs={args.max_queued}", end="")
        print(" workers=" + ("1 embedded" if mode == "embedded" else "2 processes (1 thread/job) + redis"))
        print(f"job: MLP {args.sizes}, prune unstructured 0.5 + quantize dynamic, latency_runs={args.latency_runs}")
        print(
            f"uploads: accepted {len(tally.accepted)} ({tally.accepted_after_retry} after a retry), "
            f"finally refused {tally.finally_refused}, errors {len(tally.errors)}; accounted {handled}/{args.uploads}"
        )
        print(
            f"503 answers: {tally.refusals} ({tally.first_try_refused} on the first try), "
            f"with Retry-After: {'yes' if tally.refusals_without_retry_after == 0 else 'NO'} "
            f"({tally.refusals - tally.refusals_without_retry_after}/{tally.refusals})"
        )
        for reason, n in tally.refusal_reasons.most_common():
            print(f"  {n:4d} x {reason}")
        print(
            f"jobs: succeeded {states.get('succeeded', 0)}, failed {states.get('failed', 0)} {dict(codes) or ''}, "
            f"other {len(unfinished)} {dict(collections.Counter(records[i].get('state') for i in unfinished))}"
        )
        print(f"lost (accepted but not listed): {len(lost)}; disk problems: {len(problems)}")
        for line in problems[:10] + tally.errors[:10] + tally.poll_errors[:10]:
            print("  " + line)
        print(
            f"time: uploads {uploads_done:.1f} s, total {elapsed:.1f} s, "
            f"throughput {states.get('succeeded', 0) / elapsed:.2f} jobs/s"
        )
        if tally.upload_s:
            p50, p99 = _pct(tally.upload_s, 0.5), _pct(tally.upload_s, 0.99)
            print(f"accepted upload latency ms: p50 {p50:.0f} p99 {p99:.0f}")
        print(
            f"GET /api/jobs/{{id}} ms ({len(tally.status_s)} requests): p50 {_pct(tally.status_s, 0.5):.1f} "
            f"p99 {_pct(tally.status_s, 0.99):.1f} max {max(tally.status_s, default=0) * 1000:.1f}"
        )
        print(
            f"GET /healthz ms ({len(tally.health_s)} requests): p50 {_pct(tally.health_s, 0.5):.1f} "
            f"p99 {_pct(tally.health_s, 0.99):.1f} max {max(tally.health_s, default=0) * 1000:.1f}"
        )
        if tally.status_s:
            print(f"status mean {statistics.fmean(tally.status_s) * 1000:.1f} ms; poll errors {len(tally.poll_errors)}")
        ok = (
            not lost
            and not problems
            and not unfinished
            and not tally.errors
            and not tally.poll_errors
            and tally.refusals_without_retry_after == 0
            and handled == args.uploads
        )
        print("RESULT:", "OK" if ok else "FAILED")
        return ok
    finally:
        stack.stop()
        if ok and not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            print(f"(data and logs kept in {tmp})")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mode", choices=("embedded", "redis", "both"), default="both")
    parser.add_argument("--uploads", type=int, default=200)
    parser.add_argument("--clients", type=int, default=50)
    parser.add_argument("--retries", type=int, default=3, help="retries of a refused upload after its Retry-After")
    parser.add_argument("--retry-cap", type=float, default=30.0, help="longest wait before a retry (s)")
    parser.add_argument("--max-in-flight", type=int, default=8, help="COMPRESS_MAX_UPLOADS_IN_FLIGHT")
    parser.add_argument("--max-queued", type=int, default=40, help="COMPRESS_MAX_QUEUED_JOBS")
    parser.add_argument("--sizes", default="512,1024,1024,10", help="layer sizes of the uploaded MLP")
    parser.add_argument("--latency-runs", type=int, default=50)
    parser.add_argument("--wait-timeout", type=float, default=1200, help="bound on waiting for accepted jobs (s)")
    parser.add_argument("--no-expect", action="store_true", help="send bodies without Expect: 100-continue")
    parser.add_argument("--keep", action="store_true", help="keep the temp data dir and logs")
    args = parser.parse_args()
    modes = ["embedded", "redis"] if args.mode == "both" else [args.mode]
    results = [run(mode, args) for mode in modes]
    return 0 if all(results) else 1


if __name__ == "__main__":
    sys.exit(main())
