"""The per-worker training loop that Ray Train runs on every worker.

Every worker builds the same model, the same adapter (seeded) and the same epoch plan, and trains
on its slice of each global batch; the run's :class:`~raytuner.train.strategy.TrainingStrategy`
decides how the workers share the work (data parallel, DeepSpeed ZeRO, group offload). Rank 0
writes what a person reads, through its callbacks (metrics, webhooks, Hub uploads, the progress
line); every worker takes part in checkpoints (its own RNG state) and in ``ray.train.report``,
which is a barrier: all workers call it once per step.

Resuming needs nothing but the step: the plan is a pure function of the cache, the seed and the
batch shape, and each sample's noise, sigma and caption dropout come from (seed, key, step).
"""

from __future__ import annotations

import logging
import os
import resource
import sys
import time
from pathlib import Path
from typing import Any

import torch

from raytuner.batches.plan import BatchShape
from raytuner.batches.reader import open_training_data
from raytuner.logs import set_up_train_worker
from raytuner.train.callbacks import Callbacks, RunStart, worker_callbacks
from raytuner.train.checkpointer import Checkpointer, Progress, Reporter, checkpoint_step
from raytuner.train.ema import AdapterEMA
from raytuner.train.feed import StepFeed
from raytuner.train.job import TrainJob
from raytuner.train.layout import check_marker
from raytuner.train.model import build_model
from raytuner.train.optim import build_lr_scheduler, build_optimizer
from raytuner.train.strategy import StepSettings, build_strategy, worker_environment
from raytuner.train.validate import Evaluation, Validator

logger = logging.getLogger(__name__)


def _peak_memory_mib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class Worker:
    """One worker's model, strategy and components, and the loop over its steps."""

    def __init__(
        self, job: TrainJob, *, rank: int, world_size: int, device: torch.device, callbacks: Callbacks
    ) -> None:
        self.job, self.rank, self.world_size, self.device = job, rank, world_size, device
        self.callbacks = callbacks
        run, training = job.run, job.run.training
        self.strategy = build_strategy(job, rank=rank, world_size=world_size, device=device)
        self.model = build_model(run, device=device, base_device=self.strategy.base_device)
        self.optimizer = build_optimizer(self.model.parameters, training.optimization, world_size=world_size)
        self.lr_scheduler = build_lr_scheduler(
            self.optimizer, training.optimization, total_steps=job.total_steps
        )
        self.strategy.prepare(self.model, self.optimizer, StepSettings.from_training(training))
        self.ema = (
            AdapterEMA(self.model.parameters, decay=training.optimization.ema_decay)
            if training.optimization.use_ema
            else None
        )
        self.shape = BatchShape(
            per_worker=training.optimization.train_batch_size,
            workers=world_size,
            accumulation=training.optimization.gradient_accumulation_steps,
        )
        data = open_training_data(run, device=device)
        self.feed = StepFeed(
            data,
            self.shape,
            self.model.family,
            seed=run.seed,
            rank=rank,
            device=device,
        )
        self.evaluation = Evaluation(run, data, self.model, self.strategy)
        self.validator = Validator(
            run, data, self.model, self.strategy, self.ema, texts=job.validation_prompts, device=device
        )
        self.progress = Progress()

    def train(self, reporter: Reporter) -> None:
        training = self.job.run.training
        checkpointer = Checkpointer(
            self.job.run,
            rank=self.rank,
            world_size=self.world_size,
            steps_per_epoch=self.job.steps_per_epoch,
            model=self.model,
            strategy=self.strategy,
            lr_scheduler=self.lr_scheduler,
            ema=self.ema,
            reporter=reporter,
            callbacks=self.callbacks,
        )
        self.progress = checkpointer.start(self.job.start_from)
        self.start()
        while self.progress.step < self.job.total_steps:
            metrics = self.train_step()
            step, final = self.progress.step, self.progress.step == self.job.total_steps
            if self.due(training.validation.eval_steps_interval) or (final and self.evaluation):
                self.evaluate()
            if self.progress.eval_loss is not None:
                # Repeated in every report, so a Tune scheduler never sees a report without it.
                metrics["eval_loss"] = self.progress.eval_loss
            self.callbacks.on_step(step, metrics)
            if self.due(training.validation.validation_step_interval) or final:
                self.validate()
            checkpoint = self.due(training.checkpoints.checkpoint_step_interval) or final
            checkpointer.report(self.progress, metrics, checkpoint=checkpoint)
        if self.rank == 0:
            self.callbacks.on_end(self.progress.step, checkpointer.export(self.progress.step))

    def start(self) -> None:
        """The callbacks' start, the step-0 baseline evaluation and the run's line in the log."""
        start = RunStart(
            step=self.progress.step,
            total_steps=self.job.total_steps,
            rank=self.rank,
            world_size=self.world_size,
            global_batch=self.shape.global_size,
        )
        self.callbacks.on_start(start)
        if self.progress.step == 0:
            self.evaluate()
        if self.rank == 0:
            logger.info(
                "training %s (%s): steps %d..%d, %d worker(s), global batch %d (%d x %d workers x %d "
                "accumulation); %s",
                self.job.run_name,
                self.strategy.describe(),
                self.progress.step + 1,
                self.job.total_steps,
                self.world_size,
                self.shape.global_size,
                self.shape.per_worker,
                self.world_size,
                self.shape.accumulation,
                self.model.report.summary(),
            )

    def train_step(self) -> dict[str, Any]:
        """Read the step's micro-batches, train on them, advance schedule and EMA; the step's metrics."""
        started = time.perf_counter()
        micro = self.feed.micro_batches(self.progress.step)
        data_seconds = time.perf_counter() - started
        learning_rate = float(self.lr_scheduler.get_last_lr()[0])
        result = self.strategy.step(micro)
        self.lr_scheduler.step()
        if self.ema is not None:
            self.ema.update()
        self.progress.step += 1
        step_seconds = time.perf_counter() - started
        metrics: dict[str, Any] = {
            "step": self.progress.step,
            "epoch": self.feed.epoch_of(self.progress.step - 1),
            "loss": result.loss,
            "lr": learning_rate,
            "grad_norm": result.grad_norm,
            "samples_per_second": self.shape.global_size / step_seconds,
            "step_time_s": step_seconds,
            "data_wait_fraction": data_seconds / step_seconds,
            "peak_memory_mib": _peak_memory_mib(self.device),
        }
        if result.regularisation_loss is not None:
            metrics["regularisation_loss"] = result.regularisation_loss
        return metrics

    def evaluate(self) -> None:
        loss = self.evaluation.loss()
        self.progress.eval_loss = loss
        if loss is not None:
            self.callbacks.on_eval(self.progress.step, loss)

    def validate(self) -> None:
        rendered = self.validator.round(self.progress.step)
        if rendered is not None:
            self.callbacks.on_validation(self.progress.step, rendered)

    def due(self, interval: int | None) -> bool:
        return bool(interval and self.progress.step % interval == 0)

    def close(self) -> None:
        self.strategy.close()


