"""``DatasetConfig``: one entry of SimpleTuner's ``multidatabackend.json``, and the list rules."""

from __future__ import annotations

import dataclasses
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args

from raytuner.config.fields import build, derived, field_names, problem, rule
from raytuner.config.hub_dataset import (
    check_hub_dataset,
    check_hub_keys_elsewhere,
    hub_defaults,
    read_hub_block,
)
from raytuner.config.keys import KeyFindings, sort_key
from raytuner.config.parquet import PARQUET_BLOCK, PARQUET_KEYS, ParquetSettings, parse_parquet_block
from raytuner.config.sample_filters import (
    CAPTION_SHUFFLE_BLOCK,
    CAPTION_SHUFFLE_KEYS,
    CROP_BUCKETS_KEY,
    AspectBucket,
    CaptionShuffle,
    read_sample_blocks,
)
from raytuner.config.schedule import check_dataset_window, schedule_problem
from raytuner.config.training import ResolutionType

BackendType = Literal["local", "aws", "huggingface"]
BACKEND_TYPES: tuple[str, ...] = get_args(BackendType)
DatasetType = Literal["image", "eval", "text_embeds", "conditioning"]
DATASET_TYPES: tuple[str, ...] = get_args(DatasetType)
# SimpleTuner's conditioning_type values; only loss masks are implemented so far.
CONDITIONING_TYPES: tuple[str, ...] = (
    "mask",
    "segmentation",
    "controlnet",
    "reference_strict",
    "reference_loose",
)
_LATER_CONDITIONING_TYPES = ("segmentation", "controlnet", "reference_strict", "reference_loose")
CaptionStrategy = Literal["filename", "textfile", "instanceprompt", "parquet", "huggingface"]
CAPTION_STRATEGIES: tuple[str, ...] = get_args(CaptionStrategy)
MetadataBackend = Literal["discovery", "parquet", "huggingface"]
METADATA_BACKENDS: tuple[str, ...] = get_args(MetadataBackend)
# Values SimpleTuner accepts that raytuner does not handle yet: named in the error, not a typo.
_LATER_BACKEND_TYPES = ("csv", "webshart", "memory")
_LATER_DATASET_TYPES = (
    "video",
    "audio",
    "image_embeds",
    "conditioning_image_embeds",
    "distillation_cache",
    "caption",
    "grounding",
)
# SimpleTuner reads caption_strategy csv only from type csv datasets (refused above).
_LATER_CAPTION_STRATEGIES = ("csv",)
_LATER_METADATA_BACKENDS = ("json",)

# SimpleTuner reads both spellings of these keys; raytuner stores the first.
KEY_SPELLINGS: dict[str, str] = {
    "instance_data_root": "instance_data_dir",
    "is_regularization_data": "is_regularisation_data",
    "disable": "disabled",
    "webshart_optimize_captions": "webshart_optimise_captions",
}
# Nested objects of a dataset entry read by this module's parser (not fields of their own).
DATASET_BLOCKS = ("huggingface", PARQUET_BLOCK, CAPTION_SHUFFLE_BLOCK, CROP_BUCKETS_KEY)


