"""Validation images rendered during training from the text cache, never from a text encoder.

Every validation prompt (``validation_prompt``, the ``user_prompt_library`` entries, the empty
prompt and the negative prompt) was encoded once by the cache step; training workers render them
through each family's real diffusers pipeline around the adapted transformer being trained, at
every ``validation_resolution``, as SimpleTuner does:

* the prompts are ``unconditional`` (the empty prompt, unless ``validation_disable_unconditional``),
  the prompt library entries, then ``validation`` (``prepare_validation_prompt_list``);
* each (prompt, resolution) image starts from a fresh CPU generator seeded with
  ``validation_seed or seed``, so the same weights always give the same pixels, on any device;
* sizes are rounded to the nearest multiple of 16 pixels (at least 16).
"""

from __future__ import annotations

import contextlib
import logging
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from PIL import Image

from raytuner.batches.reader import TextCache
from raytuner.cache.format import CacheError
from raytuner.cache.keys import caption_key
from raytuner.cache.settings import role_prompts
from raytuner.config.run import RunConfig
from raytuner.models.base import ModelFamily, PromptConditioning
from raytuner.precision import autocast

if TYPE_CHECKING:  # the pre-flight check imports this module and must not wait for diffusers
    from diffusers.pipelines.pipeline_utils import DiffusionPipeline

logger = logging.getLogger(__name__)

PRIMARY_NICKNAME = "validation"
UNCONDITIONAL_NICKNAME = "unconditional"
# SimpleTuner reads a lone number below this as megapixels (cmd_args.py), with odd results
# (0.5 -> 0 px, 2 -> 2000 px); raytuner refuses it rather than guess.
MEGAPIXEL_BELOW = 128
_ACCEPTED_FORMS = "accepted: 'WxH' or 'N' (NxN) in pixels, comma-separated, e.g. '1024x1024,1216x832'"
_UNSAFE_FILENAME = re.compile(r"[^A-Za-z0-9._-]+")


# ---- settings ----------------------------------------------------------------------------------------


def parse_validation_resolutions(value: str, *, multiple: int = 16) -> list[tuple[int, int]]:
    """SimpleTuner's ``validation_resolution``: ``WxH`` or ``N`` sizes, comma-separated, as (W, H).

    Each edge is rounded to the nearest multiple of ``multiple`` (at least ``multiple``), as
    SimpleTuner rounds its validation sizes to 16; pass the family's ``pixels_per_token``.
    """
    text = str(value).strip()

    def refuse(reason: str) -> ValueError:
        return ValueError(f"validation_resolution {value!r}: {reason}; {_ACCEPTED_FORMS}")

    if not text:
        raise refuse("empty")
    if "," not in text and "x" not in text.lower():
        try:
            number = float(text)
        except ValueError:
            number = None
        if number is not None and number < MEGAPIXEL_BELOW:
            raise refuse(
                f"a lone number below {MEGAPIXEL_BELOW} is megapixels to SimpleTuner, which raytuner does not read"
            )
    sizes = []
    for piece in text.split(","):
        edges = piece.strip().lower().split("x")
        if len(edges) > 2 or not all(edge.strip().isdigit() for edge in edges):
            raise refuse(f"{piece.strip()!r} is not a size")
        width, height = (int(edge) for edge in (edges * 2)[:2])
        if width == 0 or height == 0:
            raise refuse(f"{piece.strip()!r} has a zero edge")
        rounded = (_round_to_multiple(width, multiple), _round_to_multiple(height, multiple))
        if rounded != (width, height):
            logger.info(
                "validation_resolution %dx%d rounded to %dx%d (a multiple of %d pixels)",
                width,
                height,
                *rounded,
                multiple,
            )
        sizes.append(rounded)
    return sizes


def _round_to_multiple(value: int, multiple: int) -> int:
    # SimpleTuner's MultiaspectImage._round_to_nearest_multiple (Python's round: halves to even).
    return max(round(value / multiple) * multiple, multiple)


