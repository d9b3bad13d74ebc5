#!/usr/bin/env bash
# The Python install steps of the recalib image, in one place so that docker/Dockerfile and
# scripts/verify_docker_steps.sh run exactly the same pip commands.
#
#   install-python-deps.sh torch   VARIANT        # 1. torch==$TORCH_VERSION, CPU or CUDA build
#   install-python-deps.sh project VARIANT SRC    # 2. the project with the cpu or gpu extra
#   install-python-deps.sh check   VARIANT        # 3. exactly one ONNX Runtime, imports work
#
# VARIANT is "cpu" or "gpu". Uses the `python` / `pip` first on PATH (the image's venv).
# Environment:
#   TORCH_VERSION    default 2.13.0 (the pin the project is tested with)
#   ORT_VERSION      default 1.31.1 (onnxruntime / onnxruntime-gpu release; the GPU build must be
#                    the one built for the base image's CUDA major, see docs/deployment.md)
#   TORCH_CUDA       default cu130 (PyTorch wheel index tag for the GPU build; must match the
#                    CUDA major of the base image and of onnxruntime-gpu, see docs/deployment.md)
#   TORCH_INDEX_URL  override the torch wheel index; set to the empty string to use pip's
#                    configured index (scripts/verify_docker_steps.sh does, offline mirrors too)
#
# torch goes first and alone: the project's `torch>=2.4,<=2.13.0` is then already satisfied,
# so pip never resolves torch from PyPI, whose default Linux wheel is a multi-GB CUDA build.
set -euo pipefail

step=${1:?usage: install-python-deps.sh torch|project|check cpu|gpu [SRC]}
variant=${2:?usage: install-python-deps.sh torch|project|check cpu|gpu [SRC]}
TORCH_VERSION=${TORCH_VERSION:-2.13.0}
TORCH_CUDA=${TORCH_CUDA:-cu130}
ORT_VERSION=${ORT_VERSION:-1.31.1}

case "$variant" in
    cpu) default_index="https://download.pytorch.org/whl/cpu"; ort=onnxruntime ;;
    gpu) default_index="https://download.pytorch.org/whl/${TORCH_CUDA}"; ort=onnxruntime-gpu ;;
    *) echo "expected VARIANT cpu or gpu (got '$variant')" >&2; exit 2 ;;
esac
index=${TORCH_INDEX_URL-$default_index}

case "$step" in
    torch)
        # The PyTorch index also serves torch's dependencies (for the GPU build: the pinned
        # nvidia-* CUDA libraries), so it is the only index for this one command.
        if [[ -n "$index" ]]; then
            pip install --no-cache-dir --index-url "$index" "torch==${TORCH_VERSION}"
        else
            pip install --no-cache-dir "torch==${TORCH_VERSION}"
        fi
        ;;
    project)
        src=${3:?usage: install-python-deps.sh project cpu|gpu SRC}
        # The extra names the ONNX Runtime package; the pin keeps it on the CUDA major the
        # base image provides (a newer onnxruntime-gpu may be built for another one).
        pip install --no-cache-dir "${src}[${variant}]" "${ort}==${ORT_VERSION}"
        ;;
    check)
        python - "$variant" "$TORCH_VERSION" "$ORT_VERSION" <<'PY'
import sys
from importlib import metadata


def installed(name: str) -> bool:
    try:
        metadata.version(name)
    except metadata.PackageNotFoundError:
        return False
    return True


variant, torch_version, ort_version = sys.argv[1], sys.argv[2], sys.argv[3]
want = "onnxruntime-gpu" if variant == "gpu" else "onnxruntime"
have = [name for name in ("onnxruntime", "onnxruntime-gpu") if installed(name)]
if have != [want]:
    sys.exit(f"expected exactly {want} installed (got {have or 'none'}): "
             "onnxruntime and onnxruntime-gpu side by side break the CUDA provider")
if metadata.version(want) != ort_version:
    sys.exit(f"expected {want} {ort_version} (got {metadata.version(want)})")
torch_installed = metadata.version("torch")
if torch_installed.split("+")[0] != torch_version:
    sys.exit(f"expected torch {torch_version} (got {torch_installed})")

import onnxruntime
import torch

import recalib  # noqa: F401
import service  # noqa: F401

print(f"torch {torch.__version__} (CUDA build: {torch.version.cuda}), "
      f"{want} {onnxruntime.__version__}, providers {onnxruntime.get_available_providers()}, "
      f"recalib {metadata.version('recalib')}")
PY
        recalib --help >/dev/null
        ;;
    *) echo "expected step torch, project or check (got '$step')" >&2; exit 2 ;;
esac
