#!/usr/bin/env bash
# Build the wheels the lent GPU machine lacks into bench/wheels/ (git-ignored) for bench/gpu_run.sh.
#
#   bash bench/gpu_wheels.sh            # after `make install`: versions come from .venv and constraints.txt
#
# That machine has Python 3.12, torch, transformers, accelerate, safetensors, numpy and pytest, but
# neither diffusers, lycoris-lora nor DeepSpeed, and no network. Every wheel here is pure Python
# except pydantic-core (DeepSpeed checks its config with pydantic), fetched for CPython 3.12 on
# x86-64, and torchao (a quantised base), whose one wheel is built for CPython's stable ABI. DeepSpeed publishes only a source release: it is built here without its compiled ops
# (DS_BUILD_OPS=0), which DeepSpeed would compile on first use; the ZeRO stages raytuner runs, with
# raytuner's own optimizer, need none. Ray is not among them: its wheel is larger than what one call
# may carry, and the GPU benchmark runs raytuner's per-worker step without it.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-.venv/bin/python}
WHEELS=bench/wheels
# One call to the machine carries at most 64 MiB: the working tree and these wheels together.
LIMIT_MIB=60

pinned() { # the tested version, from constraints.txt
    grep -E "^$1==" constraints.txt | cut -d= -f3
}
installed() { # the version installed beside the pinned ones here
    "$PYTHON" -c 'import importlib.metadata as m, sys; print(m.version(sys.argv[1]))' "$1"
}

rm -rf "$WHEELS"
mkdir -p "$WHEELS"

pure=(
    "diffusers==$(pinned diffusers)"
    "lycoris-lora==$(pinned lycoris-lora)"
    # tests/train/test_optim.py (one of the gpu-marked test files) imports both at the top
    "torch-optimi==$(pinned torch-optimi)"
    "prodigyopt==$(pinned prodigyopt)"
    # imported by the packages above and missing there
    "toml==$(installed toml)"                   # lycoris
    "hjson==$(installed hjson)"                 # deepspeed
    "pydantic==$(installed pydantic)"           # deepspeed
    "annotated-types==$(installed annotated-types)"
    "typing-inspection==$(installed typing-inspection)"
    "typing-extensions==$(installed typing-extensions)" # pydantic needs a recent one
    # base_model_precision (tests/test_quantize.py, bench/quantized_memory.py)
    "optimum-quanto==$(pinned optimum-quanto)"
)
"$PYTHON" -m pip download --quiet --no-deps --only-binary=:all: --dest "$WHEELS" "${pure[@]}"
"$PYTHON" -m pip download --quiet --no-deps --only-binary=:all: --dest "$WHEELS" \
    --python-version 3.12 --implementation cp --abi cp312 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux_2_28_x86_64 \
    "pydantic-core==$(installed pydantic-core)"
# torchao ships one CPython-ABI-stable (abi3) wheel with its compiled kernels.
"$PYTHON" -m pip download --quiet --no-deps --only-binary=:all: --dest "$WHEELS" \
    --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 \
    "torchao==$(pinned torchao)"
DS_BUILD_OPS=0 "$PYTHON" -m pip wheel --quiet --no-deps --no-cache-dir --no-binary deepspeed \
    --wheel-dir "$WHEELS" "deepspeed==$(pinned deepspeed)"

# Pure Python where it should be, no compiled DeepSpeed op inside, and within the carry limit.
"$PYTHON" - "$WHEELS" "$LIMIT_MIB" <<'EOF'
import sys
import zipfile
from pathlib import Path

folder, limit_mib = Path(sys.argv[1]), float(sys.argv[2])
total = 0
for wheel in sorted(folder.glob("*.whl")):
    total += wheel.stat().st_size
    tag = wheel.name.removesuffix(".whl").split("-")[-3:]
    compiled = [n for n in zipfile.ZipFile(wheel).namelist() if n.endswith((".so", ".pyd"))]
    if wheel.name.startswith("pydantic_core-"):
        assert tag[:2] == ["cp312", "cp312"], f"{wheel.name}: not a CPython 3.12 wheel"
    elif wheel.name.startswith("torchao-"):
        assert tag[1] == "abi3", f"{wheel.name}: not an abi3 wheel"
    else:
        assert tag[1:] == ["none", "any"] and not compiled, f"{wheel.name}: not pure Python ({compiled[:3]})"
    print(f"{wheel.stat().st_size / 2**20:7.2f} MiB  {wheel.name}")
print(f"{total / 2**20:7.2f} MiB  in all (limit {limit_mib:g} MiB with the working tree)")
assert total / 2**20 < limit_mib, "the wheels do not fit in one call's carry limit"
EOF
