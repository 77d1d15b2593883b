"""Weights & Biases, for ``report_to`` = ``wandb`` or ``all``: rank 0 logs what TensorBoard gets.

The driver decides everything about the W&B run before Ray starts (:func:`wandb_target`): project
``tracker_project_name``, name ``tracker_run_name``, the run's config with its secrets redacted,
and for a sweep trial the sweep's name as the group. Rank 0 opens the run when training starts
(:class:`WandbRun`) and logs the same metrics and validation images as TensorBoard, under the
same names (``train/loss``, ``validation/<image>``), into ``output_dir/logs/wandb``.

Credentials are W&B's own: ``wandb login`` (which writes ``~/.netrc``) or ``WANDB_API_KEY``.
raytuner only asks whether one is there, never reads it into anything it writes, and passes no key
to ``wandb.init``; each worker's W&B client finds the key the same way on its own node.
``WANDB_MODE=offline`` writes the run locally (``wandb sync`` uploads it later).
"""

from __future__ import annotations

import importlib.util
import logging
import netrc
import os
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

logger = logging.getLogger(__name__)

WANDB_TRACKERS = ("wandb", "all")
IMAGE_LAYOUTS = ("gallery", "table")
# W&B modes that need no login: offline writes the run locally, disabled logs nothing.
_NO_LOGIN_MODES = ("offline", "dryrun", "disabled")
_DEFAULT_BASE_URL = "https://api.wandb.ai"
TRANSACTION_LOG_FLUSH_S = 1.0
# Where the id of the run's W&B run is kept, so a worker restarted from a checkpoint resumes it.
RUN_ID_FILE = "wandb-run-id"
# Non-secret client settings read on the driver and handed to the workers (a cluster's workers
# do not inherit the shell of the person who submitted the job).
_FORWARDED_ENV = {"WANDB_MODE": "mode", "WANDB_ENTITY": "entity", "WANDB_BASE_URL": "base_url"}


def wandb_installed() -> bool:
    return importlib.util.find_spec("wandb") is not None


def uses_wandb(report_to: str) -> bool:
    """``wandb`` always; ``all`` when the package is installed, as accelerate's ``all`` does."""
    return report_to == "wandb" or (report_to == "all" and wandb_installed())


def _has_credentials(base_url: str) -> bool:
    """Whether a key is there for ``base_url``, from the environment or ``wandb login``'s netrc entry."""
    if os.environ.get("WANDB_API_KEY") or os.environ.get("WANDB_IDENTITY_TOKEN_FILE"):
        return True
    host = urlparse(base_url).hostname or ""
    try:
        return netrc.netrc().authenticators(host) is not None
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        return False


def wandb_problem(report_to: str, image_layout: str | None = None) -> str | None:
    """Why rank 0 could not log to W&B as configured, found on the driver before any work; or None."""
    if image_layout is not None and image_layout not in IMAGE_LAYOUTS:
        return (
            f"'tracker_image_layout' = {image_layout!r}: expected one of {', '.join(IMAGE_LAYOUTS)} "
            "(how validation images appear in W&B)"
        )
    if report_to == "wandb" and not wandb_installed():
        return (
            "'report_to' = 'wandb': the wandb package is not installed; "
            "pip install 'raytuner[wandb]' (or use report_to 'tensorboard')"
        )
    if not uses_wandb(report_to):
        return None
    mode = os.environ.get("WANDB_MODE", "").strip().lower()
    if mode in _NO_LOGIN_MODES:
        return None
    base_url = os.environ.get("WANDB_BASE_URL") or _DEFAULT_BASE_URL
    if _has_credentials(base_url):
        return None
    return (
        f"'report_to' = {report_to!r} logs to Weights & Biases, but no W&B login was found for "
        f"{urlparse(base_url).hostname}: run `wandb login` or set WANDB_API_KEY (on every node of a "
        "cluster), or set WANDB_MODE=offline to write the run locally"
    )


@dataclass(frozen=True, kw_only=True)
class WandbTarget:
    """The W&B run a training run logs to, decided by the driver; holds no credential."""

    project: str
    name: str
    config: dict[str, Any]  # the run's settings, secrets already redacted
    group: str | None = None  # a sweep's trials share their sweep's name
    job_type: str = "train"
    tags: tuple[str, ...] = ()
    image_layout: str = "gallery"
    client: dict[str, str] = field(default_factory=dict)  # mode / entity / base_url from the driver


