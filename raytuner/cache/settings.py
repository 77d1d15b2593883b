"""A run's caches before any work: where each one is, its bucket settings and skip words, the
prompts it encodes besides captions, and the identities of the encoders that fill it.

Everything here is read from the run's config (and, for the encoders' identities, the model's
files); nothing lists or encodes. The pre-flight check refuses a bad setting through
:func:`cache_setting_problems`, and the cache reader, evaluation and the run's outputs find the
caches through the same functions the build writes them with.
"""

from __future__ import annotations

import functools
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from raytuner.cache.format import CacheError
from raytuner.cache.identity import component_identity, encoder_key
from raytuner.config.datasets import DatasetConfig
from raytuner.config.errors import ConfigError
from raytuner.config.paths import display
from raytuner.config.prompt_library import builtin_prompt_library
from raytuner.config.run import RunConfig
from raytuner.data import discovery
from raytuner.data.buckets import BucketError, BucketSettings
from raytuner.models.registry import get_family
from raytuner.storage import Location, has_scheme

if TYPE_CHECKING:
    # Only annotations name the family class: importing it would load torch and diffusers
    # into every process that only reads or writes the cache's files.
    from raytuner.models.base import ModelFamily

logger = logging.getLogger(__name__)


# ---- encoder identities -------------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class EncoderIdentity:
    identity: dict[str, Any]
    key: str

    @classmethod
    def of(cls, identity: dict[str, Any]) -> EncoderIdentity:
        return cls(identity=identity, key=encoder_key(identity))


@dataclass(frozen=True, kw_only=True)
class Encoders:
    """The two encoders of a build, identified before any work starts."""

    vae: EncoderIdentity
    text: EncoderIdentity


def model_path_of(run: RunConfig) -> str:
    family = get_family(run.training.model.model_family)
    return family.resolve_model_path(
        run.training.model.model_flavour, run.training.model.pretrained_model_name_or_path
    )


def vae_identity(run: RunConfig, family: ModelFamily) -> EncoderIdentity:
    """The identity of the VAE that fills the latent caches (checked again by an on-demand encoder)."""
    vae = component_identity(
        model_path_of(run),
        family.vae_components,
        revision=run.training.model.revision,
        settings=family.latent_settings(),
    )
    vae.update({"family": family.name, "component": "VAE"})
    return EncoderIdentity.of(vae)


def encoder_identities(run: RunConfig, family: ModelFamily) -> tuple[EncoderIdentity, EncoderIdentity]:
    text = component_identity(
        model_path_of(run),
        family.text_components,
        revision=run.training.model.revision,
        settings=family.text_settings(),
    )
    text.update({"family": family.name, "component": "text side"})
    return vae_identity(run, family), EncoderIdentity.of(text)


def cache_encoders(run: RunConfig) -> Encoders:
    """The encoders' identities, which need the model's files (or its hub snapshot): the first
    work of a build, for a run whose settings were checked (raytuner.train.preflight)."""
    family_cls = get_family(run.training.model.model_family)
    vae, text = encoder_identities(run, family_cls(model_path_of(run), revision=run.training.model.revision))
    return Encoders(vae=vae, text=text)


# ---- datasets and where their caches are -------------------------------------------------------------


def image_datasets(run: RunConfig) -> list[DatasetConfig]:
    """The datasets with a latent cache (image and eval); mask datasets are read with their image dataset."""
    return [dataset for dataset in run.enabled_datasets if dataset.encodes_latents]


def mask_dataset(run: RunConfig, dataset: DatasetConfig) -> DatasetConfig | None:
    """The mask dataset an image dataset links through ``conditioning_data`` (checked by the loader)."""
    if dataset.conditioning_data is None:
        return None
    return next(d for d in run.enabled_datasets if d.id == dataset.conditioning_data)


def text_dataset(run: RunConfig) -> DatasetConfig:
    embeds = [d for d in run.enabled_datasets if d.dataset_type == "text_embeds" and d.default]
    if not embeds:
        raise CacheError("no default text_embeds dataset; add one to multidatabackend.json")
    return embeds[0]


def text_batch_size(run: RunConfig) -> int:
    """Captions per text-encoder pass: the text_embeds dataset's text_encoder_batch_size, else
    config.json's (SimpleTuner reads the dataset's first, then the option, default 1)."""
    own = text_dataset(run).text_encoder_batch_size
    return own if own is not None else run.training.data.text_encoder_batch_size


def cache_location(dataset: DatasetConfig, value: str) -> Location:
    """A cache folder: a local path, a URI, or (for ``type: aws``) a prefix in the dataset's bucket."""
    if dataset.type == "aws" and not has_scheme(value) and not value.startswith("/"):
        return Location(
            uri=f"s3://{dataset.aws_bucket_name}/{value.strip('/')}", s3=discovery.s3_settings(dataset)
        )
    if value.startswith("s3://") and dataset.type == "aws":
        return Location(uri=value, s3=discovery.s3_settings(dataset))
    return Location(uri=value)


def text_cache_location(run: RunConfig) -> Location:
    dataset = text_dataset(run)
    if not dataset.cache_dir:
        raise CacheError(
            f"text_embeds dataset '{dataset.id}': 'cache_dir' is not set; set it to the folder for prompt embeddings"
        )
    return cache_location(dataset, dataset.cache_dir)


