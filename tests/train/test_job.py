"""What Ray Train's controller unpickles (the worker function and the job) imports no model code.

The controller unpickles ``train_loop_per_worker`` and ``train_loop_config`` before it starts any
worker; diffusers, LyCORIS and transformers take seconds to import, which every run would wait for.
"""

from __future__ import annotations

import pickle
import subprocess
import sys
from pathlib import Path

import ray.cloudpickle

from raytuner.evaluate.wandb_tracker import WandbTarget
from raytuner.hub import HubTarget
from raytuner.storage import Location
from raytuner.train.job import TrainJob, train_job
from raytuner.train.layout import SharedRootMarker
from tests.cache.helpers import image_dataset, text_dataset, write_run_files
from tests.train.faults import KillWorker

MODEL_CODE = ("diffusers", "lycoris", "transformers", "deepspeed", "datasets")


def test_the_controller_unpickles_the_worker_function_and_job_without_model_code(tmp_path: Path) -> None:
    datasets = [
        image_dataset(tmp_path / "images", tmp_path / "cache/vae"),
        text_dataset(tmp_path / "cache/text"),
    ]
    run = write_run_files(tmp_path, tmp_path / "model", datasets).load()
    job = TrainJob(
        run=run,
        run_name="run",
        total_steps=2,
        steps_per_epoch=1,
        marker=SharedRootMarker(locations=(Location(uri=str(tmp_path)),), token="t"),
        hub=HubTarget(
            repo_id="user/adapter", endpoint="http://127.0.0.1:1", push_checkpoints=True, background=True
        ),
        wandb=WandbTarget(project="project", name="run", config={}),
        callbacks=(KillWorker(step=1, marker=tmp_path / "killed"),),
    )
    payload = ray.cloudpickle.dumps((train_job, {"job": job}))
    script = (
        "import pickle, sys\n"
        "function, config = pickle.loads(sys.stdin.buffer.read())\n"
        "assert config['job'].run_name == 'run', config\n"
        f"print(sorted(name for name in {MODEL_CODE!r} if name in sys.modules))\n"
    )
    imported = subprocess.run(
        [sys.executable, "-c", script], input=payload, capture_output=True, check=True
    ).stdout.decode()
    assert imported.strip() == "[]", imported
    assert pickle.loads(payload)[0] is train_job


def test_the_launcher_and_a_sweeps_trial_import_no_model_code() -> None:
    """`raytuner train`'s driver and each sweep trial's driver load no model: diffusers, LyCORIS and
    transformers are imported where a model is (the workers, the cache's encoders)."""
    script = (
        "import sys\n"
        "import raytuner.train.launcher, raytuner.tune.trial\n"
        f"print(sorted(name for name in {MODEL_CODE!r} if name in sys.modules))\n"
    )
    imported = subprocess.run([sys.executable, "-c", script], capture_output=True, check=True).stdout.decode()
    assert imported.strip() == "[]", imported
