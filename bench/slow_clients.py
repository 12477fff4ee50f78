"""Uploads served while eight slow clients (one byte every 2 s) hold upload slots, with the default settings.

    python -m bench.slow_clients [--addresses one|eight] [--seconds 60]

Serves the app (no worker: only the uploads are measured) with uvicorn as `onnx-compress serve` runs it, on a
free loopback port. Eight clients start a 10 MB upload and then trickle one byte every 2 s, from one loopback
address (127.0.0.2) or from eight (127.0.0.10-17); one second later a normal client on 127.0.0.1 starts sending
a complete 100 KB upload every second until the window ends. Prints the normal client's answers, when its first
upload was accepted, and what the slow clients were answered.
"""

from __future__ import annotations

import argparse
import collections
import json
import select
import socket
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import uvicorn

from service.main import create_app
from service.settings import Settings

try:
    from service.http_server import server_options
except ImportError:  # a checkout from before the request-head deadline: `serve`'s options then

    def server_options(settings: Settings) -> dict[str, Any]:  # type: ignore[misc]
        """What `serve` passed to uvicorn then."""
        return {"host": settings.host, "port": settings.port, "proxy_headers": False, "server_header": False}


BOUNDARY = "bench-boundary"
_PLAN = json.dumps({"steps": [{"kind": "prune", "sparsity": 0.5}]})
HEAD = (
    f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="plan"\r\n\r\n{_PLAN}\r\n'
    f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="model"; filename="m.onnx"\r\n\r\n'
).encode()
BODY = HEAD + b"\0" * 100_000 + f"\r\n--{BOUNDARY}--\r\n".encode()  # not parsed before it is accepted


def _request_head(length: int) -> bytes:
    return (
        f"POST /api/jobs HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: multipart/form-data; boundary={BOUNDARY}\r\n"
        f"Content-Length: {length}\r\nConnection: close\r\n\r\n"
    ).encode()


def _status(sock: socket.socket) -> int:
    data = b""
    while b"\r\n" not in data:
        chunk = sock.recv(4096)
        if not chunk:
            return -1  # closed without an answer
        data += chunk
    return int(data.split()[1])


def main() -> None:
    """Run the measurement and print one line."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--addresses", choices=["one", "eight"], default="one")
    parser.add_argument("--seconds", type=float, default=60.0)
    args = parser.parse_args()

    settings = Settings(data_dir=Path(tempfile.mkdtemp()) / "data", min_free_disk_mb=0)
    options = server_options(settings) | {"port": 0, "log_level": "error"}
    server = uvicorn.Server(uvicorn.Config(create_app(settings, embedded_worker=False), **options))
    threading.Thread(target=server.run, daemon=True).start()
    while not server.started:
        time.sleep(0.05)
    port = server.servers[0].sockets[0].getsockname()[1]

    sources = ["127.0.0.2"] * 8 if args.addresses == "one" else [f"127.0.0.{i}" for i in range(10, 18)]
    slow = [socket.create_connection(("127.0.0.1", port), timeout=30, source_address=(s, 0)) for s in sources]
    for sock in slow:
        sock.sendall(_request_head(len(HEAD) + 10_000_000) + HEAD)
    time.sleep(1)  # the slow uploads take their slots first
    start = time.monotonic()
    answered: dict[int, int] = {}

    def trickle() -> None:
        while time.monotonic() - start < args.seconds and len(answered) < len(slow):
            for i, sock in enumerate(slow):
                if i in answered:
                    continue
                if select.select([sock], [], [], 0)[0]:
                    answered[i] = _status(sock)
                else:
                    try:
                        sock.sendall(b"\0")
                    except OSError:
                        answered[i] = -1
            time.sleep(2)

    threading.Thread(target=trickle, daemon=True).start()
    normal: collections.Counter[int] = collections.Counter()
    first_accepted: float | None = None
    while time.monotonic() - start < args.seconds:
        with socket.create_connection(("127.0.0.1", port), timeout=60, source_address=("127.0.0.1", 0)) as sock:
            sock.sendall(_request_head(len(BODY)) + BODY)
            status = _status(sock)
        normal[status] += 1
        if status == 202 and first_accepted is None:
            first_accepted = time.monotonic() - start
        time.sleep(1)
    server.should_exit = True
    first = "never" if first_accepted is None else f"after {first_accepted:.1f} s"
    slow_answers = dict(sorted(collections.Counter(answered.values()).items()))
    print(
        f"slow clients on {args.addresses} address(es), {args.seconds:.0f} s: "
        f"normal uploads {dict(sorted(normal.items()))}, first accepted {first}; "
        f"slow clients answered {slow_answers}, still holding a slot {len(slow) - len(answered)}"
    )


if __name__ == "__main__":
    main()
