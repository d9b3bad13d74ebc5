#!/usr/bin/env bash
# The peer servers of bench/data_plane.py, each in its own virtualenv (no torch):
#
#   scripts/make_peer_venvs.sh [DIR]        # default DIR: /tmp/recalib-peers
#
# makes DIR/kserve (kserve 0.21 + onnxruntime) and DIR/mlserver (mlserver 1.7 +
# onnxruntime), then prints the arguments to pass to the benchmark:
#
#   python bench/data_plane.py --kserve-python DIR/kserve/bin/python \
#       --mlserver-python DIR/mlserver/bin/python
#
# PYTHON picks the interpreter the venvs are made from (default: python3). A venv that
# already imports its packages is left as it is.
set -euo pipefail

dir=${1:-/tmp/recalib-peers}
py=${PYTHON:-python3}
mkdir -p "$dir"

make_venv() {  # name, import check, pip requirements...
    local name=$1 check=$2
    shift 2
    local venv=$dir/$name
    if [[ -x $venv/bin/python ]] && "$venv/bin/python" -c "$check" 2>/dev/null; then
        echo "$name: $venv is ready"
        return
    fi
    "$py" -m venv "$venv"
    "$venv/bin/python" -m pip install --quiet --upgrade pip
    "$venv/bin/python" -m pip install --quiet "$@"
    "$venv/bin/python" -c "$check"
    echo "$name: $venv made"
}

make_venv kserve "import kserve, onnxruntime" "kserve==0.21.*" onnxruntime
# MLServer 1.7's inference workers call asyncio.get_event_loop() before they run a loop,
# which uvloop 0.22 and later refuse ("There is no current event loop"): the model never
# loads with parallel_workers >= 1 (its default). uvloop 0.21 is the last that works.
make_venv mlserver \
    "import mlserver, onnxruntime, uvloop; assert uvloop.__version__ < '0.22', uvloop.__version__" \
    "mlserver==1.7.*" onnxruntime "uvloop<0.22"

echo
echo "--kserve-python $dir/kserve/bin/python --mlserver-python $dir/mlserver/bin/python"
