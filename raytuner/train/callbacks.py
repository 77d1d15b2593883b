"""What the training loop tells the world: callbacks on start, step, evaluation, validation,
checkpoint, end and failure.

The loop calls every callback in its worker's list; what only rank 0 does (the metrics sinks,
webhooks, Hub uploads, the progress line) is simply not in the other workers' lists, so the loop
never asks who it is. A run may add its own callbacks (``TrainJob.callbacks``, sent to every
worker, so they must pickle): the tests install one that kills a worker at a given step.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from raytuner.evaluate.metrics import MetricsLog, ProgressLine
from raytuner.hub import CheckpointUploads
from raytuner.webhooks import Webhooks, mark_reported

if TYPE_CHECKING:
    from raytuner.train.job import TrainJob
    from raytuner.train.validate import ValidationRound

logger = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True)
class RunStart:
    """Where a worker's training starts: after a restore, ``step`` is the restored step."""

    step: int
    total_steps: int
    rank: int
    world_size: int
    global_batch: int


class TrainCallback:
    """A side channel of the loop; every hook does nothing unless overridden."""

    def on_start(self, start: RunStart) -> None:
        return

    def on_eval(self, step: int, eval_loss: float) -> None:
        return

    def on_step(self, step: int, metrics: Mapping[str, Any]) -> None:
        return

    def on_validation(self, step: int, rendered: ValidationRound) -> None:
        return

    def on_checkpoint(self, step: int, folder: Path, name: str, eval_loss: float | None) -> None:
        """``folder`` holds the checkpoint Ray Train has just stored; it is removed after the hooks."""
        return

    def on_end(self, step: int, adapter: Path) -> None:
        return

    def on_failure(self, step: int, error: BaseException) -> None:
        return

    def close(self, *, failed: bool) -> None:
        """Called once on every way out of the loop, in the list's order."""
        return


class Callbacks(TrainCallback):
    """A worker's callbacks, called in order."""

    def __init__(self, callbacks: Sequence[TrainCallback]) -> None:
        self.callbacks = list(callbacks)

    def on_start(self, start: RunStart) -> None:
        for callback in self.callbacks:
            callback.on_start(start)

    def on_eval(self, step: int, eval_loss: float) -> None:
        for callback in self.callbacks:
            callback.on_eval(step, eval_loss)

    def on_step(self, step: int, metrics: Mapping[str, Any]) -> None:
        for callback in self.callbacks:
            callback.on_step(step, metrics)

    def on_validation(self, step: int, rendered: ValidationRound) -> None:
        for callback in self.callbacks:
            callback.on_validation(step, rendered)

    def on_checkpoint(self, step: int, folder: Path, name: str, eval_loss: float | None) -> None:
        for callback in self.callbacks:
            callback.on_checkpoint(step, folder, name, eval_loss)

    def on_end(self, step: int, adapter: Path) -> None:
        for callback in self.callbacks:
            callback.on_end(step, adapter)

    def on_failure(self, step: int, error: BaseException) -> None:
        for callback in self.callbacks:
            callback.on_failure(step, error)

    def close(self, *, failed: bool) -> None:
        for callback in self.callbacks:
            callback.close(failed=failed)


class MetricsCallback(TrainCallback):
    """metrics.jsonl, TensorBoard, W&B and Ray gauges (:class:`~raytuner.evaluate.metrics.MetricsLog`)."""

    def __init__(self, metrics: MetricsLog) -> None:
        self.metrics = metrics

    def on_start(self, start: RunStart) -> None:
        self.metrics.start(start.step)

    def on_eval(self, step: int, eval_loss: float) -> None:
        self.metrics.log({"step": step, "kind": "eval", "eval_loss": eval_loss})

    def on_step(self, step: int, metrics: Mapping[str, Any]) -> None:
        self.metrics.log(metrics)

    def on_validation(self, step: int, rendered: ValidationRound) -> None:
        self.metrics.images("validation", rendered.images, step, rendered.captions)
        if rendered.metrics:  # the CLIP scores, with evaluation_type "clip"
            self.metrics.log({"step": step, "kind": "validation", **rendered.metrics})

    def on_end(self, step: int, adapter: Path) -> None:
        self.metrics.close()

    def close(self, *, failed: bool) -> None:
        self.metrics.close(failed=failed)  # a failed run's W&B run is flushed and marked failed


