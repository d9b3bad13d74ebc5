#!/usr/bin/env bash
# The Python install steps of the recalib image, in one place so that docker/Dockerfile and
# scripts/verify_docker_steps.sh run exactly the same pip commands.
#
#   install-python-deps.sh pip     VARIANT        # 0. pip==$PIP_VERSION (same pip everywhere)
#   install-python-deps.sh torch   VARIANT        # 1. torch==$TORCH_VERSION, CPU or CUDA build
#   install-python-deps.sh deps    VARIANT SRC    # 2. the dependencies SRC/pyproject.toml names
#                                                 #    (plus the cpu or gpu extra), constrained
#   install-python-deps.sh project VARIANT SRC    # 3. the project itself, --no-deps
#   install-python-deps.sh check   VARIANT        # 4. exactly one ONNX Runtime, pip check, imports
#   install-python-deps.sh ldconf  VARIANT OUT    # 5. (image) loader config for pip's cuDNN
#
# Steps 2 and 3 are split for the image's layer cache: `deps` needs only pyproject.toml, so a
# change to recalib/ or service/ re-runs step 3 (seconds), not the dependency install.
#
# VARIANT is "cpu" or "gpu". Uses the `python` / `pip` first on PATH (the image's venv).
# Environment:
#   PIP_VERSION      default 26.3 (the pip the image and the verify venv both install)
#   TORCH_VERSION    default 2.13.0 (the pin the project is tested with)
#   ORT_VERSION      default 1.31.1 (onnxruntime / onnxruntime-gpu release; the GPU build must be
#                    the one built for the base image's CUDA major, see docs/deployment.md).
#                    The constraints file pins the same version: change both together.
#   TORCH_CUDA       default cu130 (PyTorch wheel index tag for the GPU build; must match the
#                    CUDA major of the base image and of onnxruntime-gpu, see docs/deployment.md)
#   TORCH_INDEX_URL  override the torch wheel index; set to the empty string to use pip's
#                    configured index (scripts/verify_docker_steps.sh does, offline mirrors too)
#   CONSTRAINTS      pip constraints file for step 2, default constraints-VARIANT.txt next to
#                    this script (docker/constraints-{cpu,gpu}.txt: every package of the image
#                    but torch, its nvidia-* CUDA libraries and the project, pinned). Set to
#                    the empty string to resolve freely (how those files are regenerated).
#
# torch goes first and alone: the project's `torch>=2.4,<=2.13.0` is then already satisfied,
# so pip never resolves torch from PyPI, whose default Linux wheel is a multi-GB CUDA build.
# The torch step takes no constraints: it runs against the PyTorch index only, which need
# not carry the pinned releases of torch's own dependencies; step 2 then moves any of them
# that differ to the pinned version.
set -euo pipefail

usage="usage: install-python-deps.sh pip|torch|deps|project|check|ldconf cpu|gpu [SRC|OUT]"
step=${1:?$usage}
variant=${2:?$usage}
PIP_VERSION=${PIP_VERSION:-26.3}
TORCH_VERSION=${TORCH_VERSION:-2.13.0}
TORCH_CUDA=${TORCH_CUDA:-cu130}
ORT_VERSION=${ORT_VERSION:-1.31.1}

case "$variant" in
    cpu) default_index="https://download.pytorch.org/whl/cpu"; ort=onnxruntime ;;
    gpu) default_index="https://download.pytorch.org/whl/${TORCH_CUDA}"; ort=onnxruntime-gpu ;;
    *) echo "expected VARIANT cpu or gpu (got '$variant')" >&2; exit 2 ;;
esac
index=${TORCH_INDEX_URL-$default_index}
constraints=${CONSTRAINTS-$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/constraints-${variant}.txt}
constraint_args=()
if [[ -n "$constraints" ]]; then
    [[ -f "$constraints" ]] || { echo "constraints file $constraints does not exist" >&2; exit 2; }
    constraint_args=(--constraint "$constraints")
fi

case "$step" in
    pip)
        pip install --no-cache-dir "pip==${PIP_VERSION}"
        ;;
    torch)
        # The PyTorch index also serves torch's dependencies (for the GPU build: the pinned
        # nvidia-* CUDA libraries), so it is the only index for this one command.
        if [[ -n "$index" ]]; then
            pip install --no-cache-dir --index-url "$index" "torch==${TORCH_VERSION}"
        else
            pip install --no-cache-dir "torch==${TORCH_VERSION}"
        fi
        ;;
    deps)
        src=${3:?usage: install-python-deps.sh deps cpu|gpu SRC}
        # [project] dependencies and the VARIANT extra, read from pyproject.toml alone (the
        # code is not there yet; tomllib: Python >= 3.11, as in both images). The extra
        # names the ONNX Runtime package; the pin keeps it on the CUDA major the base image
        # provides (a newer onnxruntime-gpu may be built for another one). torch is already
        # installed and satisfies the project's range.
        requirements=$(mktemp)
        python - "$src/pyproject.toml" "$variant" >"$requirements" <<'PY'
import sys
import tomllib

with open(sys.argv[1], "rb") as f:
    project = tomllib.load(f)["project"]
