"""Each family feeds its transformer exactly what the family's diffusers pipeline feeds it.

A forward hook records the transformer call the real pipeline makes on a tiny checkpoint; the
family's own encoders and ``predict`` must reproduce that call's output from the same latents.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from raytuner.data.synthetic import synthetic_images, to_pixels
from raytuner.models.base import ModelFamily
from raytuner.models.registry import UnknownModelFamilyError, get_family, known_families, register_family
from raytuner.models.safety import PassThroughSafetyChecker

PROMPT = "a red circle on a blue background"


def _family(name: str, folder: Path) -> ModelFamily:
    return get_family(name)(folder)


def _first_transformer_call(pipeline: Any, **call_kwargs: Any) -> tuple[dict[str, Any], torch.Tensor]:
    calls: list[tuple[dict[str, Any], torch.Tensor]] = []

    def record(module: torch.nn.Module, args: tuple, kwargs: dict[str, Any], output: Any) -> None:
        if not calls:
            calls.append(
                ({k: v.clone() if torch.is_tensor(v) else v for k, v in kwargs.items()}, output[0].clone())
            )

    handle = pipeline.transformer.register_forward_hook(record, with_kwargs=True)
    try:
        pipeline(prompt=PROMPT, height=64, width=64, num_inference_steps=2, output_type="np", **call_kwargs)
    finally:
        handle.remove()
    return calls[0]


def test_registry_lists_families_and_refuses_duplicates_and_unknowns() -> None:
    assert known_families() == ["cosmos2image", "omnigen"]
    with pytest.raises(
        UnknownModelFamilyError, match=r"unknown model_family 'cosmos3' \(known: cosmos2image, omnigen\)"
    ):
        get_family("cosmos3")
    with pytest.raises(ValueError, match="already registered"):
        register_family(get_family("omnigen"))


@pytest.mark.parametrize(
    ("name", "flavour", "expected"),
    [
        ("cosmos2image", None, "nvidia/Cosmos-Predict2-2B-Text2Image"),
        ("cosmos2image", "14b", "nvidia/Cosmos-Predict2-14B-Text2Image"),
        ("omnigen", "v1", "Shitao/OmniGen-v1-diffusers"),
    ],
)
def test_flavours_map_to_hub_ids_and_a_local_path_wins(name: str, flavour: str | None, expected: str) -> None:
    family = get_family(name)
    assert family.resolve_model_path(flavour, None) == expected
    assert family.resolve_model_path(flavour, "/models/local") == "/models/local"
    with pytest.raises(ValueError, match="not a flavour"):
        family.resolve_model_path("xl", None)


def test_cosmos_prompt_encoding_and_transformer_call_match_the_pipeline(tiny_cosmos_dir: Path) -> None:
    family = _family("cosmos2image", tiny_cosmos_dir)
    pipeline = family.build_pipeline(safety_checker=PassThroughSafetyChecker())
    call, output = _first_transformer_call(
        pipeline, guidance_scale=3.0, generator=torch.Generator().manual_seed(0)
    )

    conditioning = family.collate_conditioning(family.encode_prompts([PROMPT]))
    # The cache keeps T5 states unpadded; collated, they equal the pipeline's padded prompt_embeds bit for bit.
    assert torch.equal(conditioning["prompt_embeds"], call["encoder_hidden_states"][:1].float())

    flow_sigma = call["timestep"][:1].float()  # the pipeline passes t = sigma / (sigma + 1)
    prediction = family.predict(
        pipeline.transformer, call["hidden_states"][:1].float(), flow_sigma, conditioning
    )
    assert torch.equal(prediction, output[:1].float())


def test_omnigen_prompt_ids_and_transformer_call_match_the_pipeline(tiny_omnigen_dir: Path) -> None:
    family = _family("omnigen", tiny_omnigen_dir)
    pipeline = family.build_pipeline()
    call, output = _first_transformer_call(
        pipeline, guidance_scale=2.0, generator=torch.Generator().manual_seed(0)
    )

    conditioning = family.collate_conditioning(family.encode_prompts([PROMPT]))
    ids = conditioning["input_ids"][0]
    # Row 0 of the pipeline batch is the prompt, left-padded against the negative prompt's row.
    assert call["input_ids"][0, -len(ids) :].tolist() == ids

    timestep = call["timestep"][:1].float()  # OmniGen integrates from noise at t=0 to data at t=1
    prediction = family.predict(
        pipeline.transformer, call["hidden_states"][:1].float(), 1.0 - timestep, conditioning
    )
    # Padding differs (the pipeline pads against the negative prompt) but is masked out.
    torch.testing.assert_close(prediction, output[:1].float(), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", ["cosmos2image", "omnigen"])
def test_encode_images_round_trips_through_the_pipeline_decoder(
    name: str, tiny_checkpoints: dict[str, Path]
) -> None:
    family = _family(name, tiny_checkpoints[name])
    pixels = to_pixels([item.image for item in synthetic_images(2, width=64, height=64)])
    latents = family.encode_images(pixels)
    assert latents.dtype == torch.float32
    assert latents.shape[-2:] == (8, 8)
    assert family.image_seq_len(latents) == 16  # 8x8 latents, 2x2 patches
    # Decoding the latents with the pipeline's own de-normalisation gives an image of the right size.
    pipeline = family.build_pipeline(
        **({"safety_checker": PassThroughSafetyChecker()} if name == "cosmos2image" else {})
    )
    if name == "cosmos2image":
        vae = pipeline.vae
        mean = torch.tensor(vae.config.latents_mean).view(1, -1, 1, 1, 1)
        std = torch.tensor(vae.config.latents_std).view(1, -1, 1, 1, 1)
        decoded = vae.decode(latents * std + mean).sample[:, :, 0]
    else:
        decoded = pipeline.vae.decode(latents / pipeline.vae.config.scaling_factor).sample
    assert decoded.shape == pixels.shape


def test_training_timesteps_follow_each_pipeline_convention(tiny_checkpoints: dict[str, Path]) -> None:
    from raytuner import flow

    cosmos = _family("cosmos2image", tiny_checkpoints["cosmos2image"])
    omnigen = _family("omnigen", tiny_checkpoints["omnigen"])
    sigmas = torch.tensor([0.1, 0.9])
    assert torch.equal(cosmos.timesteps_from_sigmas(sigmas), sigmas)
    assert torch.allclose(omnigen.timesteps_from_sigmas(sigmas), torch.tensor([0.9, 0.1]))
    assert cosmos.target_direction == 1.0 and omnigen.target_direction == -1.0

    latents = torch.zeros(4096, 16, 1, 8, 8)
    drawn = cosmos.sample_sigmas(
        latents, flow.FlowSchedule(shift=3.0), generator=torch.Generator().manual_seed(0)
    )
    # Never outside the range the Cosmos pipeline evaluates: EDM sigma in [0.002, 80].
    assert drawn.min() >= 0.002 / 1.002 and drawn.max() <= 80 / 81
    # OmniGen ignores any shift: its own sigmoid(N(0, 1)) scheme.
    omnigen_latents = torch.zeros(4096, 4, 8, 8)
    plain = omnigen.sample_sigmas(
        omnigen_latents, flow.FlowSchedule(), generator=torch.Generator().manual_seed(0)
    )
    shifted = omnigen.sample_sigmas(
        omnigen_latents,
        flow.FlowSchedule(shift=5.0, auto_shift=True),
        generator=torch.Generator().manual_seed(0),
    )
    assert torch.equal(plain, shifted)


@pytest.mark.parametrize("name", ["cosmos2image", "omnigen"])
def test_family_flavours_agree_with_simpletuner_surface(name: str) -> None:
    from raytuner.config.surface import flavours

    surface = {flavour.name: flavour.hub_id for flavour in flavours(name)}
    family = get_family(name)
    assert surface == dict(family.flavours)
    assert next(f.name for f in flavours(name) if f.default) == family.default_flavour


def test_pipeline_components_follow_the_safety_policy(tiny_checkpoints: dict[str, Path]) -> None:
    from raytuner.models.safety import is_guardrail_installed

    cosmos = _family("cosmos2image", tiny_checkpoints["cosmos2image"])
    omnigen = _family("omnigen", tiny_checkpoints["omnigen"])
    assert omnigen.pipeline_components(allow_unscreened=False) == {}
    if not is_guardrail_installed():
        assert isinstance(
            cosmos.pipeline_components(allow_unscreened=True)["safety_checker"], PassThroughSafetyChecker
        )
        with pytest.raises(RuntimeError, match="cosmos_guardrail"):
            cosmos.pipeline_components(allow_unscreened=False)
