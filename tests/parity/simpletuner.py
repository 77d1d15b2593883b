"""SimpleTuner's training math for Cosmos2 and OmniGen, written from its published formulas.

These are the formulas of bghira/SimpleTuner as read in its sources (facts, restated here in
plain PyTorch; no SimpleTuner code is imported or copied), so the parity tests can hold raytuner's
own code path against them:

* Cosmos2: ``simpletuner/helpers/models/cosmos/model.py`` — ``prepare_edm_sigmas`` (the sigma
  draw), ``prepare_batch`` (``x_t = x0 + sigma * noise``), ``_model_predict_single`` (the EDM
  preconditioning around the transformer) and ``loss`` (the EDM-weighted ``x0`` regression and
  its conditioning mask).
* OmniGen: ``simpletuner/helpers/models/omnigen/model.py`` — ``sample_flow_sigmas``,
  ``prepare_batch_conditions`` (``x_t = t * x0 + (1 - t) * noise``, ``timestep = t``),
  ``flow_matching_target_direction`` (-1) through ``simpletuner/helpers/models/common.py``
  ``flow_matching_target`` / ``get_flow_matching_target``, and ``loss`` (plain MSE).
* Regularisation data: ``simpletuner/helpers/training/trainer.py``
  ``_prepare_regularisation_parent_targets`` puts the base model's prediction (adapter off) in
  the batch's ``target``; OmniGen's loss uses it, Cosmos2's ``loss`` reads ``x0`` and ignores it.
* Masks: a ``mask`` conditioning image's first channel, in ``[-1, 1]``, area-resized to the
  loss's spatial size and mapped to ``m / 2 + 0.5`` (``common.py`` and Cosmos2's ``loss``).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from lycoris import LycorisNetwork

# Cosmos2's EDM constants (SimpleTuner's Cosmos2 model class attributes).
COSMOS_SIGMA_MIN = 0.002
COSMOS_SIGMA_MAX = 80.0
COSMOS_SIGMA_DATA = 1.0


@dataclass(frozen=True, kw_only=True)
class ReferenceStep:
    """What SimpleTuner hands the transformer and how it scores the answer."""

    model_input: torch.Tensor  # hidden_states given to the transformer
    timestep: torch.Tensor  # timestep given to the transformer, [B]
    prediction: torch.Tensor  # what the loss scores (Cosmos2: the x0 prediction; OmniGen: the raw output)
    target: torch.Tensor  # what the loss regresses (Cosmos2: x0; OmniGen: x0 - noise)
    per_sample_loss: torch.Tensor  # [B], the mean over each sample's elements


# ---- Cosmos2 ------------------------------------------------------------------------------------


def cosmos2_edm_sigmas(uniform: torch.Tensor) -> torch.Tensor:
    """``prepare_edm_sigmas``: ``log sigma = sqrt(2) * erfinv(2u - 1)`` (u clamped away from 0 and 1),
    then sigma clamped to ``[sigma_min, sigma_max]``."""
    eps = torch.finfo(uniform.dtype).eps
    u = uniform.clamp(eps, 1.0 - eps)
    sigmas = torch.exp(math.sqrt(2.0) * torch.erfinv(2.0 * u - 1.0))
    return sigmas.clamp(COSMOS_SIGMA_MIN, COSMOS_SIGMA_MAX)


def cosmos2_noise_fraction(edm_sigmas: torch.Tensor) -> torch.Tensor:
    """The timestep SimpleTuner passes to the transformer, ``sigma / (sigma + 1)``."""
    return edm_sigmas / (edm_sigmas + 1.0)


def cosmos2_edm_sigma_of(noise_fraction: torch.Tensor) -> torch.Tensor:
    """The EDM sigma whose timestep is ``noise_fraction`` (the inverse of the above)."""
    return noise_fraction / (1.0 - noise_fraction)


def cosmos2_edm_weight(edm_sigmas: torch.Tensor) -> torch.Tensor:
    """``loss``'s weight: ``(sigma**2 + sigma_data**2) / (sigma * sigma_data)**2``."""
    return (edm_sigmas**2 + COSMOS_SIGMA_DATA**2) / (edm_sigmas * COSMOS_SIGMA_DATA) ** 2


