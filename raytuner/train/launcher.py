"""``raytuner train``: check the config, build the cache, run the TorchTrainer, write the outputs.

Everything that can be wrong with the files is found before Ray starts; everything that can be
wrong with the data is found before the workers start (the cache step and the epoch plan). The
Ray Train run is pinned to a stable name under ``ray_storage_path``, so running the same command
again resumes it (Ray Train V2's own restore) when ``resume_from_checkpoint`` is ``latest``.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from raytuner.batches.reader import check_batches
from raytuner.cache.build import BuildOptions, run_cache
from raytuner.cache.settings import cache_encoders, cache_location, image_datasets, role_prompts, text_dataset
from raytuner.config import ConfigError, RunConfig, load_config, record_seed
from raytuner.config.paths import display, has_scheme
from raytuner.config.training import MemorySection, OptimizationSection
from raytuner.errors import RaytunerError, find_error
from raytuner.evaluate.metrics import read_metrics
from raytuner.evaluate.wandb_tracker import WandbTarget, uses_wandb, wandb_target
from raytuner.hub import HubTarget, open_repo, publish_run
from raytuner.outputs import write_config_copies
from raytuner.quantize import quantization_warnings
from raytuner.ray_runtime import cluster_connection, ray_session
from raytuner.storage import Location
from raytuner.train.callbacks import TrainCallback
from raytuner.train.deepspeed_plan import DeepSpeedPlan, deepspeed_plan
from raytuner.train.job import TrainJob, train_job
from raytuner.train.layout import (
    LayoutError,
    on_cluster,
    pin_local_paths,
    place_under_shared_root,
    write_marker,
)
from raytuner.train.preflight import (
    datasets_never_drawn,
    datasets_schedule_problem,
    lr_schedule_problem,
    preflight,
    resume_path,
)
from raytuner.train.settings import (
    RayOverrides,
    RayRequest,
    RaySettings,
    read_settings,
    run_name,
    storage_filesystem,
)
from raytuner.upstream import report_poll_interval
from raytuner.webhooks import report_failures, webhook_settings

if TYPE_CHECKING:
    from ray.train import Result
    from ray.train.torch import TorchTrainer

logger = logging.getLogger(__name__)


class TrainError(RaytunerError, RuntimeError):
    """A one-line reason the training run failed or cannot start."""


@dataclass(frozen=True, kw_only=True)
class TrainOutcome:
    output_dir: Path
    adapter: Path
    steps: int
    eval_loss: float | None
    checkpoint: str | None
    hub_url: str | None = None  # the Hub repo the run was published to


def strategy_summary(memory: MemorySection, deepspeed: DeepSpeedPlan | None) -> str:
    """How the workers hold the model, in a few words for the start-of-run line."""
    if deepspeed is not None:
        return f"DeepSpeed {deepspeed.describe()}"
    if memory.enable_group_offload:
        return f"data parallel, base group-offloaded ({memory.group_offload_type})"
    return "data parallel"


def total_steps(optimization: OptimizationSection, steps_per_epoch: int) -> int:
    if optimization.max_train_steps:
        return optimization.max_train_steps
    return optimization.num_train_epochs * steps_per_epoch


def build_trainer(job: TrainJob, settings: RaySettings, *, callbacks: Sequence[object] = ()) -> TorchTrainer:
    """The run's TorchTrainer; ``callbacks`` are Ray Train callbacks (a Tune trial passes its reporter)."""
    from ray.train import CheckpointConfig, FailureConfig, ScalingConfig
    from ray.train import RunConfig as RayRunConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    resources = {"CPU": settings.cpus_per_worker}
    if settings.use_gpu:
        resources["GPU"] = settings.gpus_per_worker
    filesystem, storage_path = storage_filesystem(settings)
    return TorchTrainer(
        train_job,
        train_loop_config={"job": job},
        scaling_config=ScalingConfig(
            num_workers=settings.num_workers, use_gpu=settings.use_gpu, resources_per_worker=resources
        ),
        torch_config=TorchConfig(backend="nccl" if settings.use_gpu else "gloo"),
        run_config=RayRunConfig(
            name=job.run_name,
            storage_path=storage_path,
            storage_filesystem=filesystem,
            failure_config=FailureConfig(max_failures=settings.max_failures),
            checkpoint_config=CheckpointConfig(
                num_to_keep=job.run.training.checkpoints.checkpoints_total_limit
            ),
            # Ray Train V2 (Ray's default) takes ray.train.UserCallback objects here; mypy reads
            # the V1 RunConfig that ray.train exports when V2 is off, typed for Tune callbacks.
            callbacks=list(callbacks) or None,  # type: ignore[arg-type]
        ),
    )


