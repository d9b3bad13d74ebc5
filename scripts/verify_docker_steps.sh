#!/usr/bin/env bash
# Verify the image's Python install steps without a Docker engine.
#
# Runs docker/install-python-deps.sh - the very script docker/Dockerfile runs - for one
# variant in a fresh venv in a temp directory, step by step as the image does: pip==26.3,
# torch==2.13.0, the dependencies of pyproject.toml + the VARIANT extra +
# onnxruntime(-gpu)==ORT_VERSION under docker/constraints-VARIANT.txt (from a directory
# holding only pyproject.toml and README.md, as the image's cached layer does), the project
# itself with --no-deps, then the image's own check (exactly one ONNX Runtime, `pip check`,
# imports, `recalib --help`). Then a smoke test of the image's
# entry point: `recalib serve` on loopback with a temp home (and the image's
# RECALIB_EXECUTION_PROVIDER) must answer the HEALTHCHECK's request to /v2/health/ready.
#
#   scripts/verify_docker_steps.sh [cpu]        # CPU image: onnxruntime
#   scripts/verify_docker_steps.sh gpu          # GPU image's Python steps: onnxruntime-gpu
#   TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu scripts/verify_docker_steps.sh
#   CONSTRAINTS= FREEZE_TO=/tmp/cpu.txt scripts/verify_docker_steps.sh cpu
#       # resolve without the pins and write `pip freeze` after the image's steps: how
#       # docker/constraints-{cpu,gpu}.txt are regenerated (their headers say what to keep)
#
# TORCH_INDEX_URL defaults to "" (pip's configured index), because the PyTorch index is not
# reachable everywhere; the image itself uses the PyTorch CPU / CUDA index. For `gpu` on a
# machine without the cu130 index that means the CPU torch: what is verified is the project's
# resolution with onnxruntime-gpu (and never onnxruntime) beside torch 2.13.0, the image's
# check, and - where CUDA cannot run - tests/service/test_ort_gpu_build.py: the real GPU
# build lists CUDAExecutionProvider, falls back to CPU silently, and the service notices.
set -euo pipefail

variant=${1:-cpu}
case "$variant" in
    cpu) provider=cpu ;;
    gpu) provider=cuda ;;
    *) echo "expected variant cpu or gpu (got '$variant')" >&2; exit 2 ;;
esac
repo=$(cd "$(dirname "$0")/.." && pwd)
python=${PYTHON:-python3}
work=$(mktemp -d "${TMPDIR:-/tmp}/recalib-docker-steps.XXXXXX")
server_pid=
cleanup() {
    if [[ -n "$server_pid" ]]; then kill "$server_pid" 2>/dev/null || true; wait "$server_pid" 2>/dev/null || true; fi
    rm -rf "$work"
}
trap cleanup EXIT

export TORCH_INDEX_URL=${TORCH_INDEX_URL-}
start=$(date +%s)
step() { echo "== [$(($(date +%s) - start))s] $*"; }

step "fresh venv in $work/venv ($($python --version))"
"$python" -m venv "$work/venv"
export PATH="$work/venv/bin:$PATH" VIRTUAL_ENV="$work/venv"
step "install-python-deps.sh pip $variant"
bash "$repo/docker/install-python-deps.sh" pip "$variant"

# The source the image copies (pyproject.toml, README.md, recalib/, service/), not the
# checkout itself, so a missing file in the image's COPY list shows up here too.
mkdir "$work/src"
cp -r "$repo/pyproject.toml" "$repo/README.md" "$repo/recalib" "$repo/service" "$work/src/"
find "$work/src" -name __pycache__ -prune -exec rm -rf {} +
# What the image's dependency layer sees: pyproject.toml and README.md, no code.
mkdir "$work/deps-src"
cp "$repo/pyproject.toml" "$repo/README.md" "$work/deps-src/"

step "install-python-deps.sh torch $variant"
bash "$repo/docker/install-python-deps.sh" torch "$variant"
pins=${CONSTRAINTS-docker/constraints-$variant.txt}
step "install-python-deps.sh deps $variant (constraints: ${pins:-none})"
bash "$repo/docker/install-python-deps.sh" deps "$variant" "$work/deps-src"
step "install-python-deps.sh project $variant"
bash "$repo/docker/install-python-deps.sh" project "$variant" "$work/src"
step "install-python-deps.sh check $variant"
(cd "$work" && bash "$repo/docker/install-python-deps.sh" check "$variant")
if [[ -n "${FREEZE_TO:-}" ]]; then
    pip freeze >"$FREEZE_TO"
    step "pip freeze of the image's packages written to $FREEZE_TO"
fi

if [[ "$variant" == gpu ]]; then
    # pytest and httpx (the tests' TestClient) only, not the dev extra. The tests skip
    # where CUDA really works; run from $work so `recalib`/`service` come from the venv.
    step "provider tests against the installed onnxruntime-gpu"
    pip install --quiet pytest httpx
    (cd "$work" && python -m pytest -c "$repo/pyproject.toml" --rootdir "$repo" -p no:cacheprovider \
        -rs "$repo/tests/service/test_ort_gpu_build.py" "$repo/tests/service/test_runtime_sessions.py")
fi

# The image's CMD is a bare `recalib serve`, host and port from RECALIB_HOST / RECALIB_PORT;
# the health check is the Dockerfile's HEALTHCHECK command itself, read from the Dockerfile.
step "entry point: recalib serve (host/port from the environment) + the HEALTHCHECK command"
port=$("$work/venv/bin/python" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
export RECALIB_HOST=127.0.0.1 RECALIB_PORT="$port"
(cd "$work" && exec env RECALIB_HOME="$work/home" RECALIB_EXECUTION_PROVIDER="$provider" recalib serve \
    >"$work/serve.log" 2>&1) &
server_pid=$!
healthcheck() {
    (cd "$work" && python - "$repo/docker/Dockerfile" <<'PY'
import json
import re
import subprocess
import sys

dockerfile = open(sys.argv[1]).read().replace("\\\n", " ")
command = json.loads(re.search(r"^HEALTHCHECK .*?\bCMD (\[.*\])$", dockerfile, re.M).group(1))
sys.exit(subprocess.run(command, stderr=subprocess.DEVNULL).returncode)
PY
    )
}
healthy=
for _ in $(seq 1 120); do
    if healthcheck; then
        healthy=1
        break
    fi
    kill -0 "$server_pid" 2>/dev/null || break
    sleep 0.5
done
if [[ -z "$healthy" ]]; then
    echo "recalib serve did not become ready; its log:" >&2
    cat "$work/serve.log" >&2
    exit 1
fi
pip list --format=freeze 2>/dev/null | grep -iE '^(torch|onnxruntime|onnxruntime-gpu|onnx|numpy|fastapi|uvicorn|recalib)==' || true
step "OK: the $variant image's install steps work in a fresh venv"