def client_settings() -> dict[str, str]:
    """The non-secret W&B client settings of this process's environment, for rank 0 elsewhere."""
    return {
        setting: os.environ[variable].strip()
        for variable, setting in _FORWARDED_ENV.items()
        if os.environ.get(variable, "").strip()
    }


def wandb_target(
    config: Mapping[str, Any],
    *,
    report_to: str,
    project: str,
    name: str,
    image_layout: str | None,
    family: str,
    group: str | None = None,
    job_type: str = "train",
    client: Mapping[str, str] | None = None,
) -> WandbTarget | None:
    """The target for a run whose ``report_to`` asks for W&B, else None.

    ``client`` is the W&B settings of the shell the command ran in (:func:`client_settings`);
    by default this process's, which a sweep trial's process does not share.
    """
    if not uses_wandb(report_to):
        return None
    return WandbTarget(
        project=project,
        name=name,
        config=dict(config),
        group=group,
        job_type=job_type,
        tags=("raytuner", family),
        image_layout=image_layout or "gallery",
        client=dict(client_settings() if client is None else client),
    )


class WandbRun:
    """Rank 0's W&B run: opened at the step training starts from, resumed after a restart."""

    def __init__(self, target: WandbTarget, folder: Path, *, start_step: int) -> None:
        import wandb

        self._wandb = wandb
        self.target = target
        folder.mkdir(parents=True, exist_ok=True)
        id_file = folder / RUN_ID_FILE
        # A worker restarted from a checkpoint continues the W&B run it was logging to; a run that
        # starts from step 0 is a new W&B run, even in an output_dir used before.
        resuming = start_step > 0 and id_file.is_file()
        run_id = id_file.read_text(encoding="utf-8").strip() if resuming else uuid.uuid4().hex[:8]
        id_file.write_text(run_id + "\n", encoding="utf-8")
        settings: dict[str, Any] = {
            # Ray's log capture already has the worker's output; W&B's console copy would double it.
            "console": "off",
            "silent": True,
            # A worker stopped by Ray (a sweep's early stopping, a lost node) is killed, not closed:
            # W&B writes its local run file only every 15 s by default, so a short trial's would
            # stay empty. Every second loses at most that much of an offline run.
            "x_transaction_log_flush_interval": TRANSACTION_LOG_FLUSH_S,
        }
        if "base_url" in target.client:
            settings["base_url"] = target.client["base_url"]
        # WANDB_MODE as the driver's shell spells it: wandb.Settings validates it (and, unlike
        # wandb.init's own mode argument, is typed to take the legacy "dryrun" and "run" too).
        if target.client.get("mode"):
            settings["mode"] = target.client["mode"]
        self.run = wandb.init(
            project=target.project,
            name=target.name,
            group=target.group,
            job_type=target.job_type,
            tags=list(target.tags),
            config=target.config,
            entity=target.client.get("entity"),
            dir=str(folder),
            id=run_id,
            resume="allow" if resuming else None,
            settings=wandb.Settings(**settings),
        )
        where = self.run.url or f"{folder / 'wandb'} (offline; `wandb sync` uploads it)"
        logger.info("Weights & Biases run %s/%s: %s", target.project, target.name, where)

    def log(self, metrics: Mapping[str, Any], step: int) -> None:
        values = {
            f"train/{key}": value
            for key, value in metrics.items()
            if key != "step" and isinstance(value, int | float) and not isinstance(value, bool)
        }
        if values:
            self.run.log(values, step=step)

    def images(self, tag: str, images: list[tuple[str, Any]], step: int, captions: Mapping[str, str]) -> None:
        wandb = self._wandb
        if self.target.image_layout == "table":
            table = wandb.Table(columns=["image", "name", "prompt"])
            for name, image in images:
                table.add_data(wandb.Image(image), name, captions.get(name, ""))
            self.run.log({tag: table}, step=step)
            return
        self.run.log(
            {
                f"{tag}/{name}": wandb.Image(image, caption=captions.get(name) or name)
                for name, image in images
            },
            step=step,
        )

    def close(self, *, failed: bool = False) -> None:
        # A worker that fails marks its W&B run failed (exit code 1), as a crashed script would.
        self.run.finish(exit_code=1 if failed else 0)
