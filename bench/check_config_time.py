"""Wall time of ``raytuner check-config`` on the two quickstart configs (``configs/``).

Each run is a fresh ``python -m raytuner.cli check-config --config …`` process, timed from start to
exit, so the figure is what a person waits for: interpreter start, imports, loading and the
pre-flight check. The quickstart dataset folders (``datasets/…``, relative to where the command
runs) are created empty in a scratch folder that the runs start in: an empty folder passes the
check, so every run answers ``ok``. The median of ``--runs`` runs per config is printed, with the
modules the check left imported that are heavy to import (torch, diffusers, transformers, lycoris).

    .venv/bin/python bench/check_config_time.py             # the RESULTS.md table (5 runs a config)
    .venv/bin/python bench/check_config_time.py --runs 3
    .venv/bin/python bench/check_config_time.py --repo OTHER_CHECKOUT   # another checkout's code
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CONFIGS = ("cosmos2image", "omnigen")
HEAVY = ("torch", "diffusers", "transformers", "lycoris")

# Runs check-config in-process, then names which heavy packages it imported (a second look, in
# separate runs, so the timed runs import nothing extra).
PROBE = """
import sys
from raytuner.cli import main
try:
    main(["check-config", "--config", sys.argv[1]])
except SystemExit:
    pass
print("HEAVY=" + ",".join(name for name in {heavy!r} if name in sys.modules))
"""


def dataset_folders(config_dir: Path) -> list[str]:
    """The relative ``instance_data_dir`` values of a quickstart's dataloader."""
    entries = json.loads((config_dir / "multidatabackend.json").read_text())
    return [
        entry["instance_data_dir"]
        for entry in entries
        if "instance_data_dir" in entry and not Path(entry["instance_data_dir"]).is_absolute()
    ]


def time_once(config: Path, *, cwd: Path, env: dict[str, str]) -> float:
    command = [sys.executable, "-m", "raytuner.cli", "check-config", "--config", str(config)]
    start = time.perf_counter()
    done = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, check=False)
    elapsed = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"check-config failed on {config}:\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}")
    return elapsed


def heavy_imports(config: Path, *, cwd: Path, env: dict[str, str]) -> str:
    command = [sys.executable, "-c", PROBE.format(heavy=HEAVY), str(config)]
    done = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, check=False)
    lines = [line for line in done.stdout.splitlines() if line.startswith("HEAVY=")]
    return lines[-1].removeprefix("HEAVY=") if lines else "?"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5, help="timed runs per config (median reported)")
    parser.add_argument("--repo", type=Path, default=Path(__file__).resolve().parent.parent)
    args = parser.parse_args()
    repo = args.repo.resolve()
    env = dict(os.environ, PYTHONPATH=str(repo), HF_HUB_OFFLINE="1")
    print(
        f"python {sys.version.split()[0]}, {os.cpu_count()} CPUs, load {os.getloadavg()[0]:.1f}, code from {repo}"
    )
    print(f"{'config':<14} {'median s':>9} {'min s':>7} {'max s':>7}  heavy modules imported")
    with tempfile.TemporaryDirectory() as scratch:
        cwd = Path(scratch)
        for name in CONFIGS:
            config_dir = repo / "configs" / name
            for folder in dataset_folders(config_dir):
                (cwd / folder).mkdir(parents=True, exist_ok=True)
            config = config_dir / "config.json"
            time_once(config, cwd=cwd, env=env)  # warm the file cache (bytecode, shared libraries)
            times = [time_once(config, cwd=cwd, env=env) for _ in range(args.runs)]
            heavy = heavy_imports(config, cwd=cwd, env=env) or "none"
            print(
                f"{name:<14} {statistics.median(times):>9.2f} {min(times):>7.2f} {max(times):>7.2f}  {heavy}",
                flush=True,
            )


if __name__ == "__main__":
    main()