@dataclass(frozen=True, kw_only=True)
class DatasetConfig:
    """One dataset entry, typed. Local paths are resolved by the loader."""

    id: str
    type: BackendType = field(metadata=rule(choices=BACKEND_TYPES, not_yet_supported=_LATER_BACKEND_TYPES))
    dataset_type: DatasetType = field(
        default="image", metadata=rule(choices=DATASET_TYPES, not_yet_supported=_LATER_DATASET_TYPES)
    )
    default: bool = False
    disabled: bool = False
    instance_data_dir: Path | None = field(default=None, metadata=rule(path="input_dir"))
    caption_strategy: CaptionStrategy = field(
        default="filename",
        metadata=rule(choices=CAPTION_STRATEGIES, not_yet_supported=_LATER_CAPTION_STRATEGIES),
    )
    instance_prompt: str | None = None
    metadata_backend: MetadataBackend = field(
        default="discovery",
        metadata=rule(choices=METADATA_BACKENDS, not_yet_supported=_LATER_METADATA_BACKENDS),
    )
    # The ``parquet`` block, read by parse_datasets (a nested object, not a flat option).
    parquet: ParquetSettings | None = field(default=None, metadata=derived())
    crop: bool = False
    crop_aspect: Literal["square", "preserve", "random", "closest"] = field(
        default="square", metadata=rule(choices=("square", "preserve", "random", "closest"))
    )
    crop_style: Literal["center", "centre", "random", "corner"] = field(
        default="random", metadata=rule(choices=("center", "centre", "random", "corner"))
    )
    resolution: int | float | None = field(default=None, metadata=rule(gt=0))
    resolution_type: ResolutionType | None = None
    minimum_image_size: int | float | None = field(default=None, metadata=rule(ge=0))
    maximum_image_size: int | float | None = field(default=None, metadata=rule(ge=0))
    target_downsample_size: int | float | None = field(default=None, metadata=rule(ge=0))
    # Cache locations are text: an absolute local path once loaded, or a URI / bucket prefix.
    cache_dir_vae: str | None = None
    cache_dir: str | None = None
    skip_file_discovery: str = ""
    repeats: int = field(default=0, metadata=rule(ge=0))
    is_regularisation_data: bool = False
    write_batch_size: int = field(default=128, metadata=rule(ge=1))
    # A text_embeds dataset's captions per text-encoder pass; unset, config.json's.
    text_encoder_batch_size: int | None = field(default=None, metadata=rule(ge=1))
    # Latents encoded by the training workers as batches need them (raytuner.cache.ondemand); the
    # first writes them back into the cache, the second redoes them every epoch.
    vae_cache_ondemand: bool = False
    vae_cache_clear_each_epoch: bool = False
    # Masked loss: an image dataset names its mask dataset; the mask dataset says what it holds.
    conditioning_data: str | None = None
    conditioning_type: str | None = field(
        default=None, metadata=rule(choices=CONDITIONING_TYPES, not_yet_supported=_LATER_CONDITIONING_TYPES)
    )
    aws_bucket_name: str | None = None
    aws_data_prefix: str = ""
    aws_endpoint_url: str | None = None
    aws_region_name: str | None = None
    aws_access_key_id: str | None = field(default=None, repr=False)
    aws_secret_access_key: str | None = field(default=None, repr=False)
    aws_session_token: str | None = field(default=None, repr=False)
    # type huggingface: the dataset (a Hub id or a local folder), its split and revision, the image
    # column, and the caption columns read from the "huggingface" block (derived: never top-level).
    dataset_name: str | None = None
    split: str = "train"
    revision: str | None = None
    image_column: str = "image"
    caption_columns: tuple[str, ...] = field(default=("caption",), metadata=derived())
    fallback_caption_column: str | None = field(default=None, metadata=derived())
    description_column: str = field(default="description", metadata=derived())
    # --- dataset schedule (raytuner/config/schedule.py): the 1-based optimizer steps it is drawn at,
    # both ends inclusive; end_step 0 is no end, as in SimpleTuner.
    start_step: int = field(default=0, metadata=rule(ge=0))
    end_step: int = field(default=0, metadata=rule(ge=0))
    # --- end of dataset schedule

    # ---- which samples, cropped how (raytuner/config/sample_filters.py parses the nested ones) ----
    # Images whose bucket's aspect ratio (width / height) is outside these are left out; 0: no limit.
    minimum_aspect_ratio: float | None = field(default=None, metadata=rule(ge=0))
    maximum_aspect_ratio: float | None = field(default=None, metadata=rule(ge=0))
    # At most this many images, the same ones every build (raytuner/data/sampling.py); 0: all.
    max_num_samples: int | None = field(default=None, metadata=rule(ge=0))
    # The aspect ratios crop_aspect random or closest chooses from.
    crop_aspect_buckets: tuple[AspectBucket, ...] = field(default=(), metadata=derived())
    caption_shuffle: CaptionShuffle | None = field(default=None, metadata=derived())
    # Unset: config.json's delete_problematic_images (the loader fills it in).
    delete_problematic_images: bool | None = None

    @property
    def enabled(self) -> bool:
        return not self.disabled

    @property
    def needs_images(self) -> bool:
        """True for datasets whose images are read (image, eval, mask), not text embed caches."""
        return self.dataset_type != "text_embeds"

    @property
    def encodes_latents(self) -> bool:
        """True for datasets the VAE encodes into their own latent cache (image and eval).

        A mask dataset is read with the image dataset that links it and cached beside its latents.
        """
        return self.dataset_type in ("image", "eval")

    @property
    def is_mask(self) -> bool:
        return self.dataset_type == "conditioning" and self.conditioning_type == "mask"


