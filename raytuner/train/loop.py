"""The per-worker training loop that Ray Train runs on every worker.

Every worker builds the same model, the same adapter (seeded) and the same epoch plan, trains on
its slice of each global batch and averages gradients with the others after the last
accumulation micro-step. Rank 0 writes what a person reads (metrics, validation images, the final
adapter); every worker takes part in checkpoints (its own RNG state) and in ``ray.train.report``,
which is a barrier: all workers call it once per step.

Resuming needs nothing but the step: the plan is a pure function of the cache, the seed and the
batch shape, and each sample's noise, sigma and caption dropout come from (seed, key, step).
"""

from __future__ import annotations

import contextlib
import logging
import os
import resource
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from raytuner.adapters import build_adapter, plain_tensors, save_adapter
from raytuner.batches.plan import BatchShape, EpochPlan, sample_generators
from raytuner.batches.reader import TrainingData, eval_caches, open_training_data
from raytuner.config import RunConfig
from raytuner.evaluate.eval_loss import EvalSample, eval_samples, evaluation_loss
from raytuner.evaluate.metrics import MetricsLog, ProgressLine
from raytuner.evaluate.wandb_tracker import WandbTarget
from raytuner.hub import CheckpointUploads, HubTarget
from raytuner.models.registry import get_family
from raytuner.quantize import adapter_spec, quantize_base, quantize_load_device
from raytuner.train import state as checkpoint_state
from raytuner.train.ema import AdapterEMA
from raytuner.train.layout import SharedRootMarker, check_marker
from raytuner.train.offload import (
    OFFLOAD_DEVICE,
    OffloadedWeights,
    apply_group_offload,
    plan_group_offload,
    remove_disk_copy,
)
from raytuner.train.optim import build_lr_scheduler, build_optimizer
from raytuner.train.schedule import flow_schedule_from_config
from raytuner.train.step import MicroBatch, StepResult, optimizer_step
from raytuner.train.zero import (
    DeepSpeedPlan,
    DeepSpeedTraining,
    engine_state_problem,
    saved_with_engine,
    use_cpu_accelerator,
)
from raytuner.upstream import quiet_train_report_logs
from raytuner.webhooks import Webhooks, WebhookSettings, mark_reported

logger = logging.getLogger(__name__)

EMA_FOLDER = "ema"
UNCLIPPED_OPTIMIZERS = ("optimi-stableadamw", "prodigy")


@dataclass(frozen=True, kw_only=True)
class FailureInjection:
    """Test aid: the worker of ``rank`` exits abruptly at ``step``, once (``marker`` records it)."""

    step: int
    rank: int
    marker: str

    @classmethod
    def parse(cls, text: str, *, default_marker: str) -> FailureInjection:
        """``step=K[,rank=R][,marker=PATH]`` (from ``RAYTUNER_INJECT_FAILURE``)."""
        fields = dict(part.split("=", 1) for part in text.split(",") if part.strip())
        return cls(
            step=int(fields["step"]),
            rank=int(fields.get("rank", 0)),
            marker=fields.get("marker", default_marker),
        )


@dataclass(frozen=True, kw_only=True)
class TrainJob:
    """Everything a worker needs, sent by the driver through ``train_loop_config``."""

    run: RunConfig
    run_name: str
    total_steps: int
    steps_per_epoch: int
    marker: SharedRootMarker
    start_from: str | None = None  # resume_from_checkpoint as a path: the starting state
    inject_failure: FailureInjection | None = None
    ray_metrics: bool = True
    validation_prompts: dict[str, str] = field(default_factory=dict)
    deepspeed: DeepSpeedPlan | None = None  # the DeepSpeed strategy, planned by the driver
    hub: HubTarget | None = None  # the Hub repo the driver opened (push_to_hub); never the token
    webhooks: WebhookSettings | None = None  # webhook_config, read by the driver (raytuner/webhooks.py)
    wandb: WandbTarget | None = None  # the W&B run rank 0 logs to (report_to wandb / all); no key


@dataclass(frozen=True, kw_only=True)
class Reporter:
    """How the loop talks to Ray Train (or to a test): report, and the checkpoint to resume from."""

    report: Callable[[dict[str, Any], Path | None, str | None], None]
    restored_checkpoint: Callable[[], Any]  # a ray.train.Checkpoint or None
    # Every checkpoint folder in the run's storage, newest first (ray.train.Checkpoint objects).
    stored_checkpoints: Callable[[], list[Any]] = lambda: []


