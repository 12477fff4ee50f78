#!/usr/bin/env bash
# Build the real Dockerfile without a Docker engine and start the server from the built image:
#   1. a Debian bookworm base image made with debootstrap + podman import (base images cannot be pulled here),
#   2. podman build --isolation chroot of ./Dockerfile with BASE pointing at it,
#   3. the image's filesystem mounted, the server started in it with chroot as the image's user and the
#      image's own environment (its ENV, as `docker run` sets it: 0.0.0.0, no token),
#   4. /healthz, the Host allow-list (a rebinding name refused with 400 bad_host, loopback names served),
#      the request-head deadline, and one real compression job over HTTP, checked;
#   5. the image refusing to start without a token when other Host names are allowed.
# Needs root and Debian's podman and debootstrap (installed when missing). Prints what it measured.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)
work=${CONTAINER_TEST_DIR:-$(mktemp -d)}
port=${CONTAINER_TEST_PORT:-18765}
base=localhost/bookworm-py
image=localhost/onnx-compress-test
# The test client builds its model with onnx: the project's venv (as the README sets it up), or $PYTHON.
python=${PYTHON:-$([ -x "$root/.venv/bin/python" ] && echo "$root/.venv/bin/python" || echo python3)}

need=()
command -v podman >/dev/null || need+=(podman)
command -v debootstrap >/dev/null || need+=(debootstrap)
if [ ${#need[@]} -gt 0 ]; then
  apt-get install -y -q "${need[@]}" >/dev/null
fi

if ! podman image exists "$base"; then
  echo "== base image: debootstrap bookworm (minbase + python3)"
  debootstrap --variant=minbase --include=python3,python3-venv,python3-pip,ca-certificates \
    bookworm "$work/rootfs" >/dev/null
  tar -C "$work/rootfs" -c . | podman import - "$base" >/dev/null
  rm -rf "$work/rootfs"
fi

echo "== podman build --isolation chroot (the real Dockerfile, BASE=$base)"
start=$(date +%s)
podman build --format docker --isolation chroot --build-arg BASE="$base" -v /etc/ssl/certs:/etc/ssl/certs:ro \
  -t "$image" "$root" >"$work/build.log" 2>&1 || { tail -30 "$work/build.log"; exit 1; }
echo "built in $(( $(date +%s) - start )) s; image size: $(podman image inspect "$image" --format '{{.Size}}') bytes"
podman image inspect "$image" --format 'user={{.Config.User}} volumes={{.Config.Volumes}} healthcheck={{.HealthCheck}}'

cid=$(podman create "$image")
mnt=$(podman mount "$cid")
# /proc as every container runtime mounts it: ONNX Runtime reads a model's external data files through procfs.
mkdir -p "$mnt/proc" && mount -t proc proc "$mnt/proc"
cleanup() {
  [ -n "${server:-}" ] && kill "$server" 2>/dev/null || true
  umount "$mnt/proc" >/dev/null 2>&1 || true
  podman umount "$cid" >/dev/null 2>&1 || true
  podman rm "$cid" >/dev/null 2>&1 || true
}
trap cleanup EXIT

uid=$(chroot "$mnt" id -u app); gid=$(chroot "$mnt" id -g app)
# The image's ENV, as `docker run` sets it (podman run itself cannot start here); only the port is the test's.
mapfile -t image_env < <(podman image inspect "$image" --format '{{range .Config.Env}}{{println .}}{{end}}' | grep .)
printf 'image env: %s\n' "${image_env[*]}"
serve() {  # serve [VAR=value...]: the image's command as its user, its environment plus these (in a subshell: it execs)
  exec timeout "${limit:-0}" env -i "${image_env[@]}" HOME=/data COMPRESS_PORT="$port" "$@" \
    "$(command -v chroot)" --userspec="$uid:$gid" "$mnt" /bin/sh -c 'cd /data && exec onnx-compress serve'
}

echo "== the image refuses to serve other Host names without a token"
refusal=$(limit=60 serve COMPRESS_ALLOWED_HOSTS='["compress.example"]' 2>&1) || true
grep -q 'refusing to serve the Host names' <<<"$refusal" || { echo "it did not refuse:"; tail -5 <<<"$refusal"; exit 1; }
echo "refused: $(grep -o 'refusing to serve the Host names.*' <<<"$refusal" | cut -c1-100)..."

echo "== server from the image's filesystem as app ($uid:$gid), port $port"
serve >"$work/server.log" 2>&1 &
server=$!
for _ in $(seq 1 60); do
  curl -fsS "http://127.0.0.1:$port/healthz" >/dev/null 2>&1 && break
  kill -0 "$server" 2>/dev/null || { echo "the server exited:"; tail -20 "$work/server.log"; exit 1; }
  sleep 1
done
echo "healthz: $(curl -fsS "http://127.0.0.1:$port/healthz")"

echo "== Host allow-list (DNS rebinding)"
host_check() {  # host_check HOST EXPECTED_STATUS [EXPECTED_CODE]
  local status body
  body=$(curl -sS -o - -w '\n%{http_code}' -H "Host: $1" "http://127.0.0.1:$port/api/jobs")
  status=${body##*$'\n'}; body=${body%$'\n'*}
  echo "Host: $1 -> $status ${body:0:80}"
  [ "$status" = "$2" ] || { echo "expected $2"; exit 1; }
  [ -z "${3:-}" ] || grep -q "\"code\": *\"$3\"" <<<"$body" || { echo "expected error code $3"; exit 1; }
}
host_check "evil.example:8000" 400 bad_host
host_check "evil.example" 400 bad_host
host_check "127.0.0.1:8000" 200
host_check "localhost:8000" 200

job_failed() {  # what the server and the job's process said, when the job did not succeed
  echo "== server log (tail)"; tail -30 "$work/server.log"
  for log in "$mnt"/data/jobs/*/job.log; do [ -f "$log" ] && { echo "== $log (tail)"; tail -30 "$log"; }; done
  exit 1
}
"$python" - "$port" <<'PY' || job_failed
import json, sys, time, urllib.request, uuid
import numpy as np
from onnx import TensorProto, helper, numpy_helper

port = sys.argv[1]
rng = np.random.default_rng(0)
w = numpy_helper.from_array(rng.standard_normal((64, 32)).astype(np.float32), "W")
graph = helper.make_graph([helper.make_node("MatMul", ["x", "W"], ["y"])], "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 64])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 32])], [w])
model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]).SerializeToString()
plan = json.dumps({"steps": [{"kind": "quantize", "mode": "dynamic"}], "evaluation": {"latency_runs": 5}})
boundary = uuid.uuid4().hex
body = (f'--{boundary}\r\nContent-Disposition: form-data; name="plan"\r\n\r\n{plan}\r\n'
        f'--{boundary}\r\nContent-Disposition: form-data; name="model"; filename="m.onnx"\r\n'
        "Content-Type: application/octet-stream\r\n\r\n").encode() + model + f"\r\n--{boundary}--\r\n".encode()
req = urllib.request.Request(f"http://127.0.0.1:{port}/api/jobs", data=body, method="POST",
                             headers={"Content-Type": f"multipart/form-data; boundary={boundary}"})
job = json.load(urllib.request.urlopen(req))

# A request head that never ends is answered 408 and closed (the image's uvicorn, with the service's protocol).
import socket
start = time.time()
with socket.create_connection(("127.0.0.1", int(port)), timeout=90) as sock:
    sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: ")
    answer = b""
    while chunk := sock.recv(65536):
        answer += chunk
status_line = answer.partition(b"\r\n")[0].decode()
print(f"unfinished request head: {status_line} after {time.time() - start:.0f} s")
assert answer.startswith(b"HTTP/1.1 408 ") and b"header_timeout" in answer, answer[:200]
deadline = time.time() + 120
while job["state"] not in ("succeeded", "failed") and time.time() < deadline:
    time.sleep(1)
    job = json.load(urllib.request.urlopen(f"http://127.0.0.1:{port}/api/jobs/{job['id']}"))
print("job:", job["state"], job["error"])
assert job["state"] == "succeeded", job
report = json.load(urllib.request.urlopen(f"http://127.0.0.1:{port}/api/jobs/{job['id']}/report"))
print(f"report: {report['before']['size_bytes']} -> {report['after']['size_bytes']} bytes, "
      f"cosine {report['agreement']['outputs'][0]['cosine']:.5f}")
PY
echo "owner of the job files inside the image: $(stat -c %u "$mnt/data/jobs" 2>/dev/null || echo '?')"
echo "CONTAINER TEST PASSED"