@dataclass(frozen=True, kw_only=True)
class ValidationPrompt:
    """A prompt to render: its nickname (the file name), its text and its cached conditioning."""

    nickname: str
    prompt: str
    conditioning: PromptConditioning


@dataclass(frozen=True, kw_only=True)
class ValidationSettings:
    """How validation images are rendered (the ``validation_*`` keys, resolved)."""

    resolutions: Sequence[tuple[int, int]]  # (width, height)
    num_inference_steps: int
    guidance: float
    seed: int
    # None: the family's own default (OmniGen's fixed negative prompt; Cosmos2 then renders only
    # without guidance, as its default would need the text encoder).
    negative: PromptConditioning | None
    negative_prompt: str = ""
    disable_cfg: bool = False
    mixed_precision: str = "no"  # "bf16": rendered under bf16 autocast, as training runs


@dataclass(frozen=True, kw_only=True)
class ValidationImage:
    """One rendered image and the PNG it was written to."""

    nickname: str
    prompt: str
    width: int
    height: int
    label: str
    path: Path
    image: Image.Image


def validation_prompts(
    run: RunConfig, text: TextCache, *, texts: Mapping[str, str] | None = None
) -> list[ValidationPrompt]:
    """The run's validation prompts with their cached conditioning, in SimpleTuner's order.

    The texts come from the config exactly as the cache step took them (``role_prompts``), or
    from ``texts`` (nickname -> prompt) where the driver read them: a worker on another node may
    not see the prompt library file. A prompt changed since the text cache was built is refused
    with the command that fixes it.
    """
    if texts is None:
        texts = role_prompts(run)["validation"]
    cached = text.validation_keys()
    entries: list[tuple[str, str, str]] = []
    if not run.training.validation.validation_disable_unconditional:
        entries.append((UNCONDITIONAL_NICKNAME, "", _checked_key(text, "empty", text.role_key("empty"), "")))
    # SimpleTuner: the prompt library first, then validation_prompt.
    order = [name for name in texts if name != PRIMARY_NICKNAME] + [
        name for name in texts if name == PRIMARY_NICKNAME
    ]
    for nickname in order:
        prompt = texts[nickname]
        entries.append((nickname, prompt, _checked_key(text, nickname, cached.get(nickname), prompt)))
    conditioning = text.conditioning([key for _, _, key in entries])
    return [
        ValidationPrompt(nickname=nickname, prompt=prompt, conditioning=item)
        for (nickname, prompt, _), item in zip(entries, conditioning, strict=True)
    ]


def _checked_key(text: TextCache, name: str, cached: str | None, prompt: str) -> str:
    """The prompt's caption key, when it is the one the text cache recorded for the role."""
    key = caption_key(prompt)
    if cached != key:
        raise CacheError(
            f"{text.folder}: the {name!r} validation prompt is not in the text cache as configured "
            "(changed since the cache was built); run `raytuner cache --config config.json` again"
        )
    return key


def validation_settings(
    run: RunConfig, text: TextCache, family: type[ModelFamily] | ModelFamily
) -> ValidationSettings:
    """The run's validation settings, the negative prompt's conditioning read from the text cache.

    OmniGen renders with ``validation_negative_prompt`` too, where SimpleTuner leaves its
    pipeline's fixed negative prompt; replace ``negative`` with None for that one.
    """
    training = run.training
    if training.validation.validation_guidance_rescale:
        logger.warning(
            "validation_guidance_rescale=%s is ignored: the %s diffusers pipeline takes no guidance_rescale argument",
            training.validation.validation_guidance_rescale,
            family.name,
        )
    negative_prompt = (
        training.validation.validation_negative_prompt
    )  # what role_prompts encodes as "negative"
    negative_key = _checked_key(text, "negative", text.role_key("negative"), negative_prompt)
    return ValidationSettings(
        resolutions=parse_validation_resolutions(
            training.validation.validation_resolution, multiple=family.pixels_per_token
        ),
        num_inference_steps=training.validation.validation_num_inference_steps,
        guidance=training.validation.validation_guidance,
        # SimpleTuner's expression (validation.py _get_generator): a validation_seed of 0 means unset.
        seed=training.validation.validation_seed or run.seed or 0,
        negative=text.conditioning([negative_key])[0],
        negative_prompt=negative_prompt,
        mixed_precision=training.model.mixed_precision,
    )


