"""Validation images from cached conditioning, through each family's real pipeline on the tiny checkpoints.

The prompts are encoded the way the cache step encodes them (``family.encode_prompts``, or a
real text cache written by the cache step's own stages); the validation side never has a text
encoder: the Cosmos2 renders even come from a copy of the checkpoint without one.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch
from PIL import Image

from raytuner.adapters import build_adapter
from raytuner.batches.reader import TextCache
from raytuner.cache import format as fmt
from raytuner.cache import stages
from raytuner.cache.format import CacheError
from raytuner.cache.settings import encoder_identities, model_path_of, text_cache_location
from raytuner.cache.text import TextWork
from raytuner.config import LycorisConfig, RunConfig, load_config
from raytuner.config.prompt_library import builtin_prompt_library
from raytuner.evaluate.validation import (
    ValidationPrompt,
    ValidationSettings,
    parse_validation_resolutions,
    render_validation,
    validation_prompts,
    validation_settings,
)
from raytuner.models.base import ModelFamily
from raytuner.models.omnigen import default_negative_prompt
from raytuner.models.registry import get_family
from raytuner.models.safety import PassThroughSafetyChecker
from tests.cache.helpers import draw_images, image_dataset, text_dataset, write_run_files

pytestmark = pytest.mark.slow  # renders the tiny pipelines: seconds a test

FAMILIES = ("cosmos2image", "omnigen")
CONFIGS = Path(__file__).resolve().parents[2] / "configs"
PROMPT = "a red circle on a blue background"
NEGATIVE = "blurry, cropped, ugly"
SIZES = ((32, 32), (64, 32))
STEPS = 3
SEED = 5


def _family(name: str, folder: Path) -> ModelFamily:
    return get_family(name)(folder)


def _settings(negative: dict[str, torch.Tensor] | None, **overrides: object) -> ValidationSettings:
    values: dict[str, object] = {
        "resolutions": SIZES,
        "num_inference_steps": STEPS,
        "guidance": 3.0,
        "seed": SEED,
        "negative": negative,
        "negative_prompt": NEGATIVE,
    }
    values.update(overrides)
    return ValidationSettings(**values)  # type: ignore[arg-type]


def _pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB"))


def _without_text_encoder(folder: Path, tmp_path: Path) -> Path:
    """A copy of a Cosmos2 checkpoint with no text_encoder or tokenizer folder at all."""
    copy = tmp_path / "no-text-encoder"
    shutil.copytree(folder, copy, ignore=shutil.ignore_patterns("text_encoder", "tokenizer"))
    return copy


# ---- validation_resolution ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("1024x768", [(1024, 768)]),
        ("256", [(256, 256)]),
        ("64,96,64x96,96x64", [(64, 64), (96, 96), (64, 96), (96, 64)]),
        (" 512X512 , 768 ", [(512, 512), (768, 768)]),
        # Rounded to the nearest multiple of 16 (Python's round), at least 16, as SimpleTuner does.
        ("1000x1010", [(992, 1008)]),
        ("8x40,8x56", [(16, 32), (16, 64)]),  # 2.5 -> 2, 3.5 -> 4
    ],
)
def test_validation_resolutions_read_simpletuner_forms(value: str, expected: list[tuple[int, int]]) -> None:
    assert parse_validation_resolutions(value) == expected


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        ("", "empty"),
        ("64", "megapixels"),
        ("0.5", "megapixels"),
        ("512.0", "'512.0' is not a size"),
        ("square", "'square' is not a size"),
        ("64x", "'64x' is not a size"),
        ("64x64x64", "'64x64x64' is not a size"),
        ("64x64,", "'' is not a size"),
        ("-64x64", "'-64x64' is not a size"),
        ("0x64", "zero edge"),
    ],
)
def test_validation_resolutions_refuse_what_raytuner_does_not_read(value: str, reason: str) -> None:
    with pytest.raises(ValueError) as error:
        parse_validation_resolutions(value)
    message = str(error.value)
    assert "\n" not in message
    assert message.startswith(f"validation_resolution {value!r}: ")
    assert reason in message
    assert "'WxH' or 'N' (NxN)" in message


# ---- rendering ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", FAMILIES)
def test_both_families_render_pngs_of_the_requested_sizes(
    name: str, tiny_checkpoints: dict[str, Path], tmp_path: Path
) -> None:
    family = _family(name, tiny_checkpoints[name])
    prompt, empty, negative = family.encode_prompts([PROMPT, "", NEGATIVE])
    prompts = [
        ValidationPrompt(nickname="unconditional", prompt="", conditioning=empty),
        ValidationPrompt(nickname="validation", prompt=PROMPT, conditioning=prompt),
    ]
    transformer = family.load_transformer()

    images = render_validation(
        family, transformer, prompts, _settings(negative), out_dir=tmp_path / "ema", label="ema"
    )
    assert [image.path.name for image in images] == [
        "unconditional-32x32-ema.png",
        "unconditional-64x32-ema.png",
        "validation-32x32-ema.png",
        "validation-64x32-ema.png",
    ]
    for image in images:
        assert image.path.parent == tmp_path / "ema"
        with Image.open(image.path) as png:
            assert png.format == "PNG"
            assert png.size == (image.width, image.height) == image.image.size
            assert np.array_equal(_pixels(png), _pixels(image.image))
    plain = render_validation(family, transformer, prompts[1:], _settings(negative), out_dir=tmp_path)
    assert [image.path.name for image in plain] == ["validation-32x32.png", "validation-64x32.png"]


@pytest.mark.parametrize("guidance", [3.0, 1.0], ids=["guided", "unguided"])
def test_cosmos_image_from_cached_embeds_equals_the_pipeline_with_its_text_encoder(
    guidance: float, tiny_cosmos_dir: Path, tmp_path: Path
) -> None:
    encoder_side = _family("cosmos2image", tiny_cosmos_dir)
    prompt, negative = encoder_side.encode_prompts([PROMPT, NEGATIVE])  # what the cache step stores
    transformer = encoder_side.load_transformer()
    reference = encoder_side.build_pipeline(transformer, safety_checker=PassThroughSafetyChecker())
    expected = reference(
        prompt=PROMPT,
        negative_prompt=NEGATIVE,
        width=64,
        height=32,
        num_inference_steps=STEPS,
        guidance_scale=guidance,
        generator=torch.Generator().manual_seed(SEED),
    ).images[0]

    validator = _family("cosmos2image", _without_text_encoder(tiny_cosmos_dir, tmp_path))
    pipeline = validator.build_validation_pipeline(transformer)
    assert pipeline.text_encoder is None and pipeline.tokenizer is None
    images = render_validation(
        validator,
        transformer,
        [ValidationPrompt(nickname="validation", prompt=PROMPT, conditioning=prompt)],
        _settings(negative, resolutions=[(64, 32)], guidance=guidance),
        out_dir=tmp_path / "out",
        pipeline=pipeline,
    )
    # Bit for bit: the cached, re-padded T5 states are exactly what the pipeline computes itself.
    assert np.array_equal(_pixels(images[0].image), _pixels(expected))


def test_omnigen_image_from_cached_ids_equals_the_pipeline_from_text(tiny_omnigen_dir: Path) -> None:
    family = _family("omnigen", tiny_omnigen_dir)
    prompt, default_negative, negative = family.encode_prompts([PROMPT, default_negative_prompt(), NEGATIVE])
    transformer = family.load_transformer()
    size = {"width": 64, "height": 32, "num_inference_steps": STEPS, "guidance_scale": 3.0}
    expected = family.build_pipeline(transformer)(
        prompt=PROMPT, generator=torch.Generator().manual_seed(SEED), **size
    ).images[0]

    pipeline = family.build_validation_pipeline(transformer)

    def render(negative_conditioning: dict[str, torch.Tensor] | None) -> np.ndarray:
        image = family.generate_image(
            pipeline,
            PROMPT,
            prompt,
            negative_conditioning,
            generator=torch.Generator().manual_seed(SEED),
            **size,
        )
        return _pixels(image)

    # The pipeline's own negative prompt, from the cache or left to the family: the pipeline's image.
    assert np.array_equal(render(default_negative), _pixels(expected))
    assert np.array_equal(render(None), _pixels(expected))
    # The run's validation_negative_prompt, cached, is the one used.
    assert not np.array_equal(render(negative), _pixels(expected))
    # The pipeline's own processor is back in place for anyone calling it with text.
    assert type(pipeline.multimodal_processor).__name__ == "OmniGenMultiModalProcessor"


@pytest.mark.parametrize("name", FAMILIES)
def test_without_classifier_free_guidance_the_scale_and_negative_do_not_matter(
    name: str, tiny_checkpoints: dict[str, Path], tmp_path: Path
) -> None:
    family = _family(name, tiny_checkpoints[name])
    prompt, negative = family.encode_prompts([PROMPT, NEGATIVE])
    transformer = family.load_transformer()
    pipeline = family.build_validation_pipeline(transformer)
    prompts = [ValidationPrompt(nickname="validation", prompt=PROMPT, conditioning=prompt)]

    def render(guidance: float, negative_conditioning: dict[str, torch.Tensor] | None) -> np.ndarray:
        settings = _settings(
            negative_conditioning, guidance=guidance, disable_cfg=True, resolutions=[(32, 32)]
        )
        images = render_validation(
            family, transformer, prompts, settings, out_dir=tmp_path / str(guidance), pipeline=pipeline
        )
        return _pixels(images[0].image)

    unguided = render(1.0, None)
    assert np.array_equal(render(6.0, negative), unguided)
    guided = render_validation(
        family,
        transformer,
        prompts,
        _settings(negative, guidance=6.0, resolutions=[(32, 32)]),
        out_dir=tmp_path,
    )
    assert not np.array_equal(_pixels(guided[0].image), unguided)


def test_cosmos_guidance_without_the_negative_conditioning_is_refused(
    tiny_cosmos_dir: Path, tmp_path: Path
) -> None:
    family = _family("cosmos2image", tiny_cosmos_dir)
    (prompt,) = family.encode_prompts([PROMPT])
    prompts = [ValidationPrompt(nickname="validation", prompt=PROMPT, conditioning=prompt)]
    with pytest.raises(ValueError, match="needs the negative prompt's cached conditioning"):
        render_validation(family, family.load_transformer(), prompts, _settings(None), out_dir=tmp_path)


def _seed_lycoris_config(name: str) -> LycorisConfig:
    spec = load_config(CONFIGS / name / "config.json").lycoris
    assert spec is not None
    return spec


@pytest.mark.parametrize("name", FAMILIES)
def test_renders_of_the_adapted_transformer_repeat_exactly_and_leave_it_as_found(
    name: str, tiny_checkpoints: dict[str, Path], tmp_path: Path
) -> None:
    family = _family(name, tiny_checkpoints[name])
    prompt, negative = family.encode_prompts([PROMPT, NEGATIVE])
    prompts = [ValidationPrompt(nickname="validation", prompt=PROMPT, conditioning=prompt)]
    settings = _settings(negative)
    base = render_validation(family, family.load_transformer(), prompts, settings, out_dir=tmp_path / "base")

    transformer = family.load_transformer()
    network, _ = build_adapter(
        transformer, _seed_lycoris_config(name), module_aliases=family.module_aliases, seed=0
    )
    with torch.no_grad():  # LoKr starts as a no-op; give it weights that change the image
        generator = torch.Generator().manual_seed(1)
        for parameter in network.parameters():
            parameter.add_(torch.randn(parameter.shape, generator=generator) * 0.5)
    # Mid-training state, with one block deliberately left in eval mode and one adapter weight frozen.
    transformer.train()
    network.train()
    next(iter(transformer.children())).eval()
    frozen = next(iter(network.parameters()))
    frozen.requires_grad_(False)
    modes = {
        name: module.training for name, module in [*transformer.named_modules(), *network.named_modules()]
    }
    grads = {id(p): p.requires_grad for p in [*transformer.parameters(), *network.parameters()]}

    seen_training: list[bool] = []
    hook = transformer.register_forward_pre_hook(lambda module, args: seen_training.append(module.training))
    try:
        first = render_validation(
            family, transformer, prompts, settings, out_dir=tmp_path / "first", adapter=network
        )
        second = render_validation(  # a second pipeline: nothing carries over between builds
            family, transformer, prompts, settings, out_dir=tmp_path / "second", adapter=network
        )
    finally:
        hook.remove()

    assert seen_training and not any(seen_training)  # rendered in eval mode
    assert modes == {
        name: module.training for name, module in [*transformer.named_modules(), *network.named_modules()]
    }
    assert grads == {id(p): p.requires_grad for p in [*transformer.parameters(), *network.parameters()]}
    assert all(p.grad is None for p in network.parameters())  # rendered under no_grad
    for one, two, plain in zip(first, second, base, strict=True):
        assert np.array_equal(_pixels(one.image), _pixels(two.image))
        with Image.open(one.path) as a, Image.open(two.path) as b:
            assert np.array_equal(_pixels(a), _pixels(b))
        assert not np.array_equal(_pixels(one.image), _pixels(plain.image))  # the adapter is in the image


@pytest.mark.parametrize("name", FAMILIES)
def test_a_bfloat16_base_renders_under_training_autocast(
    name: str, tiny_checkpoints: dict[str, Path], tmp_path: Path
) -> None:
    prompt, negative = _family(name, tiny_checkpoints[name]).encode_prompts([PROMPT, NEGATIVE])
    family = get_family(name)(tiny_checkpoints[name], dtype=torch.bfloat16)
    transformer = family.load_transformer()
    # mixed_precision bf16 as training runs it: a bfloat16 base, LoKr weights in float32.
    network, _ = build_adapter(
        transformer, _seed_lycoris_config(name), module_aliases=family.module_aliases, seed=0
    )
    network.to(torch.float32)
    images = render_validation(
        family,
        transformer,
        [ValidationPrompt(nickname="validation", prompt=PROMPT, conditioning=prompt)],
        _settings(negative, resolutions=[(32, 32)], mixed_precision="bf16"),
        out_dir=tmp_path,
        adapter=network,
    )
    assert images[0].image.size == (32, 32)
    assert _pixels(images[0].image).std() > 0


def test_a_pipeline_around_another_transformer_is_refused(tiny_omnigen_dir: Path, tmp_path: Path) -> None:
    family = _family("omnigen", tiny_omnigen_dir)
    (prompt,) = family.encode_prompts([PROMPT])
    pipeline = family.build_validation_pipeline(family.load_transformer())
    with pytest.raises(ValueError, match="another transformer"):
        render_validation(
            family,
            family.load_transformer(),
            [ValidationPrompt(nickname="validation", prompt=PROMPT, conditioning=prompt)],
            _settings(None),
            out_dir=tmp_path,
            pipeline=pipeline,
        )


# ---- prompts and settings from the text cache ----------------------------------------------------------


def _run_files(root: Path, model: Path, **config: object) -> RunConfig:
    draw_images(root / "images", [(64, 64)])
    library = root / "prompt_library.json"
    if not library.exists():
        library.write_text(
            json.dumps({"cat": "A photo of a red cat sitting on a wooden table.", "dog/run": "sks dog"})
        )
    keys: dict[str, object] = {
        "user_prompt_library": str(library),
        "validation_resolution": "32x32,64x32",
        "validation_seed": 42,
        "validation_num_inference_steps": STEPS,
        "validation_guidance": 4.0,
        "validation_negative_prompt": NEGATIVE,
    }
    keys.update(config)
    datasets = [image_dataset(root / "images", root / "vae-cache"), text_dataset(root / "text-cache")]
    files = write_run_files(root, model, datasets, **keys)
    return files.load()


def _build_text_cache(run: RunConfig) -> TextCache:
    """The cache step's text side without Ray: its own work list, encoder actor, shard writer and commit."""
    family_cls = get_family(run.training.model.model_family)
    model_path = model_path_of(run)
    _, identity = encoder_identities(run, family_cls(model_path))
    work = TextWork.open(run, identity, [])
    columns = stages.TextEncoder(family_cls.name, model_path, None, 1)(
        {"key": [row["key"] for row in work.todo], "prompt": [row["prompt"] for row in work.todo]}
    )
    written = stages.write_text_shards(
        pa.Table.from_pydict(columns),
        cache=work.folder,
        schema=fmt.text_schema(family_cls.prompt_tensors),
        encoder_key_=identity.key,
        build_id=fmt.new_build_id(),
    ).to_pylist()[0]
    work.written = {row["key"]: row for row in fmt.shard_locations(written["keys"], written["shard"])}
    work.commit(family_cls)
    return TextCache(text_cache_location(run))