def train_worker(config: dict[str, Any]) -> None:
    """Ray Train's ``train_loop_per_worker``."""
    import ray
    import ray.train
    import ray.train.torch

    job: TrainJob = config["job"]
    context = ray.train.get_context()
    rank, world_size = context.get_world_rank(), context.get_world_size()
    set_up_train_worker()
    check_marker(job.marker, node=ray.get_runtime_context().get_node_id()[:12])
    device = ray.train.torch.get_device()
    for name, (value, why) in worker_environment(job, device).items():
        if rank == 0:
            logger.info("worker environment: %s=%s (%s)", name, value, why)
        os.environ[name] = value
    callbacks = worker_callbacks(job, rank=rank)
    worker: Worker | None = None
    try:
        worker = Worker(job, rank=rank, world_size=world_size, device=device, callbacks=callbacks)
        worker.train(ray_reporter(context))
    except BaseException as error:
        callbacks.on_failure(worker.progress.step if worker is not None else 0, error)
        raise
    finally:
        callbacks.close(failed=sys.exc_info()[0] is not None)
        if worker is not None:
            worker.close()


def ray_reporter(context: Any) -> Reporter:
    """The loop's seam to Ray Train: report, the registered checkpoint, every stored one."""
    import ray.train

    def report(metrics: dict[str, Any], folder: Path | None, name: str | None) -> None:
        checkpoint = ray.train.Checkpoint.from_directory(str(folder)) if folder is not None else None
        ray.train.report(metrics, checkpoint=checkpoint, checkpoint_dir_name=name)

    storage = context.get_storage()

    def stored_checkpoints() -> list[Any]:
        import pyarrow.fs as pafs

        filesystem, root = storage.storage_filesystem, storage.experiment_fs_path
        infos = filesystem.get_file_info(pafs.FileSelector(root, allow_not_found=True))
        folders = [
            info.path
            for info in infos
            if info.type == pafs.FileType.Directory and checkpoint_step(info.path) is not None
        ]
        folders.sort(key=lambda path: checkpoint_step(path) or 0, reverse=True)
        return [ray.train.Checkpoint(path=path, filesystem=filesystem) for path in folders]

    return Reporter(
        report=report, restored_checkpoint=ray.train.get_checkpoint, stored_checkpoints=stored_checkpoints
    )
