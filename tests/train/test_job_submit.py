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

import contextlib
import json
import math
import os
import re
import secrets
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from raytuner.adapters import ADAPTER_FILENAME
from raytuner.evaluate.metrics import read_metrics
from tests.cache.helpers import draw_images, image_dataset, text_dataset, write_run_files

pytestmark = pytest.mark.slow

STEPS = 4
RAY = str(Path(sys.executable).with_name("ray"))
# Ray's Unix socket paths live under the temp dir (<temp>/session_<date>_<pid>/sockets/plasma_store)
# and must fit in sun_path (108 bytes): leave room for the ~65 characters Ray appends.
MAX_TEMP_DIR_LENGTH = 40
HEAD_START_TIMEOUT_S = 120
JOB_TIMEOUT_S = 900
METRICS_GRACE_S = 30
HEAD_STOP_TIMEOUT_S = 60
LOSS_SAMPLE = re.compile(r"^ray_raytuner_train_loss\{(?P<tags>[^}]*)\}\s+(?P<value>\S+)\s*$", re.MULTILINE)


def _free_ports(count: int) -> list[int]:
    """Distinct ports free on loopback now (held open together so that none is handed out twice)."""
    probes = []
    try:
        for _ in range(count):
            probe = socket.socket()
            probe.bind(("127.0.0.1", 0))
            probes.append(probe)
        return [int(probe.getsockname()[1]) for probe in probes]
    finally:
        for probe in probes:
            probe.close()


def _clean_environment() -> dict[str, str]:
    """This process's environment without any Ray setting (the session cluster's included)."""
    return {name: value for name, value in os.environ.items() if not name.startswith("RAY_")}


def _session_processes(session_id: int, temp_dir: Path) -> list[int]:
    """PIDs of processes in the head's session, or running with a cwd or command line under its temp dir."""
    found = []
    marker = str(temp_dir)
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            # Fields after the parenthesised command name: state ppid pgrp session ...
            session = int(stat.rsplit(")", 1)[1].split()[3])
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            try:
                cwd = os.readlink(entry / "cwd")
            except OSError:
                cwd = ""
        except (OSError, IndexError, ValueError):
            continue
        if session == session_id or marker in cmdline or cwd.startswith(marker):
            found.append(int(entry.name))
    return sorted(pid for pid in found if pid != os.getpid())


@dataclass
class Head:
    """A head node this test started: its process, addresses, token and client environments."""

    process: subprocess.Popen[bytes]
    temp_dir: Path
    token_path: Path
    dashboard_url: str
    metrics_url: str
    log_path: Path
    stopped: bool = field(default=False)

    def client_env(self, *, token: str | None = "file") -> dict[str, str]:
        """A job client's environment: the head's token file (``"file"``), a token value, or none."""
        env = _clean_environment() | {"RAY_ADDRESS": self.dashboard_url}
        if token == "file":
            env |= {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(self.token_path)}
        elif token is not None:
            env |= {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token}
        return env

    def ray(
        self, *args: str, timeout: float = 120, token: str | None = "file", cwd: Path | None = None
    ) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [RAY, *args],
            env=self.client_env(token=token),
            cwd=cwd,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )

    def stop(self) -> list[int]:
        """SIGTERM the ``ray start --block`` process and wait; kill by PID whatever of it is left.

        Returns the PIDs that had to be killed (empty when the head shut down on its own).
        """
        if self.stopped:
            return []
        self.stopped = True
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=HEAD_STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=30)
        deadline = time.monotonic() + 20
        left = _session_processes(self.process.pid, self.temp_dir)
        while left and time.monotonic() < deadline:
            time.sleep(0.5)
            left = _session_processes(self.process.pid, self.temp_dir)
        for pid in left:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        return left

    def log_tail(self) -> str:
        return self.log_path.read_text(errors="replace")[-4000:] if self.log_path.exists() else ""


def _wait_until_ready(head: Head) -> None:
    """The dashboard answers an authenticated request, and the job server lists jobs."""
    token = head.token_path.read_text().strip()
    deadline = time.monotonic() + HEAD_START_TIMEOUT_S
    while time.monotonic() < deadline:
        if head.process.poll() is not None:
            raise AssertionError(f"ray start exited with {head.process.returncode}:\n{head.log_tail()}")
        request = urllib.request.Request(
            f"{head.dashboard_url}/api/jobs/", headers={"Authorization": f"Bearer {token}"}
        )
        try:
            with urllib.request.urlopen(request, timeout=5) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(1)
    raise AssertionError(
        f"the head's job server did not answer in {HEAD_START_TIMEOUT_S} s:\n{head.log_tail()}"
    )


@pytest.fixture
def ray_head(tmp_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Head]:
    """A token-authenticated head node on loopback, owned (and stopped) by this test."""
    temp_dir = tmp_path_factory.mktemp("rh")  # short: under the base temp dir, not this test's folder
    assert len(str(temp_dir)) <= MAX_TEMP_DIR_LENGTH, (
        f"Ray temp dir {temp_dir} is too long for Ray's socket paths; use a shorter --basetemp"
    )
    token_path = tmp_path / "auth_token"
    token_path.write_text(secrets.token_hex(32))  # what `ray get-auth-token --generate` writes
    token_path.chmod(0o600)
    gcs, dashboard, metrics, agent, client = _free_ports(5)
    env = _clean_environment() | {
        # The venv's scripts (`raytuner`) on PATH, as when the venv is activated before `ray start`.
        "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]),
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN_PATH": str(token_path),
        "HF_HUB_OFFLINE": "1",
        # Ray Train's placement-group cleaner asks the State API whether the controller is alive
        # without an address; Ray then takes the latest cluster recorded in the machine-wide
        # ray_current_cluster file of its default temp dir (written by `ray start` and by
        # ray.cluster_utils.Cluster, so any other Ray on this machine), finds no such actor there
        # and removes the run's placement group. Naming this cluster's API server
        # keeps every process of this head talking to its own dashboard.
        "RAY_API_SERVER_ADDRESS": f"http://127.0.0.1:{dashboard}",
        # Nothing to drain on a test head: shut down at once on SIGTERM (default: wait 30 s).
        "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0",
    }
    log_path = tmp_path / "head.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [
                RAY,
                "start",
                "--head",
                "--block",
                "--node-ip-address=127.0.0.1",
                f"--temp-dir={temp_dir}",
                "--num-cpus=8",
                "--include-dashboard=true",
                "--dashboard-host=127.0.0.1",
                f"--port={gcs}",
                f"--dashboard-port={dashboard}",
                f"--metrics-export-port={metrics}",
                f"--dashboard-agent-listen-port={agent}",
                f"--ray-client-server-port={client}",
                "--disable-usage-stats",
            ],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own session: every process it starts can be found and stopped
        )
    head = Head(
        process=process,
        temp_dir=temp_dir,
        token_path=token_path,
        dashboard_url=f"http://127.0.0.1:{dashboard}",
        metrics_url=f"http://127.0.0.1:{metrics}/metrics",
        log_path=log_path,
    )
    try:
        _wait_until_ready(head)
        yield head
    finally:
        head.stop()


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
    ray_head: Head, tmp_path: Path, tiny_cosmos_dir: Path
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
