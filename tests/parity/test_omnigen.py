"""OmniGen: raytuner's training math held against SimpleTuner's (``tests/parity/simpletuner.py``).

Where raytuner follows SimpleTuner the tests ask for equality; where it deliberately differs
(``docs/simpletuner-differences.md``: masked loss) they assert the documented difference, so a
change either way is noticed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from raytuner import flow
from raytuner.cache.stages import mask_on_latent_grid
from raytuner.train.step import MicroBatch, micro_batch_loss
from tests.parity import simpletuner as st
from tests.parity.helpers import (
    DRAWS,
    SAME_DISTRIBUTION,
    TinyRun,
    expanded_latents,
    ks_statistic,
    per_sample_losses,
    recording,
    tiny_run,
)

SCHEDULE = flow.FlowSchedule()
TOLERANCE = {"rtol": 1e-5, "atol": 1e-6}
TEXT_INPUTS = ("input_ids", "attention_mask", "position_ids", "input_image_sizes")


@pytest.fixture(scope="module")
def run(tiny_omnigen_dir: Path) -> TinyRun:
    return tiny_run("omnigen", tiny_omnigen_dir)


def _text_of(call: dict[str, Any]) -> dict[str, Any]:
    """The text side of a recorded call (ids, masks and positions from OmniGen's processor)."""
    return {name: call[name] for name in TEXT_INPUTS}


def test_the_transformer_sees_simpletuners_input_and_timestep_and_the_loss_is_simpletuners(
    run: TinyRun,
) -> None:
    family = run.family
    alone = per_sample_losses(run, SCHEDULE)
    noise, sigmas, losses, calls = alone.noise, alone.sigmas, alone.losses, alone.calls
    data_fractions = 1.0 - sigmas  # raytuner's sigma is the noise fraction; OmniGen's t the data's
    for i, call in enumerate(calls.inputs):
        reference = st.omnigen_step(
            run.transformer,
            run.latents[i : i + 1],
            noise[i : i + 1],
            data_fractions[i : i + 1],
            _text_of(call),
        )
        torch.testing.assert_close(call["hidden_states"], reference.model_input, **TOLERANCE)
        torch.testing.assert_close(call["timestep"], reference.timestep, **TOLERANCE)
        torch.testing.assert_close(losses[i], reference.per_sample_loss[0], **TOLERANCE)
    # The target direction: the transformer predicts x0 - noise (SimpleTuner's direction -1).
    torch.testing.assert_close(
        flow.velocity_target(run.latents, noise, direction=family.target_direction), run.latents - noise
    )


def test_regularisation_data_is_trained_towards_the_base_models_prediction(run: TinyRun) -> None:
    family = run.family
    noise, sigmas = family.sample_noise_and_sigmas(run.latents, SCHEDULE, generator=run.generators())
    batch = MicroBatch(
        latents=run.latents,
        conditioning=run.conditioning,
        generators=run.generators(),
        is_regularisation=True,
    )
    with recording(run.transformer) as calls:
        loss = micro_batch_loss(family, run.transformer, run.network, batch, SCHEDULE)
    text = _text_of(calls.inputs[0])
    data_fractions = 1.0 - sigmas
    with st.parent_model(run.network):
        parent = st.omnigen_step(run.transformer, run.latents, noise, data_fractions, text).prediction
    reference = st.omnigen_step(run.transformer, run.latents, noise, data_fractions, text, target=parent)
    torch.testing.assert_close(loss, reference.per_sample_loss.mean(), **TOLERANCE)
    assert float(loss.detach()) > 0.0


def test_a_mask_weights_the_loss_where_simpletuners_omnigen_applies_none(run: TinyRun) -> None:
    """A documented difference: SimpleTuner's OmniGen loss never reads the conditioning mask;
    raytuner weights it as SimpleTuner's common loss does for every other family."""
    family = run.family
    grid = tuple(run.latents.shape[-2:])
    height, width = (8 * size for size in grid)
    mask_pixels = torch.zeros(run.latents.shape[0], 1, height, width, dtype=torch.uint8)
    mask_pixels[:, :, :, : width // 2] = 255
    latent_masks = torch.stack(
        [torch.from_numpy(mask_on_latent_grid(m[0].numpy(), grid)) for m in mask_pixels]
    )
    noise, sigmas = family.sample_noise_and_sigmas(run.latents, SCHEDULE, generator=run.generators())
    batch = MicroBatch(
        latents=run.latents,
        conditioning=run.conditioning,
        generators=run.generators(),
        loss_mask=latent_masks,
    )
    with recording(run.transformer) as calls:
        loss = micro_batch_loss(family, run.transformer, run.network, batch, SCHEDULE)
    plain = st.omnigen_step(run.transformer, run.latents, noise, 1.0 - sigmas, _text_of(calls.inputs[0]))
    per_element = (plain.prediction - plain.target) ** 2
    torch.testing.assert_close(loss, st.masked_mean(per_element, mask_pixels).mean(), **TOLERANCE)
    assert float(loss.detach()) < 0.75 * float(
        plain.per_sample_loss.mean()
    )  # SimpleTuner's OmniGen: unmasked


def _raytuner_data_fractions(run: TinyRun, schedule: flow.FlowSchedule) -> torch.Tensor:
    latents = expanded_latents(torch.zeros(1, 4, 128, 128), DRAWS)
    sigmas = run.family.sample_sigmas(latents, schedule, generator=torch.Generator().manual_seed(12))
    return run.family.timesteps_from_sigmas(sigmas)


@pytest.mark.parametrize(
    "schedule",
    [SCHEDULE, flow.FlowSchedule(shift=3.0), flow.FlowSchedule(auto_shift=True)],
    ids=["default", "shift-3", "auto-shift"],
)
def test_timesteps_are_simpletuners_sigmoid_normal_and_no_shift_applies(
    run: TinyRun, schedule: flow.FlowSchedule
) -> None:
    """OmniGen's quickstart: its own flow-matching scheme, no schedule shift (and SimpleTuner's
    OmniGen code agrees)."""
    simpletuner = st.omnigen_data_fractions(torch.randn(DRAWS, generator=torch.Generator().manual_seed(11)))
    assert ks_statistic(_raytuner_data_fractions(run, schedule), simpletuner) < SAME_DISTRIBUTION