class WebhookCallback(TrainCallback):
    """webhook_config: the run's events, sent from a background thread (raytuner/webhooks.py)."""

    def __init__(self, webhooks: Webhooks) -> None:
        self.webhooks = webhooks
        self.total_steps = 0

    def on_start(self, start: RunStart) -> None:
        self.total_steps = start.total_steps
        self.webhooks.started(
            step=start.step,
            total_steps=start.total_steps,
            workers=start.world_size,
            global_batch=start.global_batch,
        )

    def on_step(self, step: int, metrics: Mapping[str, Any]) -> None:
        self.webhooks.progress(step=step, total_steps=self.total_steps, metrics=dict(metrics))

    def on_validation(self, step: int, rendered: ValidationRound) -> None:
        self.webhooks.validation(step=step, images=rendered.images)

    def on_checkpoint(self, step: int, folder: Path, name: str, eval_loss: float | None) -> None:
        self.webhooks.checkpoint(step=step, name=name)

    def on_end(self, step: int, adapter: Path) -> None:
        self.webhooks.finished(step=step, adapter=adapter)

    def on_failure(self, step: int, error: BaseException) -> None:
        # Sent before the error reaches Ray; the driver sees the mark and does not send it again.
        self.webhooks.failed(error, step=step)
        mark_reported(error)

    def close(self, *, failed: bool) -> None:
        self.webhooks.close()


class CheckpointUploadCallback(TrainCallback):
    """push_checkpoints_to_hub: each checkpoint committed to the Hub once Ray Train stored it."""

    def __init__(self, uploads: CheckpointUploads) -> None:
        self.uploads = uploads

    def on_checkpoint(self, step: int, folder: Path, name: str, eval_loss: float | None) -> None:
        self.uploads.publish(folder, step=step, eval_loss=eval_loss)

    def close(self, *, failed: bool) -> None:
        self.uploads.close()  # the driver's final commit must come after these


class ProgressCallback(TrainCallback):
    """The progress line in the worker's log."""

    def __init__(self, label: str) -> None:
        self.label = label
        self.line: ProgressLine | None = None
        self.total_steps = 0

    def on_start(self, start: RunStart) -> None:
        self.total_steps = start.total_steps
        self.line = ProgressLine(start.total_steps, start_step=start.step, label=self.label)

    def on_step(self, step: int, metrics: Mapping[str, Any]) -> None:
        if self.line is not None:
            self.line.update(step, metrics, force=step == self.total_steps)


def worker_callbacks(job: TrainJob, *, rank: int) -> Callbacks:
    """Rank 0's side channels, then the run's own callbacks (on every worker)."""
    callbacks: list[TrainCallback] = []
    if rank == 0:
        training = job.run.training
        callbacks.append(
            MetricsCallback(
                MetricsLog(
                    training.output_dir,
                    report_to=training.tracking.report_to,
                    run_name=job.run_name,
                    ray_metrics=job.ray_metrics,
                    wandb=job.wandb,
                )
            )
        )
        if job.webhooks is not None:
            callbacks.append(WebhookCallback(Webhooks(job.webhooks)))
        if job.hub is not None and job.hub.push_checkpoints:
            uploads = CheckpointUploads(
                job.hub, job.run, prompts=job.validation_prompts, total_steps=job.total_steps
            )
            callbacks.append(CheckpointUploadCallback(uploads))
        callbacks.append(ProgressCallback(training.model.model_family))
    return Callbacks([*callbacks, *job.callbacks])