@dataclass(kw_only=True)
class ParsedDatasets:
    datasets: list[DatasetConfig] = field(default_factory=list)
    findings: KeyFindings = field(default_factory=KeyFindings)

    @property
    def problems(self) -> list[str]:
        return self.findings.problems


def parse_datasets(raw: Any, *, where: str, strict: bool) -> ParsedDatasets:
    """Datasets from the decoded ``multidatabackend.json`` (paths not yet resolved)."""
    result = ParsedDatasets()
    if not isinstance(raw, list):
        kind = type(raw).__name__ if not isinstance(raw, dict) else "an object"
        result.problems.append(
            f"{where}: expected a JSON list of dataset objects ([{{...}}, ...]), got {kind}; "
            "wrap the dataset entries in [ ]"
        )
        return result
    if not raw:
        result.problems.append(
            f"{where}: the dataset list is empty; add at least one image dataset and one text_embeds dataset"
        )
        return result
    fields = field_names(DatasetConfig)
    for index, entry in enumerate(raw):
        place = f"dataset #{index + 1}"
        if not isinstance(entry, dict):
            result.problems.append(
                f'{where}: {place}: expected an object ({{"id": ..., "type": ...}}), got {entry!r}'
            )
            continue
        dataset_id = entry.get("id")
        if isinstance(dataset_id, str) and dataset_id:
            place = f"dataset '{dataset_id}'"
        label = f"{where}: {place}"
        parquet_block = entry.get(PARQUET_BLOCK)
        block = entry.get("huggingface")
        values = _sort_keys(
            {key: value for key, value in entry.items() if key not in DATASET_BLOCKS},
            where=where,
            place=place,
            fields=fields,
            strict=strict,
            result=result,
        )
        if parquet_block is not None:
            values[PARQUET_BLOCK] = parse_parquet_block(
                parquet_block, where=where, place=place, strict=strict, findings=result.findings
            )
        derived_values = read_hub_block(
            block, values, where=where, place=place, strict=strict, findings=result.findings
        )
        dataset = build(DatasetConfig, values, where=label, problems=result.problems)
        if dataset is not None and values.get(PARQUET_BLOCK) is not None:
            dataset = dataclasses.replace(dataset, parquet=values[PARQUET_BLOCK])
        if dataset is not None:
            buckets, shuffle = read_sample_blocks(
                entry,
                crop_aspect=dataset.crop_aspect,
                where=where,
                place=place,
                strict=strict,
                findings=result.findings,
            )
            dataset = dataclasses.replace(dataset, crop_aspect_buckets=buckets, caption_shuffle=shuffle)
        if dataset is not None:
            dataset = hub_defaults(dataset, values, derived_values)
            check_hub_keys_elsewhere(dataset, values, block, label=label, problems=result.problems)
            _check_dataset(
                dataset, label=label, problems=result.problems, has_block=parquet_block is not None
            )
            result.datasets.append(dataset)
    if not result.problems:
        _check_dataset_list(result, where=where)
    return result