def latent_cache_location(run: RunConfig, dataset: DatasetConfig) -> Location:
    assert dataset.cache_dir_vae is not None, "the loader fills in SimpleTuner's default cache_dir_vae"
    return cache_location(dataset, dataset.cache_dir_vae)


# ---- settings ------------------------------------------------------------------------------------------


def bucket_settings(dataset: DatasetConfig, run: RunConfig, family: type[ModelFamily]) -> BucketSettings:
    training = run.training
    alignment = training.data.aspect_bucket_alignment
    if alignment % family.pixels_per_token:
        raise CacheError(
            f"{display(run.sources['config'])}: 'aspect_bucket_alignment' = {alignment}: expected a multiple of "
            f"{family.pixels_per_token} for {family.name} (VAE downsampling x patch size); "
            f"set it to {family.pixels_per_token} or 64"
        )
    assert dataset.resolution is not None and dataset.resolution_type is not None
    try:
        return BucketSettings(
            resolution=float(dataset.resolution),
            resolution_type=dataset.resolution_type,
            minimum_image_size=dataset.minimum_image_size,
            maximum_image_size=dataset.maximum_image_size,
            target_downsample_size=dataset.target_downsample_size,
            crop=dataset.crop,
            crop_aspect=dataset.crop_aspect,
            crop_style=dataset.crop_style,
            rounding=training.data.aspect_bucket_rounding or 2,
            alignment=alignment,
            crop_aspect_buckets=dataset.crop_aspect_buckets,
            minimum_aspect_ratio=dataset.minimum_aspect_ratio,
            maximum_aspect_ratio=dataset.maximum_aspect_ratio,
        )
    except BucketError as error:
        raise CacheError(
            f"{display(run.sources['data_backend_config'])}: dataset '{dataset.id}': {error}"
        ) from None


SKIP_PHASES = ("vae", "aspect", "text")
# SimpleTuner phases with no raytuner counterpart: its error scan and caption datasets.
SKIP_PHASES_WITHOUT_EFFECT = ("metadata", "caption")


def _skip_words(dataset: DatasetConfig) -> list[str]:
    return dataset.skip_file_discovery.replace(",", " ").split()


def skips(dataset: DatasetConfig, phase: str) -> bool:
    """SimpleTuner's ``skip_file_discovery``: a list of phases (``vae``, ``aspect``, ``text``)."""
    return phase in _skip_words(dataset)


def check_skip_words(dataset: DatasetConfig, where: str) -> None:
    for word in _skip_words(dataset):
        if word in SKIP_PHASES_WITHOUT_EFFECT:
            logger.warning(
                "%s: dataset '%s': skip_file_discovery '%s' has no effect in raytuner (it has no such phase)",
                where,
                dataset.id,
                word,
            )
        elif word not in SKIP_PHASES:
            raise CacheError(
                f"{where}: dataset '{dataset.id}': 'skip_file_discovery' = '{dataset.skip_file_discovery}': "
                f"'{word}' is not a phase; expected words from: {', '.join(SKIP_PHASES)}"
            )


def role_prompts(run: RunConfig) -> dict[str, Any]:
    """Prompts encoded for roles other than captions: empty (caption dropout), negative, validation."""
    training = run.training
    validation: dict[str, str] = {}
    if training.validation.validation_prompt:
        validation["validation"] = training.validation.validation_prompt
    if training.validation.validation_prompt_library:
        # Before the user's library, so a user entry of the same nickname replaces a built-in one.
        validation.update(builtin_prompt_library())
    if training.validation.user_prompt_library is not None:
        try:
            library = json.loads(Path(training.validation.user_prompt_library).read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError, UnicodeDecodeError) as error:
            raise CacheError(
                f"{training.validation.user_prompt_library}: cannot read the prompt library ({error})"
            ) from None
        if not isinstance(library, dict) or not all(isinstance(v, str) for v in library.values()):
            raise CacheError(
                f'{training.validation.user_prompt_library}: expected a JSON object of "nickname": "prompt" pairs'
            )
        validation.update(library)
    return {"empty": "", "negative": training.validation.validation_negative_prompt, "validation": validation}


def cache_setting_problems(run: RunConfig) -> list[str]:
    """Everything about the caches that can be refused before any work, one line per problem:
    bucket settings, ``skip_file_discovery`` words, the text cache folder, the prompt library."""
    family_cls = get_family(run.training.model.model_family)
    where = display(run.sources["data_backend_config"])
    checks: list[Callable[[], object]] = []
    for dataset in image_datasets(run):
        checks.append(functools.partial(bucket_settings, dataset, run, family_cls))
        checks.append(functools.partial(check_skip_words, dataset, where))
    checks += [functools.partial(text_cache_location, run), functools.partial(role_prompts, run)]
    problems: list[str] = []
    for check in checks:
        try:
            check()
        except CacheError as error:
            if str(error) not in problems:  # a config-wide setting refused once, not once per dataset
                problems.append(str(error))
    return problems


def check_cache_settings(run: RunConfig) -> Encoders:
    """The cache settings checked (raises ConfigError with every problem), then :func:`cache_encoders`."""
    problems = cache_setting_problems(run)
    if problems:
        raise ConfigError(problems)
    return cache_encoders(run)
