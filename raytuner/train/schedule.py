"""The flow-matching training schedule a ``config.json`` asks for, in SimpleTuner's terms."""

from __future__ import annotations

from raytuner import flow
from raytuner.config.training import FlowSection


def flow_schedule_from_config(settings: FlowSection) -> flow.FlowSchedule:
    """``flow_use_uniform_schedule`` wins over ``flow_use_beta_schedule``, as in SimpleTuner;
    otherwise sigmas are logit-normal with ``flow_sigmoid_scale``. The shift follows
    ``flow_schedule_shift`` / ``flow_schedule_auto_shift`` (see :func:`flow.effective_shift`)."""
    if settings.flow_use_uniform_schedule:
        distribution: flow.SigmaDistribution = "uniform"
    elif settings.flow_use_beta_schedule:
        distribution = "beta"
    else:
        distribution = "logit_normal"
    sampling = flow.SigmaSampling(
        distribution=distribution,
        sigmoid_scale=settings.flow_sigmoid_scale,
        beta_alpha=settings.flow_beta_schedule_alpha,
        beta_beta=settings.flow_beta_schedule_beta,
    )
    return flow.FlowSchedule(
        sampling=sampling,
        shift=settings.flow_schedule_shift,
        auto_shift=settings.flow_schedule_auto_shift,
    )
