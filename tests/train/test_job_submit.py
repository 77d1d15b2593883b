"""``ray job submit -- raytuner train`` on a real head node with token authentication, end to end.

The test owns one head node, started with ``ray start --head --block`` in a child process of its own
(a new session): stopping it is a SIGTERM to that process, which shuts down everything it started.
``ray stop`` is not used: in Ray 2.60 it has no way to name a cluster and stops every Ray process on
the machine, the suite's own session cluster included. The head gets its own temp dir, loopback
addresses and free ports, and the test process never calls ``ray.init``.

What is shown: a submission without the token is refused; with it, the job runs ``raytuner train``
from a ``--working-dir`` holding only relative paths, so raytuner places the outputs and caches under
``ray_storage_path``; rank 0's ``ray.util.metrics`` gauges reach the head's Prometheus endpoint.
"""

from __future__ import annotations

import json
import math
import re
import secrets
import shutil
import subprocess
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from raytuner.evaluate.metrics import read_metrics
from raytuner.filenames import ADAPTER_FILENAME
from tests.cache.helpers import draw_images, image_dataset, text_dataset, write_run_files
from tests.ray_head import (
    RAY,
    Head,
    free_ports,
    head_environment,
    short_temp_dir,
    start_head_process,
    write_token,
)

pytestmark = pytest.mark.slow

STEPS = 4
HEAD_START_TIMEOUT_S = 120
JOB_TIMEOUT_S = 900
METRICS_GRACE_S = 30
HEAD_STOP_TIMEOUT_S = 60
LOSS_SAMPLE = re.compile(r"^ray_raytuner_train_loss\{(?P<tags>[^}]*)\}\s+(?P<value>\S+)\s*$", re.MULTILINE)


@dataclass
class SubmitHead(Head):
    """The head, with its Prometheus endpoint."""

    metrics_url: str = ""


