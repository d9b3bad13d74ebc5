#!/usr/bin/env bash
# Issue 5's GPU verification in one command, on a machine with an NVIDIA GPU, from the
# repository root. Logs (one file per step) go to $OUT (the device tool's output folder)
# or ./gpu-check-out.
#
#   scripts/gpu_check.sh [env|tests|recalib|serve|all]...      # default: all
#
# Packages: the machine's own python3 with torch (CUDA build) is used. Missing ones come
# from .device/ (made by scripts/device_bundle.sh on a machine with a package index):
# .device/wheels/*.whl and onnxruntime-gpu in .device/ort/part-* (joined and checked
# here), installed with --target into /tmp/site, first on PYTHONPATH (so the GPU build of
# onnxruntime wins over a CPU build the machine may have). ONNX Runtime's CUDA provider
# needs CUDA 13 and cuDNN 9: the nvidia-* pip packages beside torch provide them, put on
# LD_LIBRARY_PATH here.
set -uo pipefail

out=${OUT:-$PWD/gpu-check-out}
mkdir -p "$out"
py=${PYTHON:-python3}
steps=("$@")
[[ ${#steps[@]} -eq 0 ]] && steps=(all)
want() { [[ " ${steps[*]} " == *" $1 "* || " ${steps[*]} " == *" all "* ]]; }
status=0

if [[ -d .device/wheels || -f .device/ort/NAME ]]; then
    mkdir -p /tmp/site
    if [[ -f .device/ort/NAME ]]; then
        wheel=".device/$(cat .device/ort/NAME)"
        if [[ ! -f "$wheel" ]]; then
            cat .device/ort/part-* >"$wheel"
            if [[ "$(sha256sum "$wheel" | cut -d' ' -f1)" != "$(cat .device/ort/SHA256)" ]]; then
                echo "onnxruntime-gpu parts incomplete: $(ls .device/ort)" >&2
                rm -f "$wheel"
                exit 2
            fi
        fi
        "$py" -m pip install -q --no-index --no-deps --no-compile --upgrade --target /tmp/site "$wheel"
    fi
    if compgen -G ".device/wheels/*.whl" >/dev/null; then
        "$py" -m pip install -q --no-index --no-deps --no-compile --upgrade --target /tmp/site .device/wheels/*.whl
    fi
    export PYTHONPATH="/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
else
    export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi
nvidia_libs=$("$py" - <<'PY'
import glob, os, site
dirs = []
for root in site.getsitepackages():
    dirs += sorted(glob.glob(os.path.join(root, "nvidia", "*", "lib")))
print(":".join(dirs))
PY
)
export LD_LIBRARY_PATH="${nvidia_libs}${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
export PYTHONUNBUFFERED=1 PYTHONWARNINGS=ignore

run() {  # run NAME COMMAND...: tee to $out/NAME.txt, remember a failure
    echo "== $1: ${*:2}"
    "${@:2}" 2>&1 | tee "$out/$1.txt"
    local rc=${PIPESTATUS[0]}
    [[ $rc -ne 0 ]] && { echo "== $1 failed (exit $rc)"; status=1; }
    return 0
}

if want env; then
    run env bash -c "nvidia-smi; $py - <<'PY'
import onnxruntime as ort, torch
from service.runtime.sessions import cuda_usable
print('torch', torch.__version__, 'CUDA', torch.version.cuda, 'available', torch.cuda.is_available())
if torch.cuda.is_available():
    print('device', torch.cuda.get_device_name(0), 'cuDNN', torch.backends.cudnn.version())
print('onnxruntime', ort.__version__, 'from', ort.__file__)
print('available providers', ort.get_available_providers(), 'device', ort.get_device())
print('CUDA execution provider usable:', cuda_usable())
PY"
fi
if want tests; then
    run tests "$py" -m pytest -p no:cacheprovider -rs -v \
        tests/recalib/test_precision_devices.py tests/service/test_runtime_sessions.py \
        tests/service/test_runtime_gpu.py tests/service/test_ort_gpu_build.py
fi
if want recalib; then
    run recalib_speed "$py" bench/recalib_speed.py --model resnet50 --device cuda --size 224 \
        --batch-size 64 --batches 20 --repeats 3 --verify 4 --threads 8
fi
if want serve; then
    run serve_batches "$py" bench/serve_batches.py --provider cuda --batch-sizes 1,8,32,64 \
        --concurrency 1,4 --seconds 3 --rounds 3
fi
exit $status
