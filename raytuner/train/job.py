"""What the driver sends every worker of a training run (``train_loop_config``), and the function
Ray Train runs on each worker.

Ray Train's controller unpickles both before it starts the workers, so this module and everything
a job holds import no model code: no diffusers, LyCORIS or transformers, which take seconds to
import and would delay every run's start (``tests/train/test_job.py`` checks it).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from raytuner.config import RunConfig
from raytuner.evaluate.wandb_tracker import WandbTarget
from raytuner.hub import HubTarget
from raytuner.train.deepspeed_plan import DeepSpeedPlan
from raytuner.train.layout import SharedRootMarker
from raytuner.webhooks import WebhookSettings

if TYPE_CHECKING:
    from raytuner.train.callbacks import TrainCallback


@dataclass(frozen=True, kw_only=True)
class TrainJob:
    """Everything a worker needs, sent by the driver through ``train_loop_config``."""

    run: RunConfig
    run_name: str
    total_steps: int
    steps_per_epoch: int
    marker: SharedRootMarker
    start_from: str | None = None  # resume_from_checkpoint as a path: the starting state
    ray_metrics: bool = True
    validation_prompts: dict[str, str] = field(default_factory=dict)
    deepspeed: DeepSpeedPlan | None = None  # the DeepSpeed strategy, planned by the driver
    hub: HubTarget | None = None  # the Hub repo the driver opened (push_to_hub); never the token
    webhooks: WebhookSettings | None = None  # webhook_config, read by the driver (raytuner/webhooks.py)
    wandb: WandbTarget | None = None  # the W&B run rank 0 logs to (report_to wandb / all); no key
    callbacks: tuple[TrainCallback, ...] = ()  # the run's own, on every worker (they must pickle)


def train_job(config: dict[str, Any]) -> None:
    """Ray Train's ``train_loop_per_worker``: the loop, imported on the worker only."""
    from raytuner.train.loop import train_worker

    train_worker(config)
