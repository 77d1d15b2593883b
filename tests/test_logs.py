"""Importing raytuner changes nothing in the process; each process sets up its logging where it starts."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

from raytuner import logs, upstream

REPO = Path(__file__).resolve().parents[1]


def run_python(code: str) -> str:
    """What ``code`` prints, run in a fresh interpreter with this checkout's raytuner first on the path."""
    done = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        cwd=REPO,
    )
    return done.stdout


# Records, for every logger level set and every environment variable written while the modules are
# imported, the file of the code that did it (stdlib frames in between skipped).
IMPORT_SIDE_EFFECTS = """
import json, logging, os, sys

def actor(frame):
    while frame is not None and frame.f_code.co_filename.startswith((STDLIB, "<frozen")):
        frame = frame.f_back
    return frame.f_code.co_filename if frame is not None else "?"

STDLIB = os.path.dirname(os.__file__)
changes = []
set_level = logging.Logger.setLevel

def recording_set_level(self, level):
    changes.append(["level", self.name, actor(sys._getframe(1))])
    set_level(self, level)

logging.Logger.setLevel = recording_set_level

def audit(event, args):
    if event in ("os.putenv", "os.unsetenv"):
        changes.append(["environ", str(args[0]), actor(sys._getframe(1))])

sys.addaudithook(audit)
root_handlers = list(logging.getLogger().handlers)
import raytuner, raytuner.cli, raytuner.train.launcher, raytuner.tune.command, raytuner.logs, raytuner.upstream
print(json.dumps({"changes": changes, "root_handlers_changed": logging.getLogger().handlers != root_handlers}))
"""


def test_importing_raytuner_sets_no_logger_level_and_no_environment_variable() -> None:
    found = json.loads(run_python(IMPORT_SIDE_EFFECTS).strip().splitlines()[-1])
    package = str(REPO / "raytuner")
    assert [change for change in found["changes"] if change[2].startswith(package)] == []
    assert not found["root_handlers_changed"]


COMMAND_START = """
import logging, os
from raytuner.cli import disable_hub_telemetry
from raytuner.logs import set_up_command
os.environ.pop("HF_HUB_DISABLE_TELEMETRY", None)
set_up_command(verbose=False)
disable_hub_telemetry()
print(logging.getLogger().level, logging.getLogger("httpx2").level,
      logging.getLogger("torch.utils._pytree").level, os.environ["HF_HUB_DISABLE_TELEMETRY"])
"""


def test_the_command_sets_up_logging_and_hub_telemetry_where_it_starts() -> None:
    assert run_python(COMMAND_START).split() == [
        str(logging.INFO),
        str(logging.WARNING),
        str(logging.ERROR),
        "1",
    ]


def test_rays_worker_set_up_hook_finds_and_runs_raytuners() -> None:
    from ray._private.runtime_env.setup_hook import load_and_execute_setup_hook

    names = (*upstream.STARTUP_WARNING_LOGGERS, *upstream.CHATTY_LOGGERS, upstream.LYCORIS_LOGGER)
    saved = {name: logging.getLogger(name).level for name in names}
    try:
        # What a Ray worker does with the runtime env's hook before its first task.
        assert load_and_execute_setup_hook(logs.ray_job_runtime_env()["worker_process_setup_hook"]) is None
        assert all(
            logging.getLogger(name).level == logging.ERROR for name in upstream.STARTUP_WARNING_LOGGERS
        )
        assert logging.getLogger(upstream.LYCORIS_LOGGER).level == logging.WARNING
    finally:
        for name, level in saved.items():
            logging.getLogger(name).setLevel(level)
    assert logs.ray_job_runtime_env({"A": "1"})["env_vars"] == {"A": "1"}
