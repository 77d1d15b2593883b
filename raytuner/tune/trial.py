"""One sweep trial: a whole raytuner training run, with its own Ray Train workers, inside Ray Tune.

This is Ray 2.60's supported way of running Ray Train inside Ray Tune (Train V2): the Tune
*function* builds a ``TorchTrainer`` and calls ``fit()``; ``TuneReportCallback`` forwards every
report of the Train run's rank 0 to Tune, where the searcher and the early-stopping scheduler see
them. The Train run is pinned to a name made of the sweep's and the trial's, under the sweep's
storage, so a trial resumed after an interruption continues its Train run from its last checkpoint.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from raytuner.config.training import replace_options
from raytuner.evaluate.wandb_tracker import client_settings
from raytuner.train.settings import RaySettings
from raytuner.tune.sweep import Sweep

logger = logging.getLogger(__name__)

TRIALS_FOLDER = "trials"
TRIAL_FILE = "trial.json"


@dataclass(frozen=True, kw_only=True)
class TrialPlan:
    """What every trial shares, sent once through the object store (``tune.with_parameters``)."""

    sweep: Sweep
    settings: RaySettings
    trials_dir: Path
    ray_metrics: bool = True
    # WANDB_MODE / WANDB_ENTITY / WANDB_BASE_URL of the sweep's shell: trials run in Ray's processes.
    tracker_client: dict[str, str] = field(default_factory=client_settings)

    def train_run_name(self, trial_id: str) -> str:
        return f"{self.sweep.name}-{trial_id}"


def trial_output_dir(trials_dir: Path, trial_id: str) -> Path:
    return trials_dir / trial_id


def run_trial(config: dict[str, Any], plan: TrialPlan) -> None:
    """The Tune function: train one point of the search space with Ray Train, reporting to Tune."""
    import ray.tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from raytuner.outputs import write_config_copies
    from raytuner.train.launcher import build_trainer, finish_outputs, fit, prepare_job

    trial_id = ray.tune.get_context().get_trial_id()
    point = {parameter.key: config[parameter.key] for parameter in plan.sweep.parameters}
    run = plan.sweep.trial_run(point, where=f"{plan.sweep.path.name}: trial {trial_id} {point}")
    output_dir = trial_output_dir(plan.trials_dir, trial_id)
    # Every trial resumes its own Train run when it is run again (an interrupted sweep resumed), and
    # no trial publishes: push_to_hub is for the `raytuner train` run of the chosen config.
    run = dataclasses.replace(
        run,
        training=replace_options(
            run.training,
            {
                "output_dir": output_dir,
                "resume_from_checkpoint": "latest",
                "push_to_hub": False,
                "push_checkpoints_to_hub": False,
                "push_to_hub_background": False,
            },
        ),
    )
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / TRIAL_FILE).write_text(
        json.dumps({"trial_id": trial_id, "sweep": plan.sweep.name, "point": point}, indent=2) + "\n",
        encoding="utf-8",
    )
    job = prepare_job(
        run,
        plan.settings,
        name=plan.train_run_name(trial_id),
        ray_metrics=plan.ray_metrics,
        sweep=plan.sweep.name,  # W&B groups the sweep's trials under its name
        tracker_client=plan.tracker_client,
    )
    write_config_copies(run, output_dir)
    logger.info("trial %s: %s, %d steps, outputs in %s", trial_id, point, job.total_steps, output_dir)
    result = fit(build_trainer(job, plan.settings, callbacks=[TuneReportCallback()]))
    finish_outputs(run, result, job.total_steps)
