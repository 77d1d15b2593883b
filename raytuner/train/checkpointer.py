"""Checkpoints of a training run: written whole, reported to Ray Train, restored on restart.

Every worker writes its part of a checkpoint into its own folder (its RNG state, and under ZeRO its
optimizer partition); rank 0 adds the adapter, its EMA twin and the training state, then the
manifest (``raytuner/train/state.py``). ``ray.train.report`` hands the folders to Ray Train,
which merges them into one under the run's storage and keeps ``checkpoints_total_limit`` of them.
The :class:`Reporter` is the seam to Ray Train (or to a test).
"""

from __future__ import annotations

import logging
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch.optim.lr_scheduler import LRScheduler

from raytuner.adapters import plain_tensors, save_adapter
from raytuner.config import RunConfig
from raytuner.train import state as checkpoint_state
from raytuner.train.callbacks import TrainCallback
from raytuner.train.ema import AdapterEMA
from raytuner.train.model import AdaptedModel
from raytuner.train.strategy import TrainingStrategy

logger = logging.getLogger(__name__)

EMA_FOLDER = "ema"
CHECKPOINT_PREFIX = "checkpoint-"


def checkpoint_name(step: int) -> str:
    return f"{CHECKPOINT_PREFIX}{step:07d}"


def checkpoint_step(path: str) -> int | None:
    """The step of a folder named by :func:`checkpoint_name`, else None."""
    name = path.rstrip("/").rsplit("/", 1)[-1]
    suffix = name.removeprefix(CHECKPOINT_PREFIX)
    return int(suffix) if name.startswith(CHECKPOINT_PREFIX) and suffix.isdigit() else None


@dataclass(frozen=True, kw_only=True)
class Reporter:
    """How the loop talks to Ray Train (or to a test): report, and the checkpoint to resume from."""

    report: Callable[[dict[str, Any], Path | None, str | None], None]
    restored_checkpoint: Callable[[], Any]  # a ray.train.Checkpoint or None
    # Every checkpoint folder in the run's storage, newest first (ray.train.Checkpoint objects).
    stored_checkpoints: Callable[[], list[Any]] = lambda: []


@dataclass
class Progress:
    """Where training stands: the optimiser steps done and the latest evaluation loss."""

    step: int = 0
    eval_loss: float | None = None