def test_validation_prompts_and_settings_come_from_the_text_cache(
    tiny_cosmos_dir: Path, tmp_path: Path
) -> None:
    run = _run_files(tmp_path, tiny_cosmos_dir)
    # The cache step's own text work list, for a run that also renders the built-in library.
    with_library = _run_files(tmp_path, tiny_cosmos_dir, validation_prompt_library=True)
    text = _build_text_cache(with_library)
    family = _family("cosmos2image", tiny_cosmos_dir)

    prompts = validation_prompts(run, text)
    library = ["A photo of a red cat sitting on a wooden table.", "sks dog"]
    # SimpleTuner's order: unconditional, the prompt library, then validation_prompt.
    assert [(p.nickname, p.prompt) for p in prompts] == [
        ("unconditional", ""),
        ("cat", library[0]),
        ("dog/run", library[1]),
        ("validation", PROMPT),
    ]
    expected = family.encode_prompts(["", *library, PROMPT])
    for item, encoded in zip(prompts, expected, strict=True):
        assert torch.equal(item.conditioning["prompt_embeds"], encoded["prompt_embeds"])

    settings = validation_settings(run, text, family)
    assert settings.resolutions == [(32, 32), (64, 32)]
    assert (settings.num_inference_steps, settings.guidance, settings.seed) == (STEPS, 4.0, 42)
    assert settings.negative_prompt == NEGATIVE
    assert settings.negative is not None
    assert torch.equal(
        settings.negative["prompt_embeds"], family.encode_prompts([NEGATIVE])[0]["prompt_embeds"]
    )

    images = render_validation(
        family, family.load_transformer(), prompts, settings, out_dir=tmp_path / "validation"
    )
    assert [image.path.name for image in images][:2] == ["unconditional-32x32.png", "unconditional-64x32.png"]
    assert {image.path.name for image in images} >= {"dog_run-64x32.png", "validation-32x32.png"}

    # The built-in library: before the user's, encoded into the text cache with it.
    builtin = builtin_prompt_library()
    prompts = validation_prompts(with_library, text)
    assert [p.nickname for p in prompts] == ["unconditional", *builtin, "cat", "dog/run", "validation"]
    assert [p.prompt for p in prompts[1 : len(builtin) + 1]] == list(builtin.values())
    encoded = family.encode_prompts(list(builtin.values())[:2])
    for item, expected_item in zip(prompts[1:3], encoded, strict=True):
        assert torch.equal(item.conditioning["prompt_embeds"], expected_item["prompt_embeds"])

    without_unconditional = _run_files(tmp_path, tiny_cosmos_dir, validation_disable_unconditional=True)
    assert [p.nickname for p in validation_prompts(without_unconditional, text)] == [
        "cat",
        "dog/run",
        "validation",
    ]


def test_a_validation_prompt_changed_since_the_cache_was_built_is_refused(
    tiny_omnigen_dir: Path, tmp_path: Path
) -> None:
    run = _run_files(tmp_path, tiny_omnigen_dir, model_family="omnigen")
    text = _build_text_cache(run)
    assert [p.nickname for p in validation_prompts(run, text)][-1] == "validation"
    changed = _run_files(
        tmp_path, tiny_omnigen_dir, model_family="omnigen", validation_prompt="a green square"
    )
    with pytest.raises(
        CacheError, match=r"'validation' validation prompt is not in the text cache.*raytuner cache"
    ):
        validation_prompts(changed, text)
    negative_changed = _run_files(
        tmp_path, tiny_omnigen_dir, model_family="omnigen", validation_negative_prompt="low quality"
    )
    with pytest.raises(CacheError, match="'negative' validation prompt"):
        validation_settings(negative_changed, text, get_family("omnigen"))
