#!/usr/bin/env bash
# Everything a GPU session checks and measures, in one prepared call (issue 15, "Done when"): the CUDA tests
# (`pytest -m cuda`: CUDA results against the CPU's), bench_gpu_epoch.py, the whole-run benchmark bench_run.py
# --device cuda, and bench_memory.py. Estimated at about 5 minutes on one H200 (not yet run on one); every step has
# its own time limit, so the whole script ends within 9 minutes even if a step hangs. Each step's output goes to
# $OUT/<step>.txt when OUT is set (the device tool's folder), else to benchmarks/gpu-session/ (ignored by git); a
# summary of the exit codes ends the output.
#
#   bash benchmarks/gpu_session.sh
#
# The device machine has PyTorch, scikit-learn, pandas and PyYAML but not torchattacks (APGD and Square): carry its
# pure-Python wheel in an ignored .whl/ folder, fetched here once with
#   echo /.whl/ >> .git/info/exclude; python3 -m pip download --no-deps torchattacks==3.5.1 -d .whl
# and name ".whl" in the run's carry; this script installs it into /tmp/site. Ray, Optuna and submitit are not
# needed: the CUDA tests live in test files that do not import them.
set -u
cd "$(dirname "$0")/.."
REPO=$PWD
OUT_DIR=${OUT:-$REPO/benchmarks/gpu-session}
mkdir -p "$OUT_DIR"
if [ -n "${PYTHON:-}" ]; then PY=$PYTHON; elif [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
if ! "$PY" -c "import torchattacks" 2>/dev/null && ls .whl/torchattacks-*.whl >/dev/null 2>&1; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/torchattacks-*.whl
    export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi

declare -a SUMMARY=()
step() {  # step NAME SECONDS COMMAND...: run with a time limit, output to the terminal and $OUT_DIR/NAME.txt
    local name=$1 limit=$2
    shift 2
    echo "=== $name (limit ${limit} s): $*"
    local started=$SECONDS
    timeout --kill-after=10 "$limit" "$@" 2>&1 | tee "$OUT_DIR/$name.txt"
    local code=${PIPESTATUS[0]}
    SUMMARY+=("$name: exit $code after $((SECONDS - started)) s$([ "$code" = 124 ] && echo ' (time limit)')")
}

step env 20 bash -c "nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv; $PY -c \
'import torch, sys; print(sys.version.split()[0], \"torch\", torch.__version__, \"cuda\", torch.version.cuda, \
torch.cuda.get_device_name() if torch.cuda.is_available() else \"NO CUDA\"); import torchattacks; \
print(\"torchattacks\", torchattacks.__version__)'"
step pytest_cuda 130 "$PY" -m pytest -m cuda -p no:cacheprovider -q -rs tests/test_train.py tests/test_attacks.py \
    tests/test_decoders.py tests/test_models.py
step bench_gpu_epoch 110 "$PY" benchmarks/bench_gpu_epoch.py
step bench_run 200 "$PY" benchmarks/bench_run.py --device cuda
step bench_memory 60 "$PY" benchmarks/bench_memory.py

echo "=== summary"
printf '%s\n' "${SUMMARY[@]}" | tee "$OUT_DIR/summary.txt"