def prepare_job(
    run: RunConfig,
    settings: RaySettings,
    *,
    name: str,
    ray_metrics: bool = True,
    hub: HubTarget | None = None,
    sweep: str | None = None,
    tracker_client: dict[str, str] | None = None,
    callbacks: Sequence[TrainCallback] = (),
) -> TrainJob:
    """The workers' job for a run whose cache is built: steps planned, shared-root marker written.

    ``sweep`` names the sweep a trial belongs to: its W&B run is grouped under it and named ``name``;
    ``tracker_client`` is the W&B client settings of the sweep's shell (a trial runs elsewhere);
    ``callbacks`` are the run's own loop callbacks, sent to every worker.
    """
    steps_per_epoch = check_batches(run, workers=settings.num_workers)
    steps = total_steps(run.training.optimization, steps_per_epoch)
    schedule_problem = lr_schedule_problem(run.training.optimization, steps, world_size=settings.num_workers)
    if schedule_problem:
        raise ConfigError([f"{display(run.sources['config'])}: {schedule_problem}"])
    idle = datasets_schedule_problem(run, last_step=steps)
    if idle:
        raise ConfigError([idle])
    for warning in datasets_never_drawn(run, last_step=steps):
        logger.warning(warning)
    # The workers read the driver's marker back from the checkpoint root and from output_dir.
    marker = write_marker(
        [Location(uri=settings.storage_path).child(name), Location(uri=str(run.training.output_dir))]
    )
    return TrainJob(
        run=run,
        run_name=name,
        total_steps=steps,
        steps_per_epoch=steps_per_epoch,
        marker=marker,
        start_from=resume_path(run),
        ray_metrics=ray_metrics,
        validation_prompts=dict(role_prompts(run)["validation"]),
        deepspeed=deepspeed_plan(run, world_size=settings.num_workers),
        hub=hub,
        webhooks=webhook_settings(run, run_name=name, checkpoint_root=f"{settings.storage_path}/{name}"),
        wandb=tracker_target(run, name=name, sweep=sweep, client=tracker_client),
        callbacks=tuple(callbacks),
    )


def tracker_target(
    run: RunConfig, *, name: str, sweep: str | None = None, client: dict[str, str] | None = None
) -> WandbTarget | None:
    """The W&B run of ``run`` (None unless report_to asks for W&B), with the run's redacted config."""
    training = run.training
    if not uses_wandb(training.tracking.report_to):
        return None
    config = run.to_dict()  # secrets "***", webhook URLs included (raytuner/config/redact.py)
    config["raytuner"] = {"train_run_name": name, "sweep": sweep}
    return wandb_target(
        config,
        report_to=training.tracking.report_to,
        project=training.tracking.tracker_project_name,
        name=name if sweep else training.tracking.tracker_run_name,
        image_layout=training.tracking.tracker_image_layout,
        family=training.model.model_family,
        group=sweep,
        job_type="trial" if sweep else "train",
        client=client,
    )


def run_training(
    run: RunConfig,
    settings: RaySettings | RayRequest,
    *,
    build_options: BuildOptions | None = None,
    ray_metrics: bool = True,
    callbacks: Sequence[TrainCallback] = (),
) -> TrainOutcome:
    """Cache, train and write the outputs of a loaded run, on the connected Ray (or a local one).

    ``callbacks`` are added to every worker's loop callbacks (they must pickle).

    A :class:`RayRequest` leaves GPUs or workers to the cluster: they are chosen once it is known,
    connected to first when ``RAY_ADDRESS`` names it, else from this machine's CUDA devices for the
    local Ray about to start, and before every check that depends on them.
    """
    with cluster_connection():
        if isinstance(settings, RayRequest):
            settings = settings.settle()
        return _cache_and_train(
            run, settings, build_options=build_options, ray_metrics=ray_metrics, callbacks=callbacks
        )


def _cache_and_train(
    run: RunConfig,
    settings: RaySettings,
    *,
    build_options: BuildOptions | None,
    ray_metrics: bool,
    callbacks: Sequence[TrainCallback],
) -> TrainOutcome:
    if on_cluster():
        run = place_on_cluster(run, settings)
    run, only_here = pin_local_paths(run)
    for line in only_here:
        if on_cluster():
            logger.warning(
                "%s of the head node's copy of the job: workers on other nodes cannot read it; "
                "use a hub id or a folder every node mounts",
                line,
            )
    name = run_name(run)
    problems = preflight(run, settings)  # what check-config reports, before any work
    if problems:
        raise ConfigError(problems)
    for warning in quantization_warnings(run.training.model):  # once, here on the driver
        logger.warning(warning)
    encoders = cache_encoders(run)  # the encoders' files, fetched before Ray starts
    # The repo is created (or found) before any work, as SimpleTuner does: a refused token fails here.
    hub = open_repo(run) if run.training.tracking.push_to_hub else None
    with ray_session(dashboard=True):
        run.training.output_dir.mkdir(parents=True, exist_ok=True)
        record_seed(run)  # a drawn seed is kept, so resuming this output_dir replays the same plan
        summary = run_cache(run, build_options or BuildOptions(), encoders)
        logger.info("cache:\n%s", summary.table())
        job = prepare_job(run, settings, name=name, ray_metrics=ray_metrics, hub=hub, callbacks=callbacks)
        logger.info(
            "Ray Train run %s: %s, %s, %d steps (%d per epoch), checkpoints in %s/%s",
            name,
            settings.describe(),
            strategy_summary(run.training.memory, job.deepspeed),
            job.total_steps,
            job.steps_per_epoch,
            settings.storage_path,
            name,
        )
        write_config_copies(run, run.training.output_dir)
        with report_failures(job.webhooks):  # a failure no worker could send (one died, or never started)
            result = fit(build_trainer(job, settings))
    outcome = finish_outputs(run, result, job.total_steps)
    if hub is None:
        return outcome
    publish_run(run, hub, steps=job.total_steps)  # after every local output is written
    return dataclasses.replace(outcome, hub_url=hub.url)