# ---- rendering ---------------------------------------------------------------------------------------


def image_filename(nickname: str, width: int, height: int, label: str = "") -> str:
    """``<nickname>-<W>x<H>[-<label>].png``, with anything but letters, digits, ``.``, ``_``, ``-`` as ``_``."""
    stem = f"{_safe_name(nickname)}-{width}x{height}"
    return f"{stem}-{_safe_name(label)}.png" if label else f"{stem}.png"


def _safe_name(name: str) -> str:
    return _UNSAFE_FILENAME.sub("_", name)


@contextlib.contextmanager
def inference_mode_of(*modules: torch.nn.Module | None) -> Iterator[None]:
    """``modules`` in eval mode inside the block; every submodule's ``training`` flag and every
    parameter's ``requires_grad`` are put back as they were afterwards."""
    present = [module for module in modules if module is not None]
    training = [(sub, sub.training) for module in present for sub in module.modules()]
    grads = [(param, param.requires_grad) for module in present for param in module.parameters()]
    try:
        for module in present:
            module.eval()
        yield
    finally:
        for sub, flag in training:
            sub.training = flag
        for param, flag in grads:
            param.requires_grad_(flag)


def render_validation(
    family: ModelFamily,
    transformer: torch.nn.Module,
    prompts: Sequence[ValidationPrompt],
    settings: ValidationSettings,
    *,
    out_dir: Path,
    label: str = "",
    adapter: torch.nn.Module | None = None,
    pipeline: DiffusionPipeline | None = None,
) -> list[ValidationImage]:
    """Render every prompt at every resolution with ``transformer`` as it is now; write the PNGs.

    ``adapter`` is the LoKr network applied to ``transformer`` as hooks: it is not a submodule,
    so it is named here to be put in eval mode (its dropout) with the transformer. ``pipeline``
    is one from ``family.build_validation_pipeline(transformer)`` to reuse; one is built if not.
    Train/eval modes and ``requires_grad`` are left as they were found.
    """
    if pipeline is None:
        pipeline = family.build_validation_pipeline(transformer)
    elif pipeline.transformer is not transformer:
        raise ValueError("render_validation: the pipeline given was built around another transformer")
    seen: dict[str, str] = {}
    for prompt in prompts:
        stem = _safe_name(prompt.nickname)
        if stem in seen:
            raise ValueError(
                f"validation prompts {seen[stem]!r} and {prompt.nickname!r} would write the same files"
            )
        seen[stem] = prompt.nickname
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    images: list[ValidationImage] = []
    with (
        inference_mode_of(transformer, adapter),
        torch.no_grad(),
        autocast(family.device, settings.mixed_precision),
    ):
        for prompt in prompts:
            for width, height in settings.resolutions:
                image = family.generate_image(
                    pipeline,
                    prompt.prompt,
                    prompt.conditioning,
                    settings.negative,
                    width=width,
                    height=height,
                    num_inference_steps=settings.num_inference_steps,
                    guidance_scale=settings.guidance,
                    # On the CPU: the same starting noise whatever device renders.
                    generator=torch.Generator().manual_seed(settings.seed),
                    disable_cfg=settings.disable_cfg,
                )
                path = out_dir / image_filename(prompt.nickname, width, height, label)
                image.save(path)
                images.append(
                    ValidationImage(
                        nickname=prompt.nickname,
                        prompt=prompt.prompt,
                        width=width,
                        height=height,
                        label=label,
                        path=path,
                        image=image,
                    )
                )
    logger.info(
        "%d validation image(s)%s written to %s", len(images), f" ({label})" if label else "", out_dir
    )
    return images