CHECKPOINT_PREFIX = "checkpoint-"


def checkpoint_name(step: int) -> str:
    return f"{CHECKPOINT_PREFIX}{step:07d}"


def checkpoint_step(path: str) -> int | None:
    """The step of a folder named by :func:`checkpoint_name`, else None."""
    name = path.rstrip("/").rsplit("/", 1)[-1]
    suffix = name.removeprefix(CHECKPOINT_PREFIX)
    return int(suffix) if name.startswith(CHECKPOINT_PREFIX) and suffix.isdigit() else None


def _peak_memory_mib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class Worker:
    """One worker's state and steps."""

    def __init__(self, job: TrainJob, *, rank: int, world_size: int, device: torch.device) -> None:
        self.job = job
        self.run = job.run
        self.training = job.run.training
        self.rank = rank
        self.world_size = world_size
        self.device = device
        self.seed = job.run.seed
        self.shape = BatchShape(
            per_worker=self.training.train_batch_size,
            workers=world_size,
            accumulation=self.training.gradient_accumulation_steps,
        )
        base_dtype = torch.bfloat16 if self.training.mixed_precision == "bf16" else torch.float32
        family_class = get_family(self.training.model_family)
        self.family = family_class(
            family_class.resolve_model_path(
                self.training.model_flavour, self.training.pretrained_model_name_or_path
            ),
            revision=self.training.revision,
            device=device,
            dtype=base_dtype,
        )
        # Group offload keeps the base's weights on the CPU and moves one group at a time.
        self.offload = plan_group_offload(self.training, device=device, run_name=job.run_name, rank=rank)
        base_device = OFFLOAD_DEVICE if self.offload is not None else device
        # base_model_precision: quantised before the adapter is built, on the CPU first when
        # quantize_via is "cpu" (raytuner/quantize.py).
        self.transformer = quantize_base(
            self.family.load_transformer(device=quantize_load_device(self.training, base_device)),
            self.training,
            device=base_device,
        ).requires_grad_(False)
        if self.training.gradient_checkpointing and getattr(
            self.transformer, "_supports_gradient_checkpointing", False
        ):
            self.transformer.enable_gradient_checkpointing()
        self.transformer.train()
        assert self.run.lycoris is not None, "the config check requires a lycoris_config"
        self.network, self.adapter_report = build_adapter(
            self.transformer,
            adapter_spec(self.run.lycoris, self.training),
            module_aliases=self.family.module_aliases,
            seed=self.seed,
        )
        # The adapter trains in float32 whatever the base model's precision.
        self.network.to(device=device, dtype=torch.float32)
        self.offloaded_weights: OffloadedWeights | None = None
        if self.offload is not None:
            apply_group_offload(self.transformer, self.offload, onload_device=device)
            self.offloaded_weights = OffloadedWeights(self.transformer, onload_device=device)
        self.parameters = [p for p in self.network.parameters() if p.requires_grad]
        self.optimizer = build_optimizer(self.parameters, self.training, world_size=world_size)
        self.lr_scheduler = build_lr_scheduler(self.optimizer, self.training, total_steps=job.total_steps)
        self.deepspeed: DeepSpeedTraining | None = None
        if job.deepspeed is not None:
            if rank == 0:
                logger.info("DeepSpeed: %s", job.deepspeed.describe())
                for note in job.deepspeed.notes:
                    logger.warning(note)
            self.deepspeed = DeepSpeedTraining(
                job.deepspeed,
                transformer=self.transformer,
                network=self.network,
                parameters=self.parameters,
                optimizer=self.optimizer,
            )
        self.ema = (
            AdapterEMA(self.parameters, decay=self.training.ema_decay) if self.training.use_ema else None
        )
        self.schedule = flow_schedule_from_config(self.training)
        # SimpleTuner never clips for the optimisers that bound their own updates.
        self.max_grad_norm = (
            None if self.training.optimizer in UNCLIPPED_OPTIMIZERS else self.training.max_grad_norm
        )
        self.data: TrainingData = open_training_data(self.run)
        self._plans: dict[int, EpochPlan] = {}
        self.eval_caches = eval_caches(self.run)
        self.eval_set: list[EvalSample] = (
            eval_samples(self.eval_caches, self.training.num_eval_images) if self.eval_caches else []
        )
        self.step = 0
        self.eval_loss: float | None = None
        self.metrics: MetricsLog | None = None
        self._validator: Any = None
        # push_checkpoints_to_hub: rank 0 commits each checkpoint as it is saved (raytuner/hub.py).
        self.checkpoint_uploads: CheckpointUploads | None = None
        if rank == 0 and job.hub is not None and job.hub.push_checkpoints:
            self.checkpoint_uploads = CheckpointUploads(
                job.hub, self.run, prompts=job.validation_prompts, total_steps=job.total_steps
            )
        # webhook_config: rank 0 sends the run's events from a background thread.
        self.webhooks: Webhooks | None = Webhooks(job.webhooks) if rank == 0 and job.webhooks else None
        if rank == 0:
            self.metrics = MetricsLog(
                self.training.output_dir,
                report_to=self.training.report_to,
                run_name=job.run_name,
                ray_metrics=job.ray_metrics,
                wandb=job.wandb,
            )

    # ---- collectives ---------------------------------------------------------------------------

    def _distributed(self) -> bool:
        return self.world_size > 1 and torch.distributed.is_available() and torch.distributed.is_initialized()

    def reduce_mean(self, tensor: torch.Tensor) -> torch.Tensor:
        torch.distributed.all_reduce(tensor)
        return tensor / self.world_size

    def reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        torch.distributed.all_reduce(tensor)
        return tensor

    # ---- data ----------------------------------------------------------------------------------

    def plan(self, epoch: int) -> EpochPlan:
        if epoch not in self._plans:
            self._plans = {epoch: self.data.plan(self.shape, seed=self.seed, epoch=epoch)}
        return self._plans[epoch]

    def micro_batches(self, step: int) -> list[MicroBatch]:
        epoch, index = divmod(step, self.job.steps_per_epoch)
        batch = self.plan(epoch).batches[index]
        micro = []
        for micro_step in range(self.shape.accumulation):
            keys = batch.slice_for(self.shape, rank=self.rank, micro_step=micro_step)
            latents, conditioning = self.data.batch(batch, keys, seed=self.seed, step=step)
            seeds = batch.seeds_for(
                self.shape, rank=self.rank, micro_step=micro_step, seed=self.seed, step=step
            )
            micro.append(
                MicroBatch(
                    latents=latents.to(self.device),
                    conditioning=self.family.collate_conditioning(conditioning),
                    generators=sample_generators(seeds),
                    is_regularisation=batch.is_regularisation,
                    loss_mask=self.data.loss_masks(batch, keys),
                )
            )
        return micro

    # ---- checkpoints ---------------------------------------------------------------------------

    def restore(self, folder: Path, *, source: str) -> None:
        info = checkpoint_state.read_manifest(folder)
        saved = checkpoint_state.read_state(folder)
        self.restore_weights(folder, saved, info, source=source)
        self.lr_scheduler.load_state_dict(saved["lr_scheduler"])
        if self.ema is not None:
            if saved.get("ema") is not None:
                self.ema.load_state_dict(saved["ema"])
            else:
                logger.warning("%s holds no EMA weights; the EMA starts from the restored adapter", source)
                self.ema = AdapterEMA(self.parameters, decay=self.training.ema_decay)
        rng = checkpoint_state.read_rng(folder, self.rank)
        if rng is not None and info.world_size == self.world_size:
            checkpoint_state.restore_rng(rng)
        if info.steps_per_epoch != self.job.steps_per_epoch and self.rank == 0:
            logger.warning(
                "%s was written with %d steps per epoch, this run plans %d (the data or batch shape "
                "changed): training continues from step %d on the new plan",
                source,
                info.steps_per_epoch,
                self.job.steps_per_epoch,
                info.step,
            )
        self.step = info.step
        self.eval_loss = saved.get("eval_loss")
        if self.rank == 0:
            logger.info("resumed from %s at step %d", source, self.step)

    def restore_weights(
        self, folder: Path, saved: dict[str, Any], info: checkpoint_state.CheckpointInfo, *, source: str
    ) -> None:
        """The adapter and optimizer state, through the DeepSpeed engine where this run has one.

        A checkpoint moves between strategies and worker counts with its adapter, EMA, schedule
        and step; only optimizer state that cannot fit the new layout (ZeRO partitions for another
        worker count, or another strategy's format) starts fresh, and the log says so.
        """
        if self.deepspeed is not None:
            if saved_with_engine(folder) and info.world_size == self.world_size:
                problem = engine_state_problem(folder, world_size=self.world_size)
                if problem is not None:
                    raise checkpoint_state.CheckpointError(problem)
                self.deepspeed.load(folder)
                return
            self.deepspeed.set_adapter(self.network, saved["adapter"])
            reason = (
                f"holds DeepSpeed state partitioned for {info.world_size} workers, this run has {self.world_size}"
                if saved_with_engine(folder)
                else "holds no DeepSpeed state (written without deepspeed_config)"
            )
        else:
            self.network.load_state_dict(saved["adapter"])
            if saved.get("optimizer") is not None:
                self.optimizer.load_state_dict(saved["optimizer"])
                return
            reason = "holds DeepSpeed optimizer state, and this run does not use DeepSpeed"
        if self.rank == 0:
            logger.warning("%s %s: the adapter is restored, the optimizer state starts fresh", source, reason)

    def restore_latest(self, reporter: Reporter) -> bool:
        """Restore the run's newest whole checkpoint; False when it has none.

        Ray Train registers a reported checkpoint when its controller next polls the workers, so
        a worker that dies right after a report can leave the newest checkpoint written and
        uploaded but unregistered. Such a folder is used when its manifest shows it whole; a
        folder that is not whole is passed over for the next older one.
        """
        registered = reporter.restored_checkpoint()
        registered_step = checkpoint_step(registered.path) if registered is not None else None
        for stored in reporter.stored_checkpoints():
            step = checkpoint_step(stored.path)
            if step is None or (registered_step is not None and step <= registered_step):
                break
            try:
                with stored.as_directory() as folder:
                    self.restore(Path(folder), source=f"checkpoint {stored.path}")
                return True
            except checkpoint_state.CheckpointError as error:
                if self.rank == 0:
                    logger.warning("passing over an incomplete checkpoint: %s", error)
        if registered is None:
            return False
        with registered.as_directory() as folder:
            self.restore(Path(folder), source=f"the run's latest checkpoint {registered.path}")
        return True

    def write_checkpoint(self, folder: Path) -> None:
        checkpoint_state.write_rng(folder, self.rank)
        if self.deepspeed is not None:
            self.deepspeed.save(folder)  # every worker writes its own optimizer partition
        if self.rank != 0:
            return
        save_adapter(self.network, folder, metadata=self.adapter_metadata())
        if self.ema is not None:
            with self.ema.swapped_in():
                save_adapter(self.network, folder / EMA_FOLDER, metadata=self.adapter_metadata(ema=True))
        checkpoint_state.write_state(
            folder,
            {
                "adapter": plain_tensors(self.network.state_dict()),
                # Under DeepSpeed the optimizer state is the engine's, in deepspeed/ beside this.
                "optimizer": self.optimizer.state_dict() if self.deepspeed is None else None,
                "lr_scheduler": self.lr_scheduler.state_dict(),
                "ema": self.ema.state_dict() if self.ema is not None else None,
                "step": self.step,
                "eval_loss": self.eval_loss,
            },
        )
        checkpoint_state.write_manifest(
            folder, step=self.step, world_size=self.world_size, steps_per_epoch=self.job.steps_per_epoch
        )

    def adapter_metadata(self, *, ema: bool = False) -> dict[str, Any]:
        return {
            "raytuner_family": self.training.model_family,
            "raytuner_step": str(self.step),
            "raytuner_ema": "true" if ema else "false",
            "lycoris_config": self.run.to_dict()["lycoris"],
        }

    # ---- evaluation and validation -------------------------------------------------------------

    def evaluate(self) -> float | None:
        if not self.eval_set:
            return None
        # Under ZeRO-3 every forward of the base gathers its layers from all workers, so each
        # worker evaluates the whole set in lockstep instead of its share.
        lockstep = self.lockstep()
        loss = evaluation_loss(
            self.family,
            self.transformer,
            self.eval_set,
            self.eval_caches,
            self.data.text,
            timesteps=self.training.eval_timesteps,
            batch_size=self.training.train_batch_size,
            rank=0 if lockstep else self.rank,
            world_size=1 if lockstep else self.world_size,
            mixed_precision=self.training.mixed_precision,
            reduce_sum=self.reduce_sum if self._distributed() and not lockstep else None,
        )
        if self.metrics is not None:
            self.metrics.log({"step": self.step, "kind": "eval", "eval_loss": loss})
        return loss

    def lockstep(self) -> bool:
        """Whether the base's weights are partitioned (ZeRO-3), so every worker runs every forward."""
        return self.deepspeed is not None and self.deepspeed.partitions_base and self._distributed()

    def validate(self) -> None:
        """Rank 0 renders the validation prompts (and with EMA weights) into validation/step_N/.

        Under ZeRO-3 every worker renders the same images in lockstep, since each layer of the
        base is gathered from all of them; only rank 0 keeps what it renders.
        """
        lockstep = self.lockstep()
        if not self.job.validation_prompts or (self.rank != 0 and not lockstep):
            return
        if self._validator is None:
            from raytuner.train.validate import Validator

            self._validator = Validator(self)
        if self.rank != 0:
            with tempfile.TemporaryDirectory(prefix="raytuner-validation-") as scratch:
                self._validator.render(folder=Path(scratch))
            return
        rendered = self._validator.render()
        if self.webhooks is not None:
            self.webhooks.validation(step=self.step, images=rendered.images)
        if self.metrics is not None:
            self.metrics.images("validation", rendered.images, self.step, rendered.captions)
            if rendered.metrics:  # the CLIP scores, with evaluation_type "clip"
                self.metrics.log({"step": self.step, "kind": "validation", **rendered.metrics})

    # ---- the loop ------------------------------------------------------------------------------

    def due(self, interval: int | None) -> bool:
        return bool(interval and self.step % interval == 0)

    def optimizer_step(self, micro: list[MicroBatch]) -> StepResult:
        reduce_mean = self.reduce_mean if self._distributed() else None
        if self.deepspeed is not None:
            # The engine reduces, clips (deepspeed_config's gradient_clipping) and steps the optimizer.
            return self.deepspeed.step(
                self.family,
                self.network,
                micro,
                self.schedule,
                mixed_precision=self.training.mixed_precision,
                reduce_mean=reduce_mean,
            )
        saving = self.offloaded_weights.saving() if self.offloaded_weights else contextlib.nullcontext()
        with saving:
            return optimizer_step(
                self.family,
                self.transformer,
                self.network,
                self.parameters,
                self.optimizer,
                micro,
                self.schedule,
                max_grad_norm=self.max_grad_norm,
                grad_clip_method=self.training.grad_clip_method,
                mixed_precision=self.training.mixed_precision,
                reduce_mean=reduce_mean,
            )

    def train(self, reporter: Reporter) -> None:
        if not self.restore_latest(reporter) and self.job.start_from:
            from ray.train import Checkpoint

            with Checkpoint(self.job.start_from).as_directory() as folder:
                self.restore(Path(folder), source=self.job.start_from)
        if self.metrics is not None:
            self.metrics.start(self.step)
        if self.step == 0:
            self.eval_loss = self.evaluate()  # the baseline
        progress = ProgressLine(self.job.total_steps, start_step=self.step, label=self.training.model_family)
        samples_per_step = self.shape.global_size
        if self.rank == 0:
            logger.info(
                "training %s: steps %d..%d, %d worker(s), global batch %d (%d x %d workers x %d accumulation); %s",
                self.job.run_name,
                self.step + 1,
                self.job.total_steps,
                self.world_size,
                samples_per_step,
                self.shape.per_worker,
                self.world_size,
                self.shape.accumulation,
                self.adapter_report.summary(),
            )
        if self.webhooks is not None:
            self.webhooks.started(
                step=self.step,
                total_steps=self.job.total_steps,
                workers=self.world_size,
                global_batch=samples_per_step,
            )
        while self.step < self.job.total_steps:
            started = time.perf_counter()
            micro = self.micro_batches(self.step)
            data_seconds = time.perf_counter() - started
            learning_rate = float(self.lr_scheduler.get_last_lr()[0])
            result = self.optimizer_step(micro)
            self.lr_scheduler.step()
            if self.ema is not None:
                self.ema.update()
            self.step += 1
            step_seconds = time.perf_counter() - started
            final = self.step == self.job.total_steps
            if self.due(self.training.eval_steps_interval) or (final and self.eval_set):
                self.eval_loss = self.evaluate()
            metrics: dict[str, Any] = {
                "step": self.step,
                "epoch": (self.step - 1) // self.job.steps_per_epoch,
                "loss": result.loss,
                "lr": learning_rate,
                "grad_norm": result.grad_norm,
                "samples_per_second": samples_per_step / step_seconds,
                "step_time_s": step_seconds,
                "data_wait_fraction": data_seconds / step_seconds,
                "peak_memory_mib": _peak_memory_mib(self.device),
            }
            if result.regularisation_loss is not None:
                metrics["regularisation_loss"] = result.regularisation_loss
            if self.eval_loss is not None:
                # Repeated in every report, so a Tune scheduler never sees a report without it.
                metrics["eval_loss"] = self.eval_loss
            if self.metrics is not None:
                self.metrics.log(metrics)
            if self.webhooks is not None:
                self.webhooks.progress(step=self.step, total_steps=self.job.total_steps, metrics=metrics)
            if self.due(self.training.validation_step_interval) or final:
                self.validate()
            self.maybe_fail()
            checkpoint_due = self.due(self.training.checkpoint_step_interval) or final
            self.report(reporter, metrics, checkpoint=checkpoint_due)
            if self.rank == 0:
                progress.update(self.step, metrics, force=final)
        if self.rank == 0:
            self.write_outputs()
            if self.metrics is not None:
                self.metrics.close()

    def report(self, reporter: Reporter, metrics: dict[str, Any], *, checkpoint: bool) -> None:
        if not checkpoint:
            reporter.report(metrics, None, None)
            return
        folder = Path(tempfile.mkdtemp(prefix="raytuner-checkpoint-"))
        try:
            self.write_checkpoint(folder)
            reporter.report(metrics, folder, checkpoint_name(self.step))
            if self.webhooks is not None:
                self.webhooks.checkpoint(step=self.step, name=checkpoint_name(self.step))
            if self.checkpoint_uploads is not None:  # stored by Ray Train first; the folder goes next
                self.checkpoint_uploads.publish(folder, step=self.step, eval_loss=self.eval_loss)
        finally:
            shutil.rmtree(folder, ignore_errors=True)

    def maybe_fail(self) -> None:
        injection = self.job.inject_failure
        if injection is None or injection.step != self.step or injection.rank != self.rank:
            return
        marker = Path(injection.marker)
        if marker.exists():
            return
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.write_text(f"failed at step {self.step}\n")
        logger.error("injected failure: worker %d exits at step %d", self.rank, self.step)
        os._exit(17)  # as abrupt as a killed process: no cleanup, no report

    def write_outputs(self) -> None:
        """The final adapter (and its EMA twin) in ``output_dir``, loadable with the seeds' recipe."""
        output_dir = self.training.output_dir
        path = save_adapter(self.network, output_dir, metadata=self.adapter_metadata())
        logger.info("adapter written to %s", path)
        if self.ema is not None:
            with self.ema.swapped_in():
                ema_path = save_adapter(
                    self.network, output_dir / EMA_FOLDER, metadata=self.adapter_metadata(ema=True)
                )
            logger.info("EMA adapter written to %s", ema_path)
        if self.webhooks is not None:
            self.webhooks.finished(step=self.step, adapter=path)


