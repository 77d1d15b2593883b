#!/usr/bin/env bash
# The one command to run on the lent GPU machine, from the repository root:
#
#   bash bench/gpu_run.sh [bench/gpu_train.py arguments ...]
#
# with bench/wheels/ carried along (bench/gpu_wheels.sh builds it here). It installs the carried
# wheels and raytuner itself (no dependencies, no index: the machine has no network) into a fresh
# folder put first on PYTHONPATH, runs every gpu-marked test file with `pytest -m gpu`, then
# bench/gpu_train.py, and writes under $OUT: nvidia-smi.csv, gpu-tests.log, gpu-tests.xml,
# gpu_train.log, gpu_train.json and gpu_train.md.
#
# A folder on PYTHONPATH rather than a virtual environment: the machine's python3 is itself a
# virtual environment, and a venv made from it with --system-site-packages sees the base
# interpreter's packages, not that environment's torch.
set -uo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
OUT=${OUT:-bench/results/gpu_run}
TESTS_TIMEOUT_S=${TESTS_TIMEOUT_S:-240}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
# As the quickstarts advise for training; it also keeps the batch-size search's fits honest.
export PYTORCH_CUDA_ALLOC_CONF=${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}

SITE=$(mktemp -d)
shopt -s nullglob
wheels=(bench/wheels/*.whl)
if ((${#wheels[@]} == 0)); then
    echo "error: no wheels in bench/wheels/: run bench/gpu_wheels.sh here and carry bench/wheels" >&2
    exit 2
fi
pip_install=("$PYTHON" -m pip install --quiet --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE")
"${pip_install[@]}" "${wheels[@]}" || exit 2
# raytuner's own build leaves build/ and raytuner.egg-info/ in the working tree (both git-ignored).
"${pip_install[@]}" --no-build-isolation . || echo "note: raytuner not installed; it is imported from the working tree"
export PYTHONPATH="$SITE:$PWD${PYTHONPATH:+:$PYTHONPATH}"

nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,power.limit --format=csv \
    >"$OUT/nvidia-smi.csv" 2>&1 || true
"$PYTHON" -c 'import torch, diffusers, lycoris, deepspeed; print("torch", torch.__version__, "cuda", torch.cuda.is_available(), "diffusers", diffusers.__version__, "deepspeed", deepspeed.__version__)'

# Every test file that uses the gpu marker; one whose imports the machine lacks is reported, not fatal.
mapfile -t gpu_tests < <(grep -rlE "pytest\.mark\.gpu|pytestmark = .*gpu" tests --include='test_*.py' | sort)
timeout "$TESTS_TIMEOUT_S" "$PYTHON" -m pytest -m gpu -q -p no:cacheprovider --continue-on-collection-errors \
    --junitxml "$OUT/gpu-tests.xml" "${gpu_tests[@]}" 2>&1 | tee "$OUT/gpu-tests.log"
tests=${PIPESTATUS[0]}

"$PYTHON" bench/gpu_train.py --out "$OUT" "$@" 2>&1 | tee "$OUT/gpu_train.log"
bench=${PIPESTATUS[0]}

echo "gpu tests: exit $tests; benchmark: exit $bench; results in $OUT"
exit $((tests != 0 ? tests : bench))