def _sort_keys(
    entry: dict[str, Any],
    *,
    where: str,
    place: str,
    fields: frozenset[str],
    strict: bool,
    result: ParsedDatasets,
) -> dict[str, Any]:
    values: dict[str, Any] = {}
    for key, value in entry.items():
        name = KEY_SPELLINGS.get(key, key)
        keep = sort_key(
            name,
            value,
            scope="dataset",
            where=where,
            place=place,
            fields=fields,
            strict=strict,
            findings=result.findings,
            written=key,
        )
        if not keep:
            continue
        if name == "conditioning_data" and isinstance(value, list):
            # SimpleTuner takes one id or a list; one mask per image is all a loss mask can use.
            if len(value) != 1:
                result.problems.append(
                    problem(
                        f"{where}: {place}",
                        name,
                        value,
                        "one mask dataset id",
                        "link a single conditioning dataset with conditioning_type mask",
                    )
                )
                continue
            value = value[0]
        if name in values:
            result.problems.append(
                f"{where}: {place}: both '{name}' and its other spelling '{key}' are set; keep one"
            )
        values[name] = value
    return values


def _check_dataset(dataset: DatasetConfig, *, label: str, problems: list[str], has_block: bool) -> None:
    check_hub_dataset(dataset, label=label, problems=problems)
    check_dataset_window(dataset, label=label, problems=problems)
    if not dataset.id.strip():
        problems.append(f"{label}: 'id' = '': expected a non-empty name; give each dataset a unique id")
    if dataset.type == "local" and dataset.needs_images and dataset.instance_data_dir is None:
        problems.append(
            f"{label}: 'instance_data_dir' is required for a local {dataset.dataset_type} dataset; "
            "set it to the folder holding the images"
        )
    if dataset.type == "aws" and not dataset.aws_bucket_name:
        problems.append(f"{label}: 'aws_bucket_name' is required for a dataset of type aws")
    if dataset.metadata_backend == "parquet" and not has_block:
        problems.append(
            f"{label}: metadata_backend parquet needs a 'parquet' block; add "
            '"parquet": {"path": "captions.parquet", "filename_column": "id", "caption_column": "description"}'
        )
    if dataset.caption_strategy == "parquet" and dataset.metadata_backend != "parquet":
        problems.append(
            problem(
                label,
                "caption_strategy",
                "parquet",
                'a dataset with "metadata_backend": "parquet", as SimpleTuner requires',
                'set "metadata_backend": "parquet" and its "parquet" block, or use caption_strategy textfile',
            )
        )
    if dataset.caption_strategy == "instanceprompt" and not dataset.instance_prompt:
        problems.append(
            problem(
                label,
                "instance_prompt",
                dataset.instance_prompt,
                "a prompt, because caption_strategy is instanceprompt",
                'set "instance_prompt" to the caption every image should use',
            )
        )


def _check_dataset_list(result: ParsedDatasets, *, where: str) -> None:
    datasets = result.datasets
    for dataset_id, count in Counter(dataset.id for dataset in datasets).items():
        if count > 1:
            result.problems.append(
                f"{where}: dataset id '{dataset_id}' is used {count} times; every dataset needs a unique 'id'"
            )
    enabled = [dataset for dataset in datasets if dataset.enabled]
    _check_conditioning_links(enabled, where=where, problems=result.problems)
    # A gap in the dataset schedule before a later start (the run's length is checked with its steps).
    gap = schedule_problem(enabled, where=where, last_step=None)
    if gap:
        result.problems.append(gap)
    if not any(dataset.dataset_type == "image" for dataset in enabled):
        result.problems.append(
            f'{where}: no enabled image dataset; add an entry with "dataset_type": "image" (the default) '
            'and "instance_data_dir" pointing at your images'
        )
    text_embeds = [dataset for dataset in enabled if dataset.dataset_type == "text_embeds"]
    defaults = [dataset.id for dataset in text_embeds if dataset.default]
    if len(defaults) > 1:
        result.problems.append(
            f"{where}: text_embeds datasets {', '.join(repr(d) for d in defaults)} are all marked "
            '"default": true; only one text embed dataset can be the default'
        )
    elif text_embeds and not defaults:
        chosen = text_embeds[0]
        result.datasets = [
            dataclasses.replace(dataset, default=True) if dataset is chosen else dataset
            for dataset in result.datasets
        ]
        result.findings.notes.append(
            f"{where}: no text_embeds dataset is marked default; using '{text_embeds[0].id}'"
        )