def _per_sample(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return values.reshape(values.shape[0], *([1] * (like.ndim - 1)))


def cosmos2_step(
    transformer: torch.nn.Module,
    x0: torch.Tensor,
    noise: torch.Tensor,
    edm_sigmas: torch.Tensor,
    prompt_embeds: torch.Tensor,
    *,
    mask_pixels: torch.Tensor | None = None,
    target_x0: torch.Tensor | None = None,
) -> ReferenceStep:
    """One SimpleTuner Cosmos2 training forward pass, in float32.

    ``mask_pixels`` is a ``[B, 1, H, W]`` mask in pixel values 0..255. ``target_x0`` stands in for
    ``x0`` as the regression target (what Cosmos2's loss would do if it read the batch's
    ``target``; SimpleTuner's does not).
    """
    sigma = _per_sample(edm_sigmas, x0)
    noisy = x0 + sigma * noise  # prepare_batch
    c_in = 1.0 / (sigma + 1.0)  # == c_skip
    c_out = -sigma * c_in
    model_input = noisy * c_in
    timestep = cosmos2_noise_fraction(edm_sigmas)
    _, _, _, height, width = noisy.shape
    raw = transformer(
        hidden_states=model_input,
        timestep=timestep,
        encoder_hidden_states=prompt_embeds,
        # SimpleTuner passes zeros of [B, 1, h, w] to its own copy of the transformer; diffusers'
        # CosmosTransformer3DModel repeats the mask over the batch itself, so it takes one row.
        # Zeros either way: the extra input channel is 0.
        padding_mask=torch.zeros(1, 1, height, width),
        return_dict=False,
    )[0]
    x0_prediction = c_in * noisy + c_out * raw.float()
    target = x0 if target_x0 is None else target_x0
    loss = F.mse_loss(x0_prediction, target, reduction="none") * _per_sample(
        cosmos2_edm_weight(edm_sigmas), x0
    )
    if mask_pixels is not None:
        loss = loss * _latent_mask(mask_pixels, loss.shape[-2:]).unsqueeze(2)  # over the frame axis
    return ReferenceStep(
        model_input=model_input,
        timestep=timestep,
        prediction=x0_prediction,
        target=target,
        per_sample_loss=loss.flatten(1).mean(dim=1),
    )


# ---- OmniGen ------------------------------------------------------------------------------------


def omnigen_data_fractions(normal: torch.Tensor) -> torch.Tensor:
    """``sample_flow_sigmas``: ``t = sigmoid(N(0, 1))``, the share of data in the noisy latents."""
    return torch.sigmoid(normal)


def omnigen_step(
    transformer: torch.nn.Module,
    x0: torch.Tensor,
    noise: torch.Tensor,
    data_fractions: torch.Tensor,
    model_inputs: dict[str, torch.Tensor],
    *,
    target: torch.Tensor | None = None,
) -> ReferenceStep:
    """One SimpleTuner OmniGen training forward pass, in float32 (``target``: the parent's
    prediction for regularisation data). ``model_inputs`` carries the text side (ids, attention
    mask, position ids), which both trainers build with OmniGen's processor."""
    t = _per_sample(data_fractions, x0)
    noisy = t * x0 + (1.0 - t) * noise
    prediction = transformer(
        hidden_states=noisy,
        timestep=data_fractions,
        input_ids=model_inputs["input_ids"],
        input_img_latents=[],
        input_image_sizes=model_inputs["input_image_sizes"],
        attention_mask=model_inputs["attention_mask"],
        position_ids=model_inputs["position_ids"],
        return_dict=False,
    )[0].float()
    if target is None:
        target = -1.0 * (noise - x0)  # flow_matching_target with direction -1
    loss = F.mse_loss(prediction, target, reduction="none")
    return ReferenceStep(
        model_input=noisy,
        timestep=data_fractions,
        prediction=prediction,
        target=target,
        per_sample_loss=loss.flatten(1).mean(dim=1),
    )


# ---- masks --------------------------------------------------------------------------------------


def _latent_mask(mask_pixels: torch.Tensor, size: torch.Size) -> torch.Tensor:
    """A ``[B, 1, H, W]`` 0..255 mask as SimpleTuner weights the loss: pixel values in [-1, 1],
    area-resized to the loss's size, then ``m / 2 + 0.5``."""
    values = mask_pixels.float() / 127.5 - 1.0
    resized = F.interpolate(values, size=tuple(size), mode="area")
    return resized / 2 + 0.5


def masked_mean(per_element_loss: torch.Tensor, mask_pixels: torch.Tensor) -> torch.Tensor:
    """Per-sample means of a ``[B, C, H, W]`` element-wise loss multiplied by the mask (the
    common loss's conditioning mask)."""
    return (per_element_loss * _latent_mask(mask_pixels, per_element_loss.shape[-2:])).flatten(1).mean(dim=1)


# ---- regularisation -----------------------------------------------------------------------------


@contextmanager
def parent_model(network: LycorisNetwork) -> Iterator[None]:
    """``_low_rank_adapter_disabled`` for LyCORIS: the multiplier at 0 for the parent's prediction,
    back to 1 afterwards."""
    network.set_multiplier(0.0)
    try:
        with torch.no_grad():
            yield
    finally:
        network.set_multiplier(1.0)
