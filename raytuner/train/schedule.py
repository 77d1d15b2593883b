"""The flow-matching training schedule a ``config.json`` asks for, in SimpleTuner's terms."""

from __future__ import annotations

from raytuner import flow
from raytuner.config.training import TrainingConfig


def flow_schedule_from_config(training: TrainingConfig) -> flow.FlowSchedule:
    """``flow_use_uniform_schedule`` wins over ``flow_use_beta_schedule``, as in SimpleTuner;
    otherwise sigmas are logit-normal with ``flow_sigmoid_scale``. The shift follows
    ``flow_schedule_shift`` / ``flow_schedule_auto_shift`` (see :func:`flow.effective_shift`)."""
    if training.flow_use_uniform_schedule:
        distribution: flow.SigmaDistribution = "uniform"
    elif training.flow_use_beta_schedule:
        distribution = "beta"
    else:
        distribution = "logit_normal"
    sampling = flow.SigmaSampling(
        distribution=distribution,
        sigmoid_scale=training.flow_sigmoid_scale,
        beta_alpha=training.flow_beta_schedule_alpha,
        beta_beta=training.flow_beta_schedule_beta,
    )
    return flow.FlowSchedule(
        sampling=sampling, shift=training.flow_schedule_shift, auto_shift=training.flow_schedule_auto_shift
    )