def _check_conditioning_links(enabled: list[DatasetConfig], *, where: str, problems: list[str]) -> None:
    """Each image dataset's ``conditioning_data`` names an enabled mask dataset; each mask dataset is linked."""
    by_id = {dataset.id: dataset for dataset in enabled}
    linked: set[str] = set()
    for dataset in enabled:
        label = f"{where}: dataset '{dataset.id}'"
        if dataset.dataset_type == "conditioning" and dataset.conditioning_type is None:
            problems.append(
                problem(
                    label,
                    "conditioning_type",
                    None,
                    "mask for a conditioning dataset",
                    'set "conditioning_type": "mask" (white = learn, black = ignore)',
                )
            )
        if dataset.dataset_type != "conditioning" and dataset.conditioning_type is not None:
            problems.append(
                problem(
                    label,
                    "conditioning_type",
                    dataset.conditioning_type,
                    'a dataset with "dataset_type": "conditioning"',
                    "remove it, or set dataset_type conditioning on the mask dataset",
                )
            )
        target_id = dataset.conditioning_data
        if target_id is None:
            continue
        if dataset.dataset_type != "image":
            problems.append(
                problem(
                    label,
                    "conditioning_data",
                    target_id,
                    "an image dataset (eval loss is never masked, as in SimpleTuner)",
                    "remove conditioning_data from this dataset",
                )
            )
            continue
        target = by_id.get(target_id)
        if target is None:
            known = ", ".join(d.id for d in enabled if d.dataset_type == "conditioning") or "none"
            problems.append(
                problem(
                    label,
                    "conditioning_data",
                    target_id,
                    f"the id of an enabled conditioning dataset (known: {known})",
                    "fix the id, or add the mask dataset",
                )
            )
        elif not target.is_mask:
            kind = target.conditioning_type if target.dataset_type == "conditioning" else target.dataset_type
            problems.append(
                problem(
                    label,
                    "conditioning_data",
                    target_id,
                    f'a conditioning dataset with "conditioning_type": "mask", not {kind}',
                    f'set "dataset_type": "conditioning" and "conditioning_type": "mask" on \'{target_id}\'',
                )
            )
        else:
            linked.add(target_id)
    for dataset in enabled:
        if dataset.is_mask and dataset.id not in linked:
            problems.append(
                f"{where}: dataset '{dataset.id}': mask dataset linked by no image dataset; "
                f'set "conditioning_data": "{dataset.id}" on the image dataset it masks, or remove it'
            )


def default_text_embeds(*, existing_ids: set[str], cache_dir: str) -> DatasetConfig:
    """The text_embeds dataset SimpleTuner adds when a config has none."""
    dataset_id, suffix = "text-embeds", 1
    while dataset_id in existing_ids:
        dataset_id, suffix = f"text-embeds-{suffix}", suffix + 1
    return DatasetConfig(
        id=dataset_id, type="local", dataset_type="text_embeds", default=True, cache_dir=cache_dir
    )


def dataset_keys() -> frozenset[str]:
    """Every dataset key raytuner reads: the entry's fields and its nested ``parquet`` block's keys."""
    return (
        field_names(DatasetConfig)
        | {PARQUET_BLOCK, CAPTION_SHUFFLE_BLOCK, CROP_BUCKETS_KEY}
        | PARQUET_KEYS
        | CAPTION_SHUFFLE_KEYS
    )
