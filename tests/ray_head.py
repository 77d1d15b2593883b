"""A Ray head node a test starts with ``ray start --head --block`` and stops itself.

The head runs in a child process of its own session, so stopping it is a SIGTERM to that process,
which shuts down everything it started; whatever outlives it (found by session id, or by the head's
temp dir in a command line or working directory) is killed by PID. ``ray stop`` is never used: in
Ray 2.60 it cannot name a cluster and stops every Ray process on the machine, the suite's own
session cluster included. The head gets its own temp dir, loopback addresses, free ports and a
token (authentication on), and the test process never calls ``ray.init``.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
import pytest

RAY = str(Path(sys.executable).with_name("ray"))
# Ray's Unix socket paths live under the temp dir (<temp>/session_<date>_<pid>/sockets/plasma_store)
# and must fit in sun_path (108 bytes): leave room for the ~65 characters Ray appends.
MAX_TEMP_DIR_LENGTH = 40
LEFTOVER_GRACE_S = 20


def free_ports(count: int) -> list[int]:
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


def clean_environment() -> dict[str, str]:
    """This process's environment without any Ray setting (the session cluster's address included)."""
    return {name: value for name, value in os.environ.items() if not name.startswith("RAY_")}


def short_temp_dir(tmp_path_factory: pytest.TempPathFactory, prefix: str) -> tuple[Path, bool]:
    """A Ray temp dir short enough for its socket paths; True when the caller must remove it."""
    candidate = tmp_path_factory.mktemp(prefix)
    if len(str(candidate)) <= MAX_TEMP_DIR_LENGTH:
        return candidate, False
    fallback = Path(tempfile.mkdtemp(prefix=prefix))
    assert len(str(fallback)) <= MAX_TEMP_DIR_LENGTH, (
        f"no temp dir short enough for Ray's sockets: {fallback}"
    )
    return fallback, True


def write_token(path: Path) -> Path:
    """A fresh token file, as ``ray get-auth-token --generate`` writes it."""
    path.write_text(secrets.token_hex(32))
    path.chmod(0o600)
    return path


def head_environment(token_path: Path, dashboard_port: int) -> dict[str, str]:
    """What every test head runs with: the venv's scripts, token auth, its own State API address."""
    return clean_environment() | {
        # The venv's scripts (`raytuner`) on PATH, as when the venv is activated before `ray start`.
        "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]),
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN_PATH": str(token_path),
        "HF_HUB_OFFLINE": "1",
        # Ray Train's placement-group cleaner asks the State API whether the controller is alive
        # without an address; Ray then takes the latest cluster recorded in the machine-wide
        # ray_current_cluster file (written by any other Ray on this machine), finds no such actor
        # there and removes the run's placement group. Naming this head's API server keeps every
        # process of this head talking to its own dashboard.
        "RAY_API_SERVER_ADDRESS": f"http://127.0.0.1:{dashboard_port}",
        # Nothing to drain on a test head: shut down at once on SIGTERM (default: wait 30 s).
        "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0",
    }


def start_head_process(
    *,
    temp_dir: Path,
    gcs_port: int,
    dashboard_port: int,
    agent_port: int,
    client_port: int,
    env: dict[str, str],
    log_path: Path,
    extra_args: list[str],
) -> subprocess.Popen[bytes]:
    """``ray start --head --block`` with the dashboard on loopback, in a session of its own."""
    with log_path.open("wb") as log:
        return subprocess.Popen(
            [
                RAY,
                "start",
                "--head",
                "--block",
                f"--temp-dir={temp_dir}",
                f"--port={gcs_port}",
                "--include-dashboard=true",
                "--dashboard-host=127.0.0.1",
                f"--dashboard-port={dashboard_port}",
                f"--dashboard-agent-listen-port={agent_port}",
                f"--ray-client-server-port={client_port}",
                "--disable-usage-stats",
                *extra_args,
            ],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own session: every process it starts can be found and stopped
        )


def processes_of(session_id: int, temp_dir: Path) -> list[psutil.Process]:
    """Processes in the head's session, or whose command line or working directory is under its temp dir."""
    marker = f"{temp_dir}{os.sep}"
    found = []
    for process in psutil.process_iter(["pid", "cmdline", "cwd"]):
        if process.pid == os.getpid():
            continue
        try:
            in_session = os.getsid(process.pid) == session_id
        except OSError:
            continue
        command = " ".join(process.info["cmdline"] or [])
        if in_session or marker in command or (process.info["cwd"] or "").startswith(marker):
            found.append(process)
    return found


@dataclass
class Head:
    """A head node a test started: its process, addresses, token and client environments."""

    process: subprocess.Popen[bytes]
    temp_dir: Path
    token_path: Path
    dashboard_url: str
    log_path: Path
    stop_timeout_s: float = 60
    stopped: bool = field(default=False)

    def client_env(self, *, token: str | None = "file") -> dict[str, str]:
        """A job client's environment: the head's token file (``"file"``), a token value, or none."""
        env = clean_environment() | {"RAY_ADDRESS": self.dashboard_url}
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

    def api(self, path: str) -> Any:
        """GET a dashboard endpoint with the token, as JSON."""
        request = urllib.request.Request(
            f"{self.dashboard_url}{path}",
            headers={"Authorization": f"Bearer {self.token_path.read_text().strip()}"},
        )
        with urllib.request.urlopen(request, timeout=10) as response:
            return json.load(response)

    def wait_until_ready(self, timeout_s: float, *, ready: Any = None) -> None:
        """The job API answers an authenticated request (and ``ready()`` holds, when given)."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise AssertionError(f"ray start exited with {self.process.returncode}:\n{self.log_tail()}")
            with contextlib.suppress(urllib.error.URLError, OSError, KeyError):
                self.api("/api/jobs/")
                if ready is None or ready():
                    return
            time.sleep(0.5)
        raise AssertionError(f"the head did not come up in {timeout_s} s:\n{self.log_tail()}")

    def stop(self) -> list[str]:
        """SIGTERM the ``ray start --block`` process and wait; kill by PID whatever outlives it.

        Returns those processes (PID and command), empty when the head took everything down itself.
        """
        if self.stopped:
            return []
        self.stopped = True
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=self.stop_timeout_s)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=30)
        # The head's children may still be on their way out when it exits; give them a moment.
        _, alive = psutil.wait_procs(processes_of(self.process.pid, self.temp_dir), timeout=LEFTOVER_GRACE_S)
        killed = []
        for process in alive:
            with contextlib.suppress(psutil.NoSuchProcess):
                killed.append(f"{process.pid} {' '.join(process.cmdline())[:200]}")
                process.kill()
        psutil.wait_procs(alive, timeout=10)
        return killed

    def log_tail(self) -> str:
        return self.log_path.read_text(errors="replace")[-4000:] if self.log_path.exists() else ""
