"""``raytuner check-config`` reads files: it imports no diffusers, transformers or lycoris.

Those packages took most of the seconds the check used to take (``bench/check_config_time.py``).
torch is still imported: the model families' classes, which the config checks read for their
aliases, fixed schedules and advice, live in modules built on torch, and the pre-flight check
asks torch for this machine's CUDA devices and builds the polynomial and sine schedulers to check
their settings.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import raytuner

REPO_ROOT = Path(__file__).resolve().parents[2]
QUICKSTARTS = [
    REPO_ROOT / "configs" / "cosmos2image" / "config.json",
    REPO_ROOT / "configs" / "omnigen" / "config.json",
]
NOT_IMPORTED = ("diffusers", "transformers", "lycoris")

# Checks each config in one process (as `raytuner check-config` would, one after the other), then
# reports what each check returned and which of the packages above it left imported.
PROBE = """
import json, sys
from raytuner.cli import main
codes = [main(["check-config", "--config", path]) for path in sys.argv[2:]]
heavy = json.loads(sys.argv[1])
print(json.dumps({"codes": codes, "imported": [name for name in heavy if name in sys.modules]}))
"""


@pytest.mark.slow  # a raytuner process: seconds of imports
def test_check_config_imports_no_diffusers_transformers_or_lycoris(tmp_path: Path) -> None:
    for folder in ("datasets/pseudo-camera-10k", "datasets/dreambooth-subject"):
        (tmp_path / folder).mkdir(parents=True)  # empty folders pass the check
    command = [sys.executable, "-c", PROBE, json.dumps(NOT_IMPORTED), *map(str, QUICKSTARTS)]
    # The raytuner under test, wherever the process starts (a relative PYTHONPATH would not follow).
    code = str(Path(raytuner.__file__).resolve().parents[1])
    pythonpath = os.pathsep.join(filter(None, [code, os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": pythonpath}
    done = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.splitlines()[-1])
    assert report["codes"] == [0, 0], done.stdout[-3000:]
    assert report["imported"] == []
