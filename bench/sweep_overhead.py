"""What a ``raytuner tune`` trial costs beyond its training steps, on the demo's tiny Cosmos2 model.

Runs ``raytuner tune`` in a fresh process (its own local Ray) on a copy of
``configs/demo/cosmos2image/config.json`` — its tiny checkpoint and images, written by
``make demo`` — sweeping the learning rate only, early stopping off, ``--concurrent`` trials at a
time. From each trial's Ray Tune ``result.json`` (one line per report, ``time_total_s`` counted
from the trial function's start) and its ``logs/metrics.jsonl`` (``step_time_s`` per step) it
prints, per trial: the time to the first report less the first step (Ray Train worker group,
model and LoKr set-up, the baseline eval), the steps themselves, and the rest (evals, checkpoints,
reports); and the whole sweep's wall time with its one cache build.

    make demo                                   # once: the tiny model and images
    .venv/bin/python bench/sweep_overhead.py    # the RESULTS.md table: 4 trials x 12 steps, one at a time
    .venv/bin/python bench/sweep_overhead.py --trials 4 --concurrent 2
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEMO_CONFIG = REPO / "configs" / "demo" / "cosmos2image" / "config.json"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=4)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--concurrent", type=int, default=1)
    parser.add_argument("--workers", type=int, default=1, help="Ray Train workers per trial")
    args = parser.parse_args()
    if not (REPO / "output" / "demo" / "models" / "cosmos2image").is_dir():
        print(
            "error: run `make demo` first: this bench reads the demo's tiny model and images", file=sys.stderr
        )
        return 2
    work = Path(tempfile.mkdtemp(prefix="raytuner-sweep-bench-"))
    config = json.loads(DEMO_CONFIG.read_text())
    config["output_dir"] = str(work / "output")
    (work / "config.json").write_text(json.dumps(config, indent=2))
    sweep = {
        "name": "bench",
        "num_samples": args.trials,
        "max_concurrent_trials": args.concurrent,
        "parameters": {"learning_rate": {"type": "loguniform", "low": 0.003, "high": 0.1}},
        "fixed": {"max_train_steps": args.steps, "eval_steps_interval": 4, "checkpoint_step_interval": 4},
        "sampler": {"n_startup_trials": 2},
        "early_stopping": False,
        "resources_per_trial": {"num_workers": args.workers},
    }
    (work / "sweep.json").write_text(json.dumps(sweep, indent=2))
    command = [str(Path(sys.executable).with_name("raytuner")), "tune"]
    command += ["--config", str(work / "config.json"), "--sweep", str(work / "sweep.json")]
    env = {name: value for name, value in os.environ.items() if not name.startswith("RAY_")}
    started = time.perf_counter()
    completed = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - started
    if completed.returncode != 0:
        print(completed.stdout[-3000:], completed.stderr[-3000:], sep="\n")
        return completed.returncode
    build = re.search(
        r"(\d+) image\(s\) through the VAE .*whole build ([0-9.]+) s", completed.stdout + completed.stderr
    )

    rows = []
    for result_file in sorted((work / "output" / "ray" / "bench").glob("run_trial_*/result.json")):
        reports = [json.loads(line) for line in result_file.read_text().splitlines() if line.strip()]
        trial_id = reports[-1]["trial_id"]
        number = int(re.search(rf"_{trial_id}_(\d+)_", result_file.parent.name).group(1))
        metrics = [
            json.loads(line)
            for line in (work / "output" / "trials" / trial_id / "logs" / "metrics.jsonl")
            .read_text()
            .splitlines()
        ]
        steps = sum(entry["step_time_s"] for entry in metrics if "step_time_s" in entry)
        first_step = next(entry["step_time_s"] for entry in metrics if "step_time_s" in entry)
        to_first = reports[0]["time_total_s"] - first_step
        total = reports[-1]["time_total_s"]
        rows.append((number, trial_id, to_first, steps, total - to_first - steps, total))

    print(f"machine: {platform.node()} ({os.cpu_count()} cores), {platform.platform()}")
    print(
        f"{args.trials} trials x {args.steps} steps, {args.concurrent} at a time, {args.workers} worker(s) each"
    )
    print(f"{'#':>2}  {'trial':8}  {'start-up s':>10}  {'steps s':>8}  {'evals etc. s':>12}  {'trial s':>8}")
    for number, trial_id, to_first, steps, rest, total in sorted(rows):
        print(f"{number:>2}  {trial_id:8}  {to_first:10.1f}  {steps:8.2f}  {rest:12.1f}  {total:8.1f}")
    cache = f"{build.group(1)} image(s) encoded, {build.group(2)} s" if build else "?"
    print(f"sweep wall time {wall:.1f} s (its one cache build: {cache}), outputs in {work}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