@pytest.fixture
def ray_head(tmp_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[SubmitHead]:
    """A token-authenticated head node on loopback, owned (and stopped) by this test."""
    temp_dir, remove_temp_dir = short_temp_dir(tmp_path_factory, "rh")
    token_path = write_token(tmp_path / "auth_token")
    gcs, dashboard, metrics, agent, client = free_ports(5)
    log_path = tmp_path / "head.log"
    process = start_head_process(
        temp_dir=temp_dir,
        gcs_port=gcs,
        dashboard_port=dashboard,
        agent_port=agent,
        client_port=client,
        env=head_environment(token_path, dashboard),
        log_path=log_path,
        extra_args=["--node-ip-address=127.0.0.1", "--num-cpus=8", f"--metrics-export-port={metrics}"],
    )
    head = SubmitHead(
        process=process,
        temp_dir=temp_dir,
        token_path=token_path,
        dashboard_url=f"http://127.0.0.1:{dashboard}",
        log_path=log_path,
        stop_timeout_s=HEAD_STOP_TIMEOUT_S,
        metrics_url=f"http://127.0.0.1:{metrics}/metrics",
    )
    try:
        head.wait_until_ready(HEAD_START_TIMEOUT_S)
        yield head
    finally:
        head.stop()
        if remove_temp_dir:
            shutil.rmtree(temp_dir, ignore_errors=True)


class MetricsPoller(threading.Thread):
    """Reads the metrics endpoint every second until it shows a training-loss sample or is stopped."""

    def __init__(self, url: str) -> None:
        super().__init__(daemon=True)
        self.url = url
        self.samples: list[tuple[str, float]] = []
        self.last_error = ""
        self._done = threading.Event()

    def run(self) -> None:
        while not self._done.is_set() and not self.samples:
            try:
                with urllib.request.urlopen(self.url, timeout=5) as response:
                    text = response.read().decode()
                self.samples = [(m["tags"], float(m["value"])) for m in LOSS_SAMPLE.finditer(text)]
            except (urllib.error.URLError, OSError, ValueError) as error:
                self.last_error = repr(error)
            self._done.wait(1.0)

    def stop(self) -> None:
        self._done.set()
        self.join(timeout=10)


def _job_files(root: Path, model: Path, storage: Path) -> Path:
    """A working dir with the config, LoKr and data-backend files and the images, all by relative path."""
    job = root / "job"
    draw_images(job / "images", [(64, 64)] * 6)
    write_run_files(
        job,
        model,
        [
            image_dataset(Path("images"), "cache/vae", resolution_type="pixel"),
            text_dataset("cache/text"),
        ],
        lycoris_config="lycoris_config.json",
        data_backend_config="multidatabackend.json",
        output_dir="output",
        ray_storage_path=str(storage),
        max_train_steps=STEPS,
        train_batch_size=2,
        mixed_precision="no",
        gradient_checkpointing=False,
        optimizer="torch-adamw",
        learning_rate=1e-2,
        lr_scheduler="constant",
        caption_dropout_probability=0,
        validation_prompt=None,
        checkpoint_step_interval=2,
    )
    return job


def test_submitted_job_trains_with_token_and_publishes_metrics(
    ray_head: SubmitHead, tmp_path: Path, tiny_cosmos_dir: Path
) -> None:
    storage = tmp_path / "storage"
    job = _job_files(tmp_path, tiny_cosmos_dir, storage)
    entrypoint = ["--", "raytuner", "train", "--config", "config.json"]
    runtime_env = json.dumps({"env_vars": {"HF_HUB_OFFLINE": "1"}})

    # Without the token, or with another one, the job server turns the client away before any upload.
    submit_args = ("job", "submit", "--no-wait", "--working-dir", ".", *entrypoint)
    refused = ray_head.ray(*submit_args, token=None, cwd=job)
    assert refused.returncode != 0
    assert "Missing authentication token" in refused.stdout + refused.stderr, refused.stderr[-2000:]
    wrong = ray_head.ray(*submit_args, token=secrets.token_hex(32), cwd=job)
    assert wrong.returncode != 0
    assert "Invalid authentication token" in wrong.stdout + wrong.stderr, wrong.stderr[-2000:]
    listed = ray_head.ray("job", "list")
    assert listed.returncode == 0 and "raytuner train" not in listed.stdout + listed.stderr

    submission_id = f"raytuner-{secrets.token_hex(4)}"
    poller = MetricsPoller(ray_head.metrics_url)
    poller.start()
    submit_log = tmp_path / "submit.log"
    with submit_log.open("w") as log:
        # Blocks until the job ends, tailing its logs; exits 1 when the job fails.
        submit = subprocess.Popen(
            [
                RAY,
                "job",
                "submit",
                "--submission-id",
                submission_id,
                "--working-dir",
                ".",
                "--runtime-env-json",
                runtime_env,
                *entrypoint,
            ],
            env=ray_head.client_env(),
            cwd=job,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        try:
            returncode = submit.wait(timeout=JOB_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            submit.kill()
            submit.wait(timeout=30)
            ray_head.ray("job", "stop", submission_id)
            returncode = None
    # The gauges stay on the endpoint after the job (the metrics agent keeps the last value), but
    # are exported every few seconds: a short run may end before the first export.
    poller.join(timeout=METRICS_GRACE_S)
    poller.stop()

    status = ray_head.ray("job", "status", submission_id)
    if returncode != 0 or f"Job '{submission_id}' succeeded" not in status.stdout + status.stderr:
        logs = ray_head.ray("job", "logs", submission_id)
        print("---- ray job logs ----", logs.stdout[-20000:], logs.stderr[-2000:], sep="\n")
        print("---- ray job submit ----", submit_log.read_text()[-5000:], sep="\n")
        print("---- head ----", ray_head.log_tail(), sep="\n")
        pytest.fail(f"job {submission_id} did not succeed (submit exit {returncode}): {status.stdout[-500:]}")

    # ray_gpus_per_worker left unset: chosen once connected to the job's cluster, which has no GPU
    # and no autoscaler to add one; the start-of-run line says so.
    assert (
        "1 worker(s) x {CPU: 1, GPU: 0} (CPU: no GPU on this Ray cluster and its autoscaler has no GPU node type)"
        in submit_log.read_text()
    )

    # Relative output and cache paths were placed under ray_storage_path, not in the job's copy.
    output = storage / "output"
    assert (output / ADAPTER_FILENAME).is_file()
    steps = [entry for entry in read_metrics(output / "logs" / "metrics.jsonl") if "loss" in entry]
    assert [entry["step"] for entry in steps] == list(range(1, STEPS + 1))
    assert all(math.isfinite(entry["loss"]) for entry in steps)
    assert any((storage / "cache").rglob("*.parquet"))
    checkpoints = sorted(path.name for path in storage.glob("raytuner-*/checkpoint-*"))
    assert checkpoints == ["checkpoint-0000002", "checkpoint-0000004"], checkpoints
    assert not (job / "output").exists() and not (job / "cache").exists()

    # Rank 0's gauge, as Prometheus reads it from the head: Ray prefixes "ray_", tag run=<run name>.
    assert poller.samples, (
        f"no ray_raytuner_train_loss sample on {ray_head.metrics_url} ({poller.last_error})"
    )
    (run_folder,) = storage.glob("raytuner-*")  # Ray Train's run folder is named after the run
    tags, value = poller.samples[0]
    assert f'run="{run_folder.name}"' in tags, tags
    assert math.isfinite(value)

    left = ray_head.stop()
    assert left == [], f"processes of the head still running after SIGTERM: {left}"
    assert ray_head.process.returncode is not None