class Checkpointer:
    """One worker's checkpoints: write and report, restore, and the final adapter export."""

    def __init__(
        self,
        run: RunConfig,
        *,
        rank: int,
        world_size: int,
        steps_per_epoch: int,
        model: AdaptedModel,
        strategy: TrainingStrategy,
        lr_scheduler: LRScheduler,
        ema: AdapterEMA | None,
        reporter: Reporter,
        callbacks: TrainCallback,
    ) -> None:
        self.run = run
        self.rank = rank
        self.world_size = world_size
        self.steps_per_epoch = steps_per_epoch
        self.model = model
        self.strategy = strategy
        self.lr_scheduler = lr_scheduler
        self.ema = ema
        self.reporter = reporter
        self.callbacks = callbacks

    # ---- write ---------------------------------------------------------------------------------

    def report(self, progress: Progress, metrics: dict[str, Any], *, checkpoint: bool) -> None:
        """``ray.train.report`` (a barrier: every worker calls it once per step), with a checkpoint."""
        if not checkpoint:
            self.reporter.report(metrics, None, None)
            return
        folder = Path(tempfile.mkdtemp(prefix="raytuner-checkpoint-"))
        try:
            self.write(folder, progress)
            name = checkpoint_name(progress.step)
            self.reporter.report(metrics, folder, name)
            self.callbacks.on_checkpoint(progress.step, folder, name, progress.eval_loss)
        finally:
            shutil.rmtree(folder, ignore_errors=True)

    def write(self, folder: Path, progress: Progress) -> None:
        checkpoint_state.write_rng(folder, self.rank)
        self.strategy.save(folder)
        if self.rank != 0:
            return
        self.write_adapters(folder, progress.step)
        checkpoint_state.write_state(
            folder,
            {
                "adapter": plain_tensors(self.model.network.state_dict()),
                "optimizer": self.strategy.optimizer_state(),
                "lr_scheduler": self.lr_scheduler.state_dict(),
                "ema": self.ema.state_dict() if self.ema is not None else None,
                "step": progress.step,
                "eval_loss": progress.eval_loss,
            },
        )
        checkpoint_state.write_manifest(
            folder, step=progress.step, world_size=self.world_size, steps_per_epoch=self.steps_per_epoch
        )

    def write_adapters(self, folder: Path, step: int) -> Path:
        """The adapter (and its EMA twin in ``ema/``), loadable with the seeds' recipe."""
        network = self.model.network
        path = save_adapter(network, folder, metadata=self.adapter_metadata(step))
        if self.ema is not None:
            with self.ema.swapped_in():
                save_adapter(network, folder / EMA_FOLDER, metadata=self.adapter_metadata(step, ema=True))
        return path

    def export(self, step: int) -> Path:
        """Rank 0's final adapter (and its EMA twin) in ``output_dir``."""
        path = self.write_adapters(self.run.training.output_dir, step)
        logger.info("adapter written to %s", path)
        if self.ema is not None:
            logger.info("EMA adapter written to %s", path.parent / EMA_FOLDER / path.name)
        return path

    def adapter_metadata(self, step: int, *, ema: bool = False) -> dict[str, Any]:
        return {
            "raytuner_family": self.run.training.model.model_family,
            "raytuner_step": str(step),
            "raytuner_ema": "true" if ema else "false",
            "lycoris_config": self.run.to_dict()["lycoris"],
        }

    # ---- restore -------------------------------------------------------------------------------

    def start(self, start_from: str | None) -> Progress:
        """The run's newest whole checkpoint, else ``start_from`` (resume_from_checkpoint), else step 0."""
        restored = self.restore_latest()
        if restored is not None or not start_from:
            return restored or Progress()
        from ray.train import Checkpoint

        with Checkpoint(start_from).as_directory() as folder:
            return self.restore(Path(folder), source=start_from)

    def restore_latest(self) -> Progress | None:
        """Restore the run's newest whole checkpoint; None when it has none.

        Ray Train registers a reported checkpoint when its controller next polls the workers, so
        a worker that dies right after a report can leave the newest checkpoint written and
        uploaded but unregistered. Such a folder is used when its manifest shows it whole; a
        folder that is not whole is passed over for the next older one.
        """
        registered = self.reporter.restored_checkpoint()
        registered_step = checkpoint_step(registered.path) if registered is not None else None
        for stored in self.reporter.stored_checkpoints():
            step = checkpoint_step(stored.path)
            if step is None or (registered_step is not None and step <= registered_step):
                break
            try:
                with stored.as_directory() as folder:
                    return self.restore(Path(folder), source=f"checkpoint {stored.path}")
            except checkpoint_state.CheckpointError as error:
                if self.rank == 0:
                    logger.warning("passing over an incomplete checkpoint: %s", error)
        if registered is None:
            return None
        with registered.as_directory() as folder:
            return self.restore(Path(folder), source=f"the run's latest checkpoint {registered.path}")

    def restore(self, folder: Path, *, source: str) -> Progress:
        """A checkpoint moves between strategies and worker counts with its adapter, EMA, schedule
        and step; the strategy says what of its optimizer state fits this run."""
        info = checkpoint_state.read_manifest(folder)
        saved = checkpoint_state.read_state(folder)
        self.strategy.load(folder, saved, info, source=source)
        self.lr_scheduler.load_state_dict(saved["lr_scheduler"])
        if self.ema is not None:
            if saved.get("ema") is not None:
                self.ema.load_state_dict(saved["ema"])
            else:
                logger.warning("%s holds no EMA weights; the EMA starts from the restored adapter", source)
                self.ema.reset()
        rng = checkpoint_state.read_rng(folder, self.rank)
        if rng is not None and info.world_size == self.world_size:
            checkpoint_state.restore_rng(rng)
        if info.steps_per_epoch != self.steps_per_epoch and self.rank == 0:
            logger.warning(
                "%s was written with %d steps per epoch, this run plans %d (the data or batch shape "
                "changed): training continues from step %d on the new plan",
                source,
                info.steps_per_epoch,
                self.steps_per_epoch,
                info.step,
            )
        if self.rank == 0:
            logger.info("resumed from %s at step %d", source, info.step)
        return Progress(step=info.step, eval_loss=saved.get("eval_loss"))