for requirement in project["dependencies"] + project["optional-dependencies"][sys.argv[2]]:
    print(requirement)
PY
        pip install --no-cache-dir "${constraint_args[@]}" --requirement "$requirements" \
            "${ort}==${ORT_VERSION}"
        rm -f "$requirements"
        ;;
    project)
        src=${3:?usage: install-python-deps.sh project cpu|gpu SRC}
        # Every dependency is in place (step 2): install the code only, resolve nothing.
        pip install --no-cache-dir --no-deps "${src}"
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
import service.cli  # noqa: F401  (the `recalib` console script, the image's ENTRYPOINT)

print(f"torch {torch.__version__} (CUDA build: {torch.version.cuda}), "
      f"{want} {onnxruntime.__version__}, providers {onnxruntime.get_available_providers()}, "
      f"recalib {metadata.version('recalib')}")
PY
        # Nothing missing or conflicting after the --no-deps install of the project.
        pip check
        recalib --help >/dev/null
        ;;
    ldconf)
        out=${3:?usage: install-python-deps.sh ldconf cpu|gpu OUT}
        # GPU image: one cuDNN. The runtime base (nvidia/cuda:*-runtime, no cuDNN) has CUDA's
        # libraries; cuDNN comes only with torch's wheels (nvidia-cudnn-cu13 under
        # site-packages/nvidia). torch finds it by RPATH, but ONNX Runtime's CUDA provider
        # dlopen()s libcudnn.so.9 (and links libcudart/libcublas/libcublasLt/libcurand) by
        # name through the loader's search path: OUT lists every directory under
        # site-packages/nvidia that holds a libcudnn*.so.9, plus the directory of any other
        # library the provider needs that the loader cannot find in the base image. The
        # Dockerfile installs OUT as /etc/ld.so.conf.d/recalib-nvidia.conf and runs ldconfig.
        # CPU image: OUT is empty (nothing to add). Image only: as root it changes the
        # machine's loader configuration.
        : >"$out"
        [[ "$variant" == gpu ]] || exit 0
        [[ $(id -u) -eq 0 ]] || { echo "ldconf writes /etc/ld.so.conf.d: image build only" >&2; exit 2; }
        python - "$out" <<'PY'
import glob
import os
import subprocess
import sys
import sysconfig

out = sys.argv[1]
nvidia = os.path.join(sysconfig.get_paths()["purelib"], "nvidia")
dirs = sorted({os.path.dirname(p) for p in glob.glob(f"{nvidia}/**/libcudnn*.so.9", recursive=True)})
if not dirs:
    sys.exit(f"no libcudnn*.so.9 under {nvidia}: torch's CUDA wheel did not bring cuDNN 9")


def write_and_reload() -> None:
    with open(out, "w") as f:
        f.writelines(f"{d}\n" for d in dirs)
    conf = "/etc/ld.so.conf.d/recalib-nvidia.conf"
    with open(conf, "w") as f:  # the build stage's loader too, for the checks below
        f.writelines(f"{d}\n" for d in dirs)
    subprocess.run(["ldconfig"], check=True)


def cached(soname: str) -> list[str]:
    listing = subprocess.run(["ldconfig", "-p"], capture_output=True, text=True, check=True)
    return [line.rsplit("=> ", 1)[1] for line in listing.stdout.splitlines()
            if line.strip().startswith(soname + " ")]


write_and_reload()
import onnxruntime

provider = os.path.join(os.path.dirname(onnxruntime.__file__), "capi",
                        "libonnxruntime_providers_cuda.so")
# Linked (ldd: "not found") and dlopen()ed by name (cuDNN, NVRTC). libcuda.so.1 is the
# driver's: the NVIDIA Container Toolkit mounts it at run time, never in the image.
ldd = subprocess.run(["ldd", provider], capture_output=True, text=True, check=True).stdout
missing = [line.split()[0] for line in ldd.splitlines() if "not found" in line]
missing += [s for s in ("libcudnn.so.9", "libnvrtc.so.13") if not cached(s)]
for soname in sorted(set(missing) - {"libcuda.so.1"}):
    found = glob.glob(f"{nvidia}/**/{soname}", recursive=True)
    if not found:
        sys.exit(f"{soname} (needed by ONNX Runtime's CUDA provider) is neither in the base "
                 f"image nor under {nvidia}")
    dirs = sorted(set(dirs) | {os.path.dirname(found[0])})
write_and_reload()
still = [s for s in sorted(set(missing) - {"libcuda.so.1"}) if not cached(s)]
cudnn = cached("libcudnn.so.9")
if still or len(cudnn) != 1 or not cudnn[0].startswith(nvidia):
    sys.exit(f"loader check failed: unresolved {still}, libcudnn.so.9 at {cudnn} "
             f"(expected exactly one, under {nvidia})")
print(f"loader path for ONNX Runtime: {dirs}; libcudnn.so.9 -> {cudnn[0]}")
PY
        ;;
    *) echo "expected step pip, torch, deps, project, check or ldconf (got '$step')" >&2; exit 2 ;;
esac
