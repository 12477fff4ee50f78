#!/usr/bin/env bash
# Vulnerability audit of the project's dependencies as installed: every distribution that
# onnx-compress (with the extras below) needs, transitively, at the version installed, checked by
# pip-audit against PyPI's advisory data (needs network access to pypi.org).
#
#   scripts/audit.sh                 # extras: service
#   AUDIT_EXTRAS="service dev" scripts/audit.sh
#   AUDIT_SERVICE=osv scripts/audit.sh   # use OSV (api.osv.dev) instead of PyPI
#
# Exit status: 0 no known vulnerability; 1 known vulnerabilities (listed); 2 the audit is incomplete
# (a dependency could not be looked up, e.g. no network or a version PyPI does not know; set
# AUDIT_ALLOW_SKIPS=1 to accept that) or pip-audit itself failed.
set -euo pipefail

PYTHON="${PYTHON:-python3}"
EXTRAS="${AUDIT_EXTRAS:-service}"
SERVICE="${AUDIT_SERVICE:-pypi}"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

if ! "$PYTHON" -m pip_audit --version >/dev/null 2>&1; then
    echo "pip-audit is not installed: $PYTHON -m pip install pip-audit (or pip install -e '.[dev]')" >&2
    exit 2
fi

# The pinned set: onnx-compress's requirements (with the extras), resolved through the installed metadata.
"$PYTHON" - "$EXTRAS" >"$work/requirements.txt" <<'EOF'
import sys
from importlib import metadata

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

extras = set(sys.argv[1].split())
seen: dict[str, str] = {}
todo = [(Requirement(f"onnx-compress[{','.join(sorted(extras))}]" if extras else "onnx-compress"), set())]
while todo:
    req, _ = todo.pop()
    name = canonicalize_name(req.name)
    try:
        dist = metadata.distribution(req.name)
    except metadata.PackageNotFoundError:
        if req.marker is None or req.marker.evaluate({"extra": ""}):
            print(f"# not installed: {req}", file=sys.stderr)
        continue
    first = name not in seen
    seen[name] = dist.version
    wanted = set(req.extras)
    for line in dist.requires or []:
        sub = Requirement(line)
        if sub.marker is not None and not any(sub.marker.evaluate({"extra": e}) for e in wanted | {""}):
            continue
        if first or sub.extras:
            todo.append((sub, set()))
for name, version in sorted(seen.items()):
    if name != "onnx-compress":
        print(f"{name}=={version}")
EOF

count=$(wc -l <"$work/requirements.txt")
echo "auditing $count installed dependencies of onnx-compress[${EXTRAS// /,}] with pip-audit ($SERVICE)"
status=0
"$PYTHON" -m pip_audit -r "$work/requirements.txt" --no-deps --disable-pip -s "$SERVICE" \
    --progress-spinner off -f json -o "$work/audit.json" 2>"$work/stderr" || status=$?
if [[ ! -s "$work/audit.json" ]]; then
    cat "$work/stderr" >&2
    echo "pip-audit failed (exit $status) before producing a result" >&2
    exit 2
fi

"$PYTHON" - "$work/audit.json" "${AUDIT_ALLOW_SKIPS:-0}" <<'EOF'
import json
import sys

import urllib.request


def latest_release_vulns(name: str, version: str) -> list[dict] | None:
    """PyPI's advisories from the project page, when `version` is its latest release (else None).

    Some PyPI mirrors answer /pypi/<name>/json but not /pypi/<name>/<version>/json, which pip-audit asks.
    """
    try:
        with urllib.request.urlopen(f"https://pypi.org/pypi/{name}/json", timeout=30) as response:
            page = json.load(response)
    except (OSError, ValueError):
        return None
    if page.get("info", {}).get("version") != version or "vulnerabilities" not in page:
        return None
    return [
        {"id": v.get("id", "?"), "fix_versions": v.get("fixed_in") or []}
        for v in page["vulnerabilities"]
        if not v.get("withdrawn")
    ]


report = json.load(open(sys.argv[1]))
allow_skips = sys.argv[2] == "1"
vulnerable, skipped, clean = [], [], 0
for dep in report["dependencies"]:
    if "skip_reason" in dep:
        vulns = latest_release_vulns(dep["name"], dep.get("version") or dep["skip_reason"].rsplit("(", 1)[-1][:-1])
        if vulns is None:
            skipped.append(f"{dep['name']}: {dep['skip_reason']}")
            continue
        dep["vulns"] = vulns
    if dep.get("vulns"):
        for vuln in dep["vulns"]:
            fixes = ", ".join(vuln.get("fix_versions") or []) or "no fixed version yet"
            vulnerable.append(f"{dep['name']} {dep.get('version', '')}: {vuln['id']} (fixed in: {fixes})")
    else:
        clean += 1
print(f"{clean} dependencies without known vulnerabilities")
if skipped:
    print(f"{len(skipped)} dependencies could not be audited:")
    print("\n".join(f"  {line}" for line in skipped))
if vulnerable:
    print(f"{len(vulnerable)} known vulnerabilities:")
    print("\n".join(f"  {line}" for line in vulnerable))
    sys.exit(1)
if skipped and not allow_skips:
    print("the audit is incomplete (set AUDIT_ALLOW_SKIPS=1 to accept skipped dependencies)")
    sys.exit(2)
print("no known vulnerabilities")
EOF
