"""The pre-flight check: everything that can be known wrong about a run before any work starts.

``raytuner check-config``, ``train``, ``tune`` and ``cache`` all run :func:`preflight`, so
``check-config`` exits 2 on exactly what the others would refuse before Ray starts, with the same
lines. It reads the three files as loaded, the dataset folders, the prompt library, the
``deepspeed_config``, a checkpoint named by ``resume_from_checkpoint`` and the credentials a run
needs (W&B, the Hub), and it never downloads model weights or starts Ray: the model's files are
fetched by the cache step, the first piece of work.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import torch

from raytuner.cache.settings import cache_setting_problems
from raytuner.config.check import EXIT_OK, format_run, quiet_config_logging
from raytuner.config.deepspeed import DeepSpeedConfigError
from raytuner.config.errors import ConfigError
from raytuner.config.loader import load_config
from raytuner.config.paths import display, has_scheme
from raytuner.config.preflight import check_run
from raytuner.config.run import RunConfig
from raytuner.config.schedule import never_drawn, schedule_problem
from raytuner.config.training import OptimizationSection
from raytuner.evaluate.clip_score import clip_evaluation_problem
from raytuner.evaluate.metrics import report_to_problem
from raytuner.evaluate.validation import parse_validation_resolutions
from raytuner.evaluate.wandb_tracker import wandb_problem
from raytuner.hub import hub_problems
from raytuner.placement import local_facts
from raytuner.quantize import quantization_problem
from raytuner.train.compile import compile_problem
from raytuner.train.deepspeed_plan import deepspeed_plan
from raytuner.train.optim import (
    OptimizerError,
    build_lr_scheduler,
    effective_learning_rate,
    optimizer_settings,
)
from raytuner.train.settings import RaySettings, read_settings, run_name, storage_filesystem
from raytuner.train.state import CheckpointError, read_manifest

# resume_from_checkpoint values that start a run fresh.
FRESH_RUN_VALUES = ("", "none", "false")
# Ray Train's record of a run's checkpoints, written under the storage path once a run reports one.
SNAPSHOT_FILE = "checkpoint_manager_snapshot.json"


Command = Literal["train", "tune", "cache"]


def preflight(run: RunConfig, settings: RaySettings, *, command: Command = "train") -> list[str]:
    """Every problem of ``run`` found before any work, one line each (empty when it can start).

    Every command checks the whole run it would go on to train (a cache is built to be trained
    on). Two checks are ``train``'s alone: the Hub's credentials (no sweep trial publishes) and an
    earlier run's checkpoints under the storage path (neither a sweep nor a cache touches them).
    ``check-config`` checks as ``train``.
    """
    problems = check_run(run)  # dataset folders
    problems += cache_setting_problems(run)
    # start_step/end_step against max_train_steps; with num_train_epochs, again once planned.
    idle = datasets_schedule_problem(run, last_step=run.training.optimization.max_train_steps or None)
    if idle:
        problems.append(idle)
    problems += training_problems(run, settings)
    if command == "train":
        problems += hub_problems(run)  # push_to_hub: token, repo id
        problems += earlier_run_problems(run, settings)
    return problems


def datasets_schedule_problem(run: RunConfig, *, last_step: int | None) -> str | None:
    """A step of ``1..last_step`` with no training dataset in its start_step/end_step window."""
    source = run.sources.get("data_backend_config")
    where = display(source) if source is not None else "datasets"
    return schedule_problem(run.datasets, where=where, last_step=last_step)


def datasets_never_drawn(run: RunConfig, *, last_step: int) -> list[str]:
    """Warnings for training datasets whose start_step comes after the run's last step."""
    source = run.sources.get("data_backend_config")
    return never_drawn(
        run.datasets, where=display(source) if source is not None else "datasets", last_step=last_step
    )


def training_problems(run: RunConfig, settings: RaySettings) -> list[str]:
    """What would stop the workers, one line each (a sweep checks each of its trials' corners)."""
    training = run.training
    where = display(run.sources["config"])
    problems = []
    try:
        optimizer_settings(training.optimization, world_size=settings.num_workers)
    except OptimizerError as error:
        problems.append(f"{where}: {error}")
    report_problem = report_to_problem(training.tracking.report_to) or wandb_problem(
        training.tracking.report_to, training.tracking.tracker_image_layout
    )
    if report_problem:
        problems.append(f"{where}: {report_problem}")
    clip_problem = clip_evaluation_problem(training.validation)  # the CLIP model of evaluation_type "clip"
    if clip_problem:
        problems.append(f"{where}: {clip_problem}")
    quantization = quantization_problem(
        training.model, training.memory, devices=worker_devices(settings)
    )  # base_model_precision
    if quantization:
        problems.append(f"{where}: {quantization}")
    compiling = compile_problem(training.memory)  # dynamo_backend
    if compiling:
        problems.append(f"{where}: {compiling}")
    # With num_train_epochs the step count is known only once the epoch is planned; the schedule
    # is checked again then, against the real count.
    schedule_problem = lr_schedule_problem(
        training.optimization,
        training.optimization.max_train_steps or training.optimization.lr_warmup_steps + 1,
        world_size=settings.num_workers,
    )
    if schedule_problem:
        problems.append(f"{where}: {schedule_problem}")
    try:
        # Checked whether or not anything is rendered: a value that does not parse is a typo.
        parse_validation_resolutions(training.validation.validation_resolution)
    except ValueError as error:
        problems.append(f"{where}: {error}")
    try:
        deepspeed_plan(run, world_size=settings.num_workers)
    except DeepSpeedConfigError as error:
        problems.append(str(error))
    resume = resume_path(run)
    if resume is not None and not has_scheme(resume):
        try:
            read_manifest(Path(resume))
        except CheckpointError as error:
            problems.append(f"{where}: 'resume_from_checkpoint': {error}")
    return problems