def fit(trainer: TorchTrainer) -> Result:
    """``trainer.fit()``, with a failure inside Ray as raytuner's own one-line error.

    The run starts here, in the driver or a sweep trial's process: Ray Train's report polling is
    chosen for it (``raytuner.upstream.report_poll_interval``, said in the log).
    """
    import ray

    try:
        with report_poll_interval():
            return trainer.fit()
    except ray.exceptions.RayError as error:
        raise training_error(error) from None
    except Exception as error:
        if type(error).__module__.startswith("ray."):
            raise training_error(error) from None
        raise


def training_error(error: BaseException) -> RaytunerError:
    """The error a failed Ray Train run is reported as: a worker's RaytunerError as it raised it
    (a CLIP model a worker cannot load, a device the driver could not see), else a TrainError with
    the last line of what Ray says went wrong (a worker that died, a node that was lost)."""
    failures = getattr(error, "worker_failures", None)  # Ray Train V2 keeps each worker's error here
    first = next(iter(failures.values())) if failures else None
    inner = find_error(error) or (find_error(first) if first is not None else None)
    if inner is not None:
        return inner
    text = str(first or error).strip().splitlines()
    return TrainError(f"training failed: {text[-1] if text else type(error).__name__}")


def place_on_cluster(run: RunConfig, settings: RaySettings) -> RunConfig:
    """``run`` with its outputs and caches on storage every node reaches, said in the log."""
    if not has_scheme(settings.storage_path) and Path(settings.storage_path).resolve().is_relative_to(
        Path.cwd().resolve()
    ):
        raise LayoutError(
            "on a cluster, set ray_storage_path (or --ray-storage-path) to object storage (s3://…, gs://…) "
            "or a folder every node mounts: the job's working directory is a temporary copy on the head node"
        )
    run, moved = place_under_shared_root(run, settings.storage_path)
    for line in moved:
        logger.info("on the cluster: %s", line)
    logger.info("output_dir: %s", run.training.output_dir)
    for dataset in image_datasets(run):
        if dataset.cache_dir_vae:
            logger.info(
                "dataset '%s' latent cache: %s", dataset.id, cache_location(dataset, dataset.cache_dir_vae)
            )
    text = text_dataset(run)
    if text.cache_dir:
        logger.info("text cache: %s", cache_location(text, text.cache_dir))
    return run


def finish_outputs(run: RunConfig, result: object, total_steps: int) -> TrainOutcome:
    """Model card, loss curve and validation grid of a finished run, and where its adapter is."""
    from raytuner.filenames import ADAPTER_FILENAME
    from raytuner.outputs import write_loss_curve, write_model_card, write_validation_grid

    output_dir = run.training.output_dir
    adapter = output_dir / ADAPTER_FILENAME
    if not adapter.is_file():
        raise TrainError(f"training finished but {adapter} was not written; see the workers' log above")
    entries = read_metrics(output_dir / "logs" / "metrics.jsonl")
    evals = [e["eval_loss"] for e in entries if e.get("kind") == "eval"]
    eval_loss = evals[-1] if evals else None
    write_model_card(run, output_dir, steps=total_steps, eval_loss=eval_loss)
    write_loss_curve(output_dir, title=f"{run.training.model.model_family} LoKr: {display(output_dir)}")
    write_validation_grid(output_dir)
    checkpoint = getattr(result, "checkpoint", None)
    return TrainOutcome(
        output_dir=output_dir,
        adapter=adapter,
        steps=total_steps,
        eval_loss=eval_loss,
        checkpoint=getattr(checkpoint, "path", None),
    )


def train_main(config: str, *, strict: bool = False, overrides: RayOverrides | None = None) -> int:
    """The ``raytuner train`` command: exit 0 with the outputs written.

    What stops the run is raised as a RaytunerError, which the command line prints (raytuner/cli.py).
    """
    run = load_config(config, strict=strict)
    outcome = run_training(run, read_settings(run, overrides))
    print()
    print(f"adapter:     {outcome.adapter}")
    print(f"model card:  {outcome.output_dir / 'README.md'}")
    print(f"loss curve:  {outcome.output_dir / 'loss.png'}")
    print(f"validation:  {outcome.output_dir / 'validation'}")
    if outcome.eval_loss is not None:
        print(f"eval loss:   {outcome.eval_loss:.4f}")
    if outcome.checkpoint:
        print(f"checkpoint:  {outcome.checkpoint}")
    if outcome.hub_url:
        print(f"hub:         {outcome.hub_url}")
    return 0
