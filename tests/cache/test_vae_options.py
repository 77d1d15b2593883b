"""vae_enable_slicing / vae_enable_tiling reach the cache build's VAE encoder actors."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch

from raytuner.cache.stages import VaeEncoder
from raytuner.config.training import DataSection
from raytuner.data.synthetic import synthetic_images, to_pixels
from raytuner.models.registry import get_family


def _data(tmp_path: Path, *, slicing: bool, tiling: bool) -> DataSection:
    return DataSection(
        data_backend_config=tmp_path / "multidatabackend.json",
        vae_enable_slicing=slicing,
        vae_enable_tiling=tiling,
    )


@pytest.mark.parametrize("name", ["cosmos2image", "omnigen"])
def test_the_vae_encoder_enables_slicing_and_tiling_and_encodes_the_same_latents(
    name: str, tiny_checkpoints: dict[str, Path], tmp_path: Path
) -> None:
    encoder = VaeEncoder(
        name, str(tiny_checkpoints[name]), None, {}, _data(tmp_path, slicing=True, tiling=True)
    )
    vae = encoder.family.load_vae()
    assert (vae.use_slicing, vae.use_tiling) == (True, True)
    plain = get_family(name)(tiny_checkpoints[name])
    assert (plain.load_vae().use_slicing, plain.load_vae().use_tiling) == (False, False)
    pixels = to_pixels([item.image for item in synthetic_images(3, width=64, height=64)])
    # Slicing encodes one image per VAE pass: the same latents as the batch encoded whole.
    torch.testing.assert_close(
        encoder.family.encode_images(pixels), plain.encode_images(pixels), atol=1e-4, rtol=1e-4
    )


def test_a_vae_without_tiling_is_named_in_one_warning(
    tiny_checkpoints: dict[str, Path], caplog: pytest.LogCaptureFixture
) -> None:
    family = get_family("omnigen")(tiny_checkpoints["omnigen"])
    vae = family.load_vae()
    del vae.use_tiling  # as a diffusers VAE class without tiling has no such flag
    with caplog.at_level(logging.WARNING, logger="raytuner.models.base"):
        family.apply_vae_options(slicing=True, tiling=True)
        family.apply_vae_options(slicing=True, tiling=True)
    warnings = [record.getMessage() for record in caplog.records]
    assert warnings == [
        "vae_enable_tiling: AutoencoderKL (OmniGen) has no VAE tiling; images are encoded without it"
    ]
    assert vae.use_slicing
