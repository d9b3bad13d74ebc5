#!/usr/bin/env bash
# Prepare what the GPU check (scripts/gpu_check.sh) needs on a machine that cannot reach a
# package index: Linux x86-64 wheels for its Python, in .device/ (git-ignored).
#
#   scripts/device_bundle.sh [PYTHON_VERSION]      # default 3.12 (the lent GPU machine's)
#
# * onnxruntime-gpu (the CUDA 13 / cuDNN 9 build the GPU image pins) - 256 MB, more than one
#   transfer to such a machine may carry (64 MiB), so it is split into .device/ort/part-*
#   (50 MiB each) for consecutive transfers; gpu_check.sh joins the parts again.
# * the service's pure-Python and small binary dependencies that a GPU image with torch
#   usually lacks (fastapi, pydantic, uvicorn, ...), at the versions this repo is tested
#   with, in .device/wheels/. torch, numpy, onnx and the CUDA libraries are not bundled:
#   the machine's own are used (torch's nvidia-* packages carry CUDA 13 and cuDNN 9).
set -euo pipefail

pyver=${1:-3.12}
repo=$(cd "$(dirname "$0")/.." && pwd)
dest="$repo/.device"
ORT_VERSION=${ORT_VERSION:-1.31.1}
exclude=$(git -C "$repo" rev-parse --path-format=absolute --git-path info/exclude)
mkdir -p "$(dirname "$exclude")"
grep -qxF "/.device/" "$exclude" 2>/dev/null || echo "/.device/" >>"$exclude"
rm -rf "$dest" && mkdir -p "$dest/wheels" "$dest/ort"

download() {
    python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version "$pyver" \
        --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
        --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        --platform manylinux_2_5_x86_64 --platform manylinux1_x86_64 --platform any \
        -d "$1" "${@:2}"
}

# The service's dependencies that are not torch / numpy / onnx (versions as tested here).
download "$dest/wheels" \
    fastapi==0.165.0 starlette==1.10.0 pydantic==2.14.3 pydantic-core==2.50.4 \
    pydantic-settings==2.16.3 python-dotenv==1.2.4 typing-inspection==0.4.5 \
    annotated-types==0.8.0 annotated-doc==0.0.7 uvicorn==0.54.0 h11==0.16.0 \
    python-multipart==0.0.34 orjson==3.13.0 httptools==0.9.0 prometheus-client==0.26.0 \
    safetensors==0.8.0

tmp=$(mktemp -d)
download "$tmp" "onnxruntime-gpu==${ORT_VERSION}"
wheel=$(basename "$tmp"/onnxruntime_gpu-*.whl)
(cd "$dest/ort" && split -b 50M -d "$tmp/$wheel" part- && echo "$wheel" >NAME \
    && sha256sum "$tmp/$wheel" | cut -d' ' -f1 >SHA256)
rm -rf "$tmp"

echo "bundle in $dest:"
du -sh "$dest/wheels" "$dest"/ort/part-*
echo "carry .device/wheels with the first call, then each .device/ort/part-* in its own call"
echo "(a part left on the machine by an earlier call stays there while it is warm)."
