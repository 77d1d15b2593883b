"""Masked loss: the flow-matching loss weighted per latent pixel by the cached mask."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch

from raytuner import flow
from raytuner.train.step import micro_batch_loss
from tests.train.helpers import SCHEDULE, make_setup, micro, perturb


def _pointwise_loss(
    weight: torch.Tensor, inputs: torch.Tensor, target: torch.Tensor, mask: torch.Tensor
) -> torch.Tensor:
    """A per-pixel model (a 1x1 convolution), so a pixel's prediction depends on that pixel alone."""
    prediction = torch.einsum("oc,bchw->bohw", weight, inputs)
    return flow.flow_matching_loss(prediction, target, flow.loss_mask_weights(mask, prediction))


def _loss_and_grad(
    inputs: torch.Tensor, target: torch.Tensor, mask: torch.Tensor
) -> tuple[float, torch.Tensor]:
    weight = torch.eye(4).add(0.1).requires_grad_(True)
    loss = _pointwise_loss(weight, inputs, target, mask)
    loss.backward()
    assert weight.grad is not None
    return float(loss.detach()), weight.grad.clone()


def test_masked_out_latent_pixels_change_neither_loss_nor_gradients() -> None:
    generator = torch.Generator().manual_seed(0)
    inputs = torch.randn(2, 4, 6, 6, generator=generator)
    target = torch.randn(2, 4, 6, 6, generator=generator)
    mask = torch.zeros(2, 6, 6)
    mask[:, :, :3] = 1.0  # learn the left half only
    loss, grad = _loss_and_grad(inputs, target, mask)

    ignored_inputs, ignored_target = inputs.clone(), target.clone()
    ignored_inputs[:, :, :, 3:] += 5.0
    ignored_target[:, :, :, 3:] -= 7.0
    same_loss, same_grad = _loss_and_grad(ignored_inputs, ignored_target, mask)
    assert same_loss == pytest.approx(loss, rel=1e-6)
    torch.testing.assert_close(same_grad, grad)

    learned_target = target.clone()
    learned_target[:, :, :, :3] += 1.0
    other_loss, other_grad = _loss_and_grad(inputs, learned_target, mask)
    assert other_loss != pytest.approx(loss, rel=1e-3)
    assert not torch.allclose(other_grad, grad)


def test_grey_weights_every_channel_alike_and_the_mean_runs_over_all_elements() -> None:
    """SimpleTuner multiplies the element-wise loss by the mask, then takes the plain mean."""
    prediction = torch.ones(1, 4, 2, 2)
    target = torch.zeros(1, 4, 2, 2)
    mask = torch.tensor([[[1.0, 0.5], [0.0, 0.0]]])
    loss = flow.flow_matching_loss(prediction, target, flow.loss_mask_weights(mask, prediction))
    assert float(loss) == pytest.approx((1.0 + 0.5) * 4 / 16)
    # Cosmos2's latents have a frame axis: [B, C, 1, h, w]; the mask broadcasts over it too.
    weights = flow.loss_mask_weights(mask, torch.zeros(1, 16, 1, 2, 2))
    assert weights.shape == (1, 1, 1, 2, 2)
    with pytest.raises(ValueError, match="does not match latents"):
        flow.loss_mask_weights(torch.ones(1, 3, 3), prediction)


def test_the_training_step_applies_the_mask(tiny_cosmos_dir: Path) -> None:
    """On the tiny Cosmos2: an all-white mask is the unmasked loss, an all-black one trains nothing."""
    setup = make_setup(tiny_cosmos_dir)
    perturb(setup)
    grid = setup.latents.shape[-2:]

    def loss_of(mask: torch.Tensor | None, *, regularisation: bool = False) -> torch.Tensor:
        # A fresh batch each time: its per-sample generators then draw the same noise and sigmas.
        masked = replace(micro(setup, 0, 2), loss_mask=mask, is_regularisation=regularisation)
        return micro_batch_loss(setup.family, setup.transformer, setup.network, masked, SCHEDULE)

    plain = loss_of(None)
    white = loss_of(torch.ones(2, *grid))
    torch.testing.assert_close(white, plain)
    black = loss_of(torch.zeros(2, *grid))
    assert float(black.detach()) == 0.0
    black.backward()
    assert all(p.grad is None or not p.grad.any() for p in setup.parameters)
    half = torch.ones(2, *grid)
    half[:, :, grid[1] // 2 :] = 0.0
    assert 0.0 < float(loss_of(half).detach()) < float(plain.detach())
    # Regularisation batches share the loss function, mask included.
    assert float(loss_of(torch.zeros(2, *grid), regularisation=True).detach()) == 0.0