def train_worker(config: dict[str, Any]) -> None:
    """Ray Train's ``train_loop_per_worker``."""
    import ray.train
    import ray.train.torch

    job: TrainJob = config["job"]
    context = ray.train.get_context()
    rank, world_size = context.get_world_rank(), context.get_world_size()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("LyCORIS").setLevel(logging.WARNING)
    quiet_train_report_logs()
    import ray

    check_marker(job.marker, node=ray.get_runtime_context().get_node_id()[:12])
    device = ray.train.torch.get_device()
    if job.deepspeed is not None:
        use_cpu_accelerator(device)
    worker = Worker(job, rank=rank, world_size=world_size, device=device)

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

    try:
        worker.train(
            Reporter(
                report=report,
                restored_checkpoint=ray.train.get_checkpoint,
                stored_checkpoints=stored_checkpoints,
            )
        )
    except BaseException as error:
        if worker.webhooks is not None:  # sent before the error reaches Ray; the driver skips it then
            worker.webhooks.failed(error, step=worker.step)
            mark_reported(error)
        raise
    finally:
        if worker.webhooks is not None:
            worker.webhooks.close()
        remove_disk_copy(worker.offload)
        if worker.metrics is not None:  # a failed run's W&B run is flushed and marked failed
            worker.metrics.close(failed=sys.exc_info()[0] is not None)
        if worker.checkpoint_uploads is not None:  # the driver's final commit must come after these
            worker.checkpoint_uploads.close()