def earlier_run_problems(run: RunConfig, settings: RaySettings) -> list[str]:
    """An earlier run's checkpoints under the storage path, which only ``resume_from_checkpoint``
    ``latest`` may continue (nothing is ever deleted to make room)."""
    if resumes_latest(run):
        return []
    name = run_name(run)
    if not _previous_run_exists(settings, name):
        return []
    return [
        f"{settings.storage_path}/{name} holds checkpoints of an earlier run of this output_dir and "
        "'resume_from_checkpoint' is not 'latest': set it to 'latest' to continue that run, or choose "
        "another output_dir or ray_storage_path (nothing was deleted)"
    ]


def worker_devices(settings: RaySettings) -> list[torch.device]:
    """The workers' devices as far as the driver can tell: none when they have GPUs it cannot see."""
    if not settings.use_gpu:
        return [torch.device("cpu")]
    if torch.cuda.is_available():
        return [torch.device("cuda", index) for index in range(torch.cuda.device_count())]
    return []


def lr_schedule_problem(
    optimization: OptimizationSection, total_steps: int, *, world_size: int
) -> str | None:
    """Why ``lr_scheduler`` cannot run ``total_steps`` steps as configured, or None.

    Only ``polynomial`` and ``sine`` can refuse their settings, which they check when built, so
    one is built on a throwaway parameter; the others are not built here, which would log their
    notes (cosine's fallback half-period) a second time.
    """
    if optimization.lr_scheduler not in ("polynomial", "sine"):
        return None
    probe = torch.optim.SGD(
        [torch.nn.Parameter(torch.zeros(1))],
        lr=effective_learning_rate(optimization, world_size=world_size),
    )
    try:
        build_lr_scheduler(probe, optimization, total_steps=total_steps)
    except OptimizerError as error:
        return str(error)
    return None


def resume_path(run: RunConfig) -> str | None:
    """``resume_from_checkpoint`` when it names a checkpoint folder (not ``latest`` or off)."""
    value = run.training.checkpoints.resume_from_checkpoint
    if value is None or value.strip().lower() in (*FRESH_RUN_VALUES, "latest"):
        return None
    return value if has_scheme(value) else str(Path(value).expanduser().resolve())


def resumes_latest(run: RunConfig) -> bool:
    value = run.training.checkpoints.resume_from_checkpoint
    return value is not None and value.strip().lower() == "latest"


def _previous_run_exists(settings: RaySettings, name: str) -> bool:
    filesystem, path = storage_filesystem(settings)
    if filesystem is None:
        return (Path(path) / name / SNAPSHOT_FILE).is_file()
    import pyarrow.fs as pafs

    info = filesystem.get_file_info(f"{path}/{name}/{SNAPSHOT_FILE}")
    return info.type == pafs.FileType.File


def check_config_main(config_path: str, *, strict: bool = False) -> int:
    """``raytuner check-config``: load and check a config as ``raytuner train`` would, print the
    result. 0 when it can start; otherwise the problems are raised as one ConfigError (or the
    SettingsError of its ray_* keys), which the command line prints as ``error:`` lines, exit 2."""
    with quiet_config_logging():
        run = load_config(config_path, strict=strict)
    settings = settings_as_on_this_machine(run)
    print(format_run(run))
    print(f"ray: {settings.describe()}")
    problems = preflight(run, settings)
    if problems:
        raise ConfigError(problems)
    print(f"ok: {display(run.sources['config'])}")
    return EXIT_OK


def settings_as_on_this_machine(run: RunConfig) -> RaySettings:
    """The layout ``raytuner train`` would choose on a local Ray here: what the config leaves open
    is chosen from this machine's CUDA devices. check-config never connects to a cluster, so under
    ``RAY_ADDRESS`` the GPUs and workers a run gets may differ; the checks that depend on them
    (learning-rate scaling, the DeepSpeed plan) run again when the run starts."""
    return read_settings(run).settle(local_facts())
