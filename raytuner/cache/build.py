"""``raytuner cache``: the Ray Data pipeline that fills the latent and text caches.

Order of work, per run:

1. list every enabled image and eval dataset (local folder or ``s3://``) and probe the files not
   seen before in Ray tasks (hash, size, full decode, caption file); bad files are reported;
2. give each image its aspect bucket and crop (:mod:`raytuner.data.buckets`) and its content key
   (file bytes + crop + resolution + VAE identity);
3. encode what the caches lack: unique captions, validation prompts, the negative prompt, the
   prompt library and the empty prompt through the family's text side on one actor pool; the
   images read, decoded, resized and cropped in CPU tasks, then through the VAE on another actor
   pool (``vae_batch_size`` per call, one GPU per actor where the cluster has or can add GPUs), written
   as Parquet shards of one bucket each;
4. commit each cache folder (index, then manifest) and drop shards no row points at any more;
   print a summary table and write a report of skipped files beside each latent cache.

A cache written by another VAE or text encoder is refused (``--rebuild`` moves past it by
deleting that cache's raytuner files); nothing is deleted otherwise.
"""

from __future__ import annotations

import functools
import hashlib
import io
import json
import logging
import math
import posixpath
import time
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from raytuner.cache import format as fmt
from raytuner.cache import stages
from raytuner.cache.format import CacheError
from raytuner.cache.identity import component_identity, describe, encoder_key
from raytuner.cache.summary import BucketSummary, CacheSummary, DatasetSummary, shared_note
from raytuner.config.datasets import DatasetConfig
from raytuner.config.errors import ConfigError
from raytuner.config.paths import display
from raytuner.config.run import RunConfig
from raytuner.data import discovery
from raytuner.data.buckets import BucketError, BucketSettings, Placement, crop_seed_for, place
from raytuner.data.discovery import DiscoveredImage, DiscoveredMask, Listing, Probe, SkippedFile
from raytuner.models.base import ModelFamily
from raytuner.models.registry import get_family
from raytuner.placement import actor_gpus, cluster_facts, default_actor_count
from raytuner.storage import (
    Location,
    StorageError,
    describe_error,
    has_scheme,
    is_temporary,
    list_files,
    write_bytes_atomic,
)

logger = logging.getLogger(__name__)

PROBE_BATCH = 32
TEXT_BATCH = 64


# ---- what the build works on ----------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class EncoderIdentity:
    identity: dict[str, Any]
    key: str

    @classmethod
    def of(cls, identity: dict[str, Any]) -> EncoderIdentity:
        return cls(identity=identity, key=encoder_key(identity))


@dataclass(kw_only=True)
class DatasetWork:
    """One image or eval dataset: where it is read from and cached, and what the build found."""

    dataset: DatasetConfig
    settings: BucketSettings
    cache: Location
    listing: Listing | None = None
    images: list[DiscoveredImage] = field(default_factory=list)
    skipped: list[SkippedFile] = field(default_factory=list)
    rows: dict[str, dict[str, Any]] = field(default_factory=dict)  # content key -> index row (no location)
    existing: dict[str, dict[str, Any]] = field(default_factory=dict)  # content key -> location
    stale_shards: set[str] = field(default_factory=set)
    written: dict[str, dict[str, Any]] = field(default_factory=dict)  # content key -> location
    bytes_by_bucket: Counter[str] = field(default_factory=Counter)
    encode_skipped: list[SkippedFile] = field(default_factory=list)
    vae_calls: set[str] = field(default_factory=set)
    encoded_before: int = 0  # the folder's lifetime count of encoded rows, from its manifest
    # Masked loss: the linked mask dataset, its files, and each image's mask (by relative path).
    mask: DatasetConfig | None = None
    mask_listing: Listing | None = None
    masks: dict[str, DiscoveredMask] = field(default_factory=dict)


# ---- locations and settings ---------------------------------------------------------------------------


def cache_location(dataset: DatasetConfig, value: str) -> Location:
    """A cache folder: a local path, a URI, or (for ``type: aws``) a prefix in the dataset's bucket."""
    if dataset.type == "aws" and not has_scheme(value) and not value.startswith("/"):
        return Location(
            uri=f"s3://{dataset.aws_bucket_name}/{value.strip('/')}", s3=discovery.s3_settings(dataset)
        )
    if value.startswith("s3://") and dataset.type == "aws":
        return Location(uri=value, s3=discovery.s3_settings(dataset))
    return Location(uri=value)


def bucket_settings(dataset: DatasetConfig, run: RunConfig, family: type[ModelFamily]) -> BucketSettings:
    training = run.training
    alignment = training.aspect_bucket_alignment
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
            rounding=training.aspect_bucket_rounding or 2,
            alignment=alignment,
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


# ---- encoder identities -------------------------------------------------------------------------------


def model_path_of(run: RunConfig) -> str:
    family = get_family(run.training.model_family)
    return family.resolve_model_path(run.training.model_flavour, run.training.pretrained_model_name_or_path)


def encoder_identities(run: RunConfig, family: ModelFamily) -> tuple[EncoderIdentity, EncoderIdentity]:
    model_path = model_path_of(run)
    revision = run.training.revision
    vae = component_identity(
        model_path, family.vae_components, revision=revision, settings=family.latent_settings()
    )
    text = component_identity(
        model_path, family.text_components, revision=revision, settings=family.text_settings()
    )
    vae.update({"family": family.name, "component": "VAE"})
    text.update({"family": family.name, "component": "text side"})
    return EncoderIdentity.of(vae), EncoderIdentity.of(text)


def _load_committed(
    folder: Location, *, kind: str, encoder: EncoderIdentity, rebuild: bool, what: str
) -> tuple[dict[str, dict[str, Any]], fmt.Manifest | None]:
    """The committed rows of a cache folder (row id -> index row), after the identity check."""
    manifest = fmt.read_manifest(folder)
    if manifest is None:
        return {}, None
    if manifest.kind != kind:
        raise CacheError(f"{folder}: holds a {manifest.kind} cache, not {kind}; give {what} its own folder")
    if manifest.encoder_key != encoder.key:
        if rebuild:
            _remove_cache_files(folder)
            logger.warning("%s: cache written by %s removed (--rebuild)", folder, describe(manifest.encoder))
            return {}, None
        raise CacheError(
            f"{folder}: cache written by {describe(manifest.encoder)} (encoder key {manifest.encoder_key}), "
            f"but this run encodes with {describe(encoder.identity)} (key {encoder.key}); "
            f"point {what} at a new folder, or run `raytuner cache --rebuild` to re-encode it here"
        )
    index = fmt.read_index(folder, manifest)
    return {index_row_id(row): row for row in index.to_pylist()}, manifest


def index_row_id(row: Mapping[str, Any]) -> str:
    """What identifies an index row: a latent row's sample key, a text row's caption key.

    Latent indexes written before identical files were samples of their own have no ``sample``
    column and one row per content key, which is then the sample key too.
    """
    return str(row.get("sample") or row["key"])


def _remove_cache_files(folder: Location) -> None:
    """Delete raytuner's own files in a cache folder (never anything else there)."""
    filesystem, root = folder.resolve()
    for info in list_files(folder):
        relative = posixpath.relpath(info.path, root)
        name = posixpath.basename(relative)
        if name in (fmt.MANIFEST_NAME, fmt.REPORT_NAME, discovery.DISCOVERY_INDEX) or (
            name.endswith(".parquet") and (name.startswith(("index-", "part-")))
        ):
            filesystem.delete_file(info.path)


def _adopt_orphans(
    folder: Location, *, kind: str, encoder: EncoderIdentity, known: set[str]
) -> dict[str, dict[str, Any]]:
    """Whole shards a killed build wrote but never committed: key -> location. Temporary files are removed."""
    filesystem, root = folder.resolve()
    adopted: dict[str, dict[str, Any]] = {}
    for info in list_files(folder):
        relative = posixpath.relpath(info.path, root)
        if is_temporary(relative):
            filesystem.delete_file(info.path)
            continue
        name = posixpath.basename(relative)
        if not (name.startswith("part-") and name.endswith(".parquet")) or relative in known:
            continue
        metadata = fmt.read_shard_metadata(folder, relative)
        if metadata is None:
            logger.warning("%s: unreadable shard %s removed", folder, relative)
            filesystem.delete_file(info.path)
            continue
        if (
            metadata.get(fmt.ENCODER_KEY_METADATA, b"").decode() != encoder.key
            or metadata.get(fmt.KIND_METADATA, b"").decode() != kind
        ):
            logger.warning(
                "%s: shard %s was written by another encoder; left in place, not used", folder, relative
            )
            continue
        keys = fmt.read_shard_columns(folder, relative, ["key"]).column("key").to_pylist()
        for location in fmt.shard_locations(keys, relative):
            adopted[location["key"]] = location
    if adopted:
        logger.info("%s: %d row(s) from an interrupted build adopted", folder, len(adopted))
    return adopted


# ---- discovery -----------------------------------------------------------------------------------------


def _read_discovery_index(folder: Location) -> dict[str, Probe]:
    filesystem, root = folder.resolve()
    path = posixpath.join(root, discovery.DISCOVERY_INDEX)
    try:
        if filesystem.get_file_info(path).type == pafs.FileType.NotFound:
            return {}
        with filesystem.open_input_file(path) as handle:
            return discovery.probes_from_rows(pq.read_table(handle).to_pylist())
    except (OSError, pa.ArrowException):
        logger.warning("%s: unreadable %s; every file is read again", folder, discovery.DISCOVERY_INDEX)
        return {}


def _write_discovery_index(folder: Location, probes: Iterable[Probe]) -> None:
    """Remember what each file held; failures that may pass (an unreadable file) are tried again next time."""
    table = pa.Table.from_pylist(
        discovery.probe_rows(probe for probe in probes if not probe.transient),
        schema=pa.schema(
            {
                "fingerprint": pa.string(),
                "sha256": pa.string(),
                "width": pa.int32(),
                "height": pa.int32(),
                "captions": pa.list_(pa.string()),
                "error": pa.string(),
            }
        ),
    )
    buffer = io.BytesIO()
    pq.write_table(table, buffer, compression="zstd")
    filesystem, root = folder.resolve()
    write_bytes_atomic(filesystem, posixpath.join(root, discovery.DISCOVERY_INDEX), buffer.getvalue())


def probe_listings(work: Sequence[DatasetWork]) -> None:
    """Probe every listed file not already in its dataset's discovery index, on the cluster."""
    import ray

    known: dict[str, dict[str, Probe]] = {item.dataset.id: _read_discovery_index(item.cache) for item in work}
    todo: dict[str, dict[str, Any]] = {}
    for item in work:
        for listed in _listed_files(item):
            if listed.fingerprint not in known[item.dataset.id]:
                # Two datasets may list the same file (one folder at two resolutions): read it once.
                todo.setdefault(
                    listed.fingerprint, {name: getattr(listed, name) for name in stages.LISTED_FIELDS}
                )
    if todo:
        sources = {
            item.dataset.id: (discovery.dataset_location(item.dataset), item.dataset.caption_strategy)
            for item in work
        }
        for item in work:
            if item.mask is not None:
                # Masks carry no captions: "filename" makes the probe read none.
                sources[item.mask.id] = (discovery.dataset_location(item.mask), "filename")
        logger.info("reading %d new or changed file(s)", len(todo))
        dataset = ray.data.from_items(list(todo.values())).map_batches(
            functools.partial(stages.probe_batch, sources=sources), batch_size=PROBE_BATCH
        )
        found = discovery.probes_from_rows(dataset.iter_rows())
        for item in work:
            for listed in _listed_files(item):
                if listed.fingerprint in found:
                    known[item.dataset.id][listed.fingerprint] = found[listed.fingerprint]
    for item in work:
        assert item.listing is not None
        listed_fingerprints = {listed.fingerprint for listed in _listed_files(item)}
        probes = {fp: probe for fp, probe in known[item.dataset.id].items() if fp in listed_fingerprints}
        item.images, item.skipped = discovery.merge_probes(item.listing, probes)
        if item.mask_listing is not None:
            item.masks = _pair_masks(item, probes)
        try:
            _write_discovery_index(item.cache, probes.values())
        except (OSError, pa.ArrowException) as error:
            raise CacheError(describe_error(item.cache.child(discovery.DISCOVERY_INDEX).uri, error)) from None


def _listed_files(item: DatasetWork) -> list[discovery.ListedFile]:
    """The files a dataset's discovery reads: its images, and its masks (indexed in its own cache)."""
    files = list(item.listing.files) if item.listing else []
    return files + (list(item.mask_listing.files) if item.mask_listing else [])


def _pair_masks(item: DatasetWork, probes: Mapping[str, Probe]) -> dict[str, DiscoveredMask]:
    """Each image's mask; an image without a usable one stops the build, as SimpleTuner stops at its batch."""
    assert item.mask is not None and item.mask_listing is not None
    masks, missing = discovery.pair_masks(item.images, item.mask_listing, probes)
    if missing:
        shown = ", ".join(missing[:3]) + (f" and {len(missing) - 3} more" if len(missing) > 3 else "")
        raise CacheError(
            f"dataset '{item.dataset.id}': {len(missing)} image(s) without a usable mask in mask dataset "
            f"'{item.mask.id}' ({discovery.dataset_location(item.mask)}): {shown}; every image needs a mask "
            "with the same relative path (an all-white mask trains on the whole image)"
        )
    stretched = [
        image.relative
        for image in item.images
        if abs(masks[image.relative].width / masks[image.relative].height - image.width / image.height) > 0.01
    ]
    if stretched:
        logger.warning(
            "dataset '%s': %d mask(s) of another aspect ratio than their image are stretched to it, as "
            "SimpleTuner does: %s",
            item.dataset.id,
            len(stretched),
            ", ".join(stretched[:3]),
        )
    return masks


# ---- keys ------------------------------------------------------------------------------------------------


def caption_key(prompt: str) -> str:
    """The text cache's key: the prompt itself, hashed (many images share a caption)."""
    return hashlib.sha256(prompt.encode("utf-8")).hexdigest()[:32]


def content_key(
    image: DiscoveredImage, placement: Placement, vae_key: str, mask: DiscoveredMask | None = None
) -> str:
    """A latent row's key: the file's bytes, its crop and resize, the VAE that encodes it, and its
    mask's bytes when it has one (so adding, changing or dropping a mask re-encodes the row)."""
    fields: dict[str, Any] = {
        "sha256": image.sha256,
        "bucket": placement.bucket,
        "intermediary": placement.intermediary,
        "crop": [placement.left, placement.top],
        "resample": "lanczos",
        "vae": vae_key,
    }
    if mask is not None:
        # Only masked rows carry the field: the keys of caches without masks stay as they were.
        fields["mask"] = {"sha256": mask.sha256, "grid": "red-channel-area"}
    payload = json.dumps(fields, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:32]


def sample_key(content: str, relative: str) -> str:
    """The plan's key of a file whose latent row an earlier file of its dataset (by relative path) holds.

    SimpleTuner trains every file, and users copy a file on purpose to weight it: byte-identical
    files share one latent row, but each is a sample of its own, drawn, captioned and noised by its
    own key. The first file keeps the content key as its sample key, so a dataset without copies
    plans exactly as before.
    """
    return hashlib.sha256(f"{content}\0{relative}".encode()).hexdigest()[:32]


def too_small_reason(settings: BucketSettings) -> str:
    unit = "px edge" if settings.mode == "pixel" or settings.resolution_type == "pixel_area" else "megapixels"
    return f"smaller than minimum_image_size {settings.minimum_image_size:g} ({unit})"


def place_images(item: DatasetWork, *, seed: int, vae_key: str) -> None:
    """Bucket, crop and key every discovered image of one dataset: ``item.rows``, by sample key."""
    placed: set[str] = set()
    # By relative path, so which of two identical files keeps the content key never changes.
    for image in sorted(item.images, key=lambda image: image.relative):
        placement = place(
            item.settings, image.width, image.height, crop_seed=crop_seed_for(seed, image.sha256)
        )
        if placement is None:
            item.skipped.append(
                SkippedFile(
                    dataset_id=item.dataset.id,
                    relative=image.relative,
                    reason=too_small_reason(item.settings),
                )
            )
            continue
        mask = item.masks.get(image.relative) if item.mask is not None else None
        key = content_key(image, placement, vae_key, mask)
        sample = sample_key(key, image.relative) if key in placed else key
        placed.add(key)
        item.rows[sample] = {
            "key": key,
            "sample": sample,
            "dataset_id": item.dataset.id,
            "source": image.relative,
            "caption_keys": [caption_key(caption) for caption in image.captions],
            "bucket": placement.label,
            "width": placement.bucket[0],
            "height": placement.bucket[1],
            "_path": image.path,
            "_placement": placement,
            "_captions": image.captions,
            "_original": (image.width, image.height),
            "_mask_path": mask.path if mask is not None else "",
        }


# ---- the build ------------------------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class BuildOptions:
    encoder_actors: int | None = None  # VAE actor pool size; default: one per GPU, else 1
    rebuild: bool = False


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


def role_prompts(run: RunConfig) -> dict[str, Any]:
    """Prompts encoded for roles other than captions: empty (caption dropout), negative, validation."""
    training = run.training
    validation: dict[str, str] = {}
    if training.validation_prompt:
        validation["validation"] = training.validation_prompt
    if training.user_prompt_library is not None:
        try:
            library = json.loads(Path(training.user_prompt_library).read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError, UnicodeDecodeError) as error:
            raise CacheError(
                f"{training.user_prompt_library}: cannot read the prompt library ({error})"
            ) from None
        if not isinstance(library, dict) or not all(isinstance(v, str) for v in library.values()):
            raise CacheError(
                f'{training.user_prompt_library}: expected a JSON object of "nickname": "prompt" pairs'
            )
        validation.update(library)
    return {"empty": "", "negative": training.validation_negative_prompt, "validation": validation}


@dataclass(frozen=True, kw_only=True)
class Encoders:
    """The two encoders of a build, identified before any work starts."""

    vae: EncoderIdentity
    text: EncoderIdentity


def cache_setting_problems(run: RunConfig) -> list[str]:
    """Everything about the caches that can be refused before any work, one line per problem:
    bucket settings, ``skip_file_discovery`` words, the text cache folder, the prompt library."""
    family_cls = get_family(run.training.model_family)
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


def cache_encoders(run: RunConfig) -> Encoders:
    """The encoders' identities, which need the model's files (or its hub snapshot): the first
    work of a build, for a run whose settings were checked (raytuner.preflight)."""
    family_cls = get_family(run.training.model_family)
    vae, text = encoder_identities(run, family_cls(model_path_of(run), revision=run.training.revision))
    return Encoders(vae=vae, text=text)


def build_cache(
    run: RunConfig, options: BuildOptions = BuildOptions(), encoders: Encoders | None = None
) -> CacheSummary:
    """Bring every cache of ``run`` up to date; Ray must be connected (see ``ray_session``)."""
    started = time.monotonic()
    family_cls = get_family(run.training.model_family)
    model_path = model_path_of(run)
    encoders = encoders or check_cache_settings(run)
    vae_identity, text_identity = encoders.vae, encoders.text

    work = [
        _open_latent_cache(run, dataset, family_cls, vae_identity, options) for dataset in image_datasets(run)
    ]
    listed = [item for item in work if item.listing is not None]
    if listed:
        probe_listings(listed)
    for item in listed:
        place_images(item, seed=run.seed, vae_key=vae_identity.key)

    text = _TextWork.open(run, text_identity, options, work)
    if text.todo:
        text.written = _encode_text(run, family_cls, model_path, text.folder, text_identity, text.todo)
    # Text first: once a latent row is committed, its caption is always in the committed text cache.
    text.commit(family_cls)

    for item in work:
        item.stale_shards = {row["shard"] for row in item.existing.values()}
    # images/s is measured over the image pipeline alone (read, crop, VAE, write), actor start-up included.
    encode_started = time.monotonic()
    _encode_latents(run, family_cls, model_path, vae_identity, work, options)
    encode_seconds = time.monotonic() - encode_started
    summaries = tuple(_commit_latents(item, vae_identity) for item in work)
    return CacheSummary(
        datasets=summaries,
        prompts=len(text.prompts),
        prompts_encoded=len(text.written),
        text_cache=str(text.folder),
        seconds=time.monotonic() - started,
        encode_seconds=encode_seconds,
    )


def _open_latent_cache(
    run: RunConfig,
    dataset: DatasetConfig,
    family_cls: type[ModelFamily],
    identity: EncoderIdentity,
    options: BuildOptions,
) -> DatasetWork:
    """One dataset's cache as committed (identity checked), and its files listed unless skipped."""
    item = DatasetWork(
        dataset=dataset,
        settings=bucket_settings(dataset, run, family_cls),
        cache=latent_cache_location(run, dataset),
        mask=mask_dataset(run, dataset),
    )
    committed, manifest = _load_committed(
        item.cache,
        kind="latents",
        encoder=identity,
        rebuild=options.rebuild,
        what=f"dataset '{dataset.id}' cache_dir_vae",
    )
    item.existing = {row["key"]: {k: row[k] for k in fmt.LOCATION_KEYS} for row in committed.values()}
    item.encoded_before = manifest.encoded if manifest is not None else 0
    if skips(dataset, "vae") or skips(dataset, "aspect"):
        if not committed:
            raise CacheError(
                f"dataset '{dataset.id}': skip_file_discovery skips encoding, but {item.cache} holds no cache yet; "
                "remove skip_file_discovery for the first build"
            )
        cached_masks = manifest.extra.get("mask_dataset") if manifest is not None else None
        if cached_masks != dataset.conditioning_data:
            raise CacheError(
                f"dataset '{dataset.id}': skip_file_discovery skips encoding, but {item.cache} was cached "
                f"{'with masks from ' + repr(cached_masks) if cached_masks else 'without loss masks'} and "
                f"conditioning_data is now {dataset.conditioning_data!r}; remove skip_file_discovery for one build"
            )
        item.rows = {
            sample: {**{k: v for k, v in row.items() if k not in fmt.LOCATION_COLUMNS}, "sample": sample}
            for sample, row in committed.items()
        }
        return item
    item.listing = discovery.list_dataset(dataset)
    if item.mask is not None:
        item.mask_listing = discovery.list_dataset(item.mask, captions=False)
    known = {row["shard"] for row in committed.values()}
    item.existing.update(_adopt_orphans(item.cache, kind="latents", encoder=identity, known=known))
    return item


@dataclass(kw_only=True)
class _TextWork:
    """The text cache: every prompt the run needs, what is cached already, and what to encode."""

    folder: Location
    identity: EncoderIdentity
    roles: dict[str, Any]
    prompts: dict[str, str]  # caption key -> prompt
    existing: dict[str, dict[str, Any]]  # caption key -> location (+ prompt)
    todo: list[dict[str, str]]
    written: dict[str, dict[str, Any]] = field(default_factory=dict)
    encoded_before: int = 0  # the folder's lifetime count of encoded prompts, from its manifest

    @classmethod
    def open(
        cls, run: RunConfig, identity: EncoderIdentity, options: BuildOptions, work: Sequence[DatasetWork]
    ) -> _TextWork:
        folder = text_cache_location(run)
        committed, manifest = _load_committed(
            folder,
            kind="text",
            encoder=identity,
            rebuild=options.rebuild,
            what="the text_embeds dataset's cache_dir",
        )
        existing = {
            key: {k: row[k] for k in ("prompt", *fmt.LOCATION_KEYS)} for key, row in committed.items()
        }
        known = {row["shard"] for row in committed.values()}
        for key, location in _adopt_orphans(folder, kind="text", encoder=identity, known=known).items():
            existing.setdefault(key, {**location, "prompt": None})
        roles = role_prompts(run)
        prompts = {
            caption_key(caption): caption
            for item in work
            for row in item.rows.values()
            for caption in row.get("_captions", ())
        }
        for prompt in (roles["empty"], roles["negative"], *roles["validation"].values()):
            prompts[caption_key(prompt)] = prompt
        skip = manifest is not None and any(skips(item.dataset, "text") for item in work)
        todo = (
            [] if skip else [{"key": k, "prompt": p} for k, p in sorted(prompts.items()) if k not in existing]
        )
        return cls(
            folder=folder,
            identity=identity,
            roles=roles,
            prompts=prompts,
            existing=existing,
            todo=todo,
            encoded_before=manifest.encoded if manifest is not None else 0,
        )

    def commit(self, family_cls: type[ModelFamily]) -> None:
        rows = {**self.existing, **self.written}
        missing = sorted(set(self.prompts) - set(rows))
        if missing:
            raise CacheError(
                f"{self.folder}: {len(missing)} prompt(s) are not in the text cache and skip_file_discovery skips "
                "text; remove 'text' from skip_file_discovery"
            )
        index = fmt.index_table(
            (
                {
                    "key": key,
                    "prompt": self.prompts.get(key, row.get("prompt") or ""),
                    **{k: row[k] for k in fmt.LOCATION_KEYS[1:]},
                }
                for key, row in rows.items()
            ),
            {"key": pa.string(), "prompt": pa.string()},
        )
        manifest = fmt.Manifest(
            kind="text",
            encoder=self.identity.identity,
            encoder_key=self.identity.key,
            shards=len({row["shard"] for row in rows.values()}),
            build=fmt.new_build_id(),
            encoded=self.encoded_before + len(self.written),
            extra={
                "tensors": list(family_cls.prompt_tensors),
                "roles": {
                    "empty": caption_key(self.roles["empty"]),
                    "negative": caption_key(self.roles["negative"]),
                    "validation": {
                        name: caption_key(prompt) for name, prompt in self.roles["validation"].items()
                    },
                },
            },
        )
        fmt.commit(self.folder, manifest, index)


def _pool(size: int) -> Any:
    import ray

    return ray.data.ActorPoolStrategy(size=size)


def _encode_text(
    run: RunConfig,
    family_cls: type[ModelFamily],
    model_path: str,
    folder: Location,
    identity: EncoderIdentity,
    todo: list[dict[str, str]],
) -> dict[str, dict[str, Any]]:
    import ray

    logger.info("encoding %d prompt(s) with the %s text side", len(todo), family_cls.name)
    schema = fmt.text_schema(family_cls.prompt_tensors)
    build_id = fmt.new_build_id()
    write_rows = text_dataset(run).write_batch_size
    dataset = (
        ray.data.from_items(todo)
        .map_batches(
            stages.TextEncoder,
            fn_constructor_kwargs={
                "family_name": family_cls.name,
                "model_path": model_path,
                "revision": run.training.revision,
            },
            batch_size=TEXT_BATCH,
            compute=_pool(1),
            num_gpus=actor_gpus(cluster_facts()),
        )
        .map_batches(
            functools.partial(
                stages.write_text_shards,
                cache=folder,
                schema=schema,
                encoder_key_=identity.key,
                build_id=build_id,
            ),
            batch_size=write_rows,
            batch_format="pyarrow",
        )
    )
    written: dict[str, dict[str, Any]] = {}
    batch: pa.Table  # batch_format="pyarrow"
    for batch in dataset.iter_batches(batch_format="pyarrow", batch_size=None):
        for result in batch.to_pylist():
            for location in fmt.shard_locations(result["keys"], result["shard"]):
                written[location["key"]] = location
    return written


def latent_todo_row(item: DatasetWork, row: Mapping[str, Any]) -> dict[str, Any]:
    """What the read-and-crop task gets for one image to encode: file, bucket, crop, and mask file."""
    placement: Placement = row["_placement"]
    return {
        "key": row["key"],
        "dataset_id": item.dataset.id,
        "path": row["_path"],
        "source": row["source"],
        "bucket": placement.label,
        "width": placement.bucket[0],
        "height": placement.bucket[1],
        "inter_w": placement.intermediary[0],
        "inter_h": placement.intermediary[1],
        "left": placement.left,
        "top": placement.top,
        "original_w": row["_original"][0],
        "original_h": row["_original"][1],
        # The mask is cropped with the image's placement, never one of its own.
        "mask_dataset_id": item.mask.id if item.mask is not None else "",
        "mask_path": row["_mask_path"],
    }


def latent_todo(work: Sequence[DatasetWork]) -> list[dict[str, Any]]:
    """The images to encode: each latent row a cache lacks once, however many identical files share it.

    One bucket after another, so that VAE batches and shards hold one image size.
    """
    todo: dict[tuple[str, str], dict[str, Any]] = {}
    for item in work:
        for row in item.rows.values():
            wanted = (item.dataset.id, row["key"])
            if row["key"] in item.existing or "_placement" not in row or wanted in todo:
                continue
            todo[wanted] = latent_todo_row(item, row)
    return sorted(todo.values(), key=lambda entry: (entry["dataset_id"], entry["bucket"], entry["key"]))


def _encode_latents(
    run: RunConfig,
    family_cls: type[ModelFamily],
    model_path: str,
    identity: EncoderIdentity,
    work: Sequence[DatasetWork],
    options: BuildOptions,
) -> None:
    import ray

    todo = latent_todo(work)  # one bucket after another
    if not todo:
        return
    # GPUs when the cluster has them or its autoscaler can add them (the request adds them).
    cluster = cluster_facts()
    gpus = actor_gpus(cluster)
    actors = options.encoder_actors or default_actor_count(cluster)
    by_id = {item.dataset.id: item for item in work}
    sources = {item.dataset.id: discovery.dataset_location(item.dataset) for item in work}
    sources.update({item.mask.id: discovery.dataset_location(item.mask) for item in work if item.mask})
    local_sources = {dataset_id: location for dataset_id, location in sources.items() if location.is_local}
    logger.info("encoding %d image(s) with %d VAE actor(s)%s", len(todo), actors, " on GPUs" if gpus else "")
    build_id = fmt.new_build_id()
    write_rows = min(by_id[todo[0]["dataset_id"]].dataset.write_batch_size, 4096)
    dataset = (
        ray.data.from_items(todo)
        # Half a logical CPU each: decoding waits on storage as much as it computes, and distinct
        # resources keep Ray Data from fusing it into the VAE actors (it would then run serially there).
        .map(functools.partial(stages.load_and_crop, sources=sources), num_cpus=0.5)
        .map_batches(
            stages.VaeEncoder,
            fn_constructor_kwargs={
                "family_name": family_cls.name,
                "model_path": model_path,
                "revision": run.training.revision,
                "local_sources": local_sources,
            },
            batch_size=run.training.vae_batch_size,
            compute=_pool(actors),
            num_gpus=gpus,
        )
        .map_batches(
            functools.partial(
                stages.write_latent_shards,
                caches={item.dataset.id: item.cache for item in work},
                encoder_key_=identity.key,
                build_id=build_id,
            ),
            batch_size=write_rows,
            batch_format="pyarrow",
        )
    )
    batch: pa.Table  # batch_format="pyarrow"
    for batch in dataset.iter_batches(batch_format="pyarrow", batch_size=None):
        for result in batch.to_pylist():
            item = by_id[result["dataset_id"]]
            if result["error"]:
                item.encode_skipped.extend(
                    SkippedFile(dataset_id=item.dataset.id, relative=source, reason=result["error"])
                    for source in _sources_sharing(item, result["source"])
                )
                continue
            item.bytes_by_bucket[result["bucket"]] += result["bytes"]
            item.vae_calls.update(result["vae_calls"])
            for location in fmt.shard_locations(result["keys"], result["shard"]):
                item.written[location["key"]] = location


def _sources_sharing(item: DatasetWork, source: str) -> list[str]:
    """Every file of the dataset whose latent row is the one encoded from ``source`` (itself included)."""
    key = next(row["key"] for row in item.rows.values() if row["source"] == source)
    return sorted(row["source"] for row in item.rows.values() if row["key"] == key)


def shared_latents(rows: Iterable[Mapping[str, Any]]) -> list[list[str]]:
    """The groups of identical files that share one latent row, each group's files sorted."""
    groups: dict[str, list[str]] = {}
    for row in rows:
        groups.setdefault(row["key"], []).append(row["source"])
    return sorted(sorted(files) for files in groups.values() if len(files) > 1)


# A latent index row, besides where its latent row is: ``key`` is the content key of the latent
# row, ``sample`` the file's key in the plan (identical files share a key, never a sample).
LATENT_INDEX_COLUMNS: dict[str, pa.DataType] = {
    "key": pa.string(),
    "sample": pa.string(),
    "dataset_id": pa.string(),
    "source": pa.string(),
    "caption_keys": pa.list_(pa.string()),
    "bucket": pa.string(),
    "width": pa.int32(),
    "height": pa.int32(),
}


def _commit_latents(item: DatasetWork, identity: EncoderIdentity) -> DatasetSummary:
    skipped = item.skipped + item.encode_skipped
    locations = {**item.existing, **item.written}
    live = [row for row in item.rows.values() if row["key"] in locations]
    # One index row per file: identical files point at the same latent row, each with its sample key.
    index_rows = [
        {
            **{name: row[name] for name in LATENT_INDEX_COLUMNS},
            **{name: locations[row["key"]][name] for name in fmt.LOCATION_COLUMNS},
        }
        for row in live
    ]
    index = fmt.index_table(index_rows, LATENT_INDEX_COLUMNS)
    live_shards = {row["shard"] for row in index_rows}
    manifest = fmt.Manifest(
        kind="latents",
        encoder=identity.identity,
        encoder_key=identity.key,
        shards=len(live_shards),
        build=fmt.new_build_id(),
        encoded=item.encoded_before + len(item.written),
        extra={
            "dataset": item.dataset.id,
            "settings": asdict(item.settings),
            # Readers check this against conditioning_data: a run never trains unmasked by accident.
            **({"mask_dataset": item.mask.id} if item.mask is not None else {}),
        },
    )
    fmt.commit(item.cache, manifest, index)
    # Only now, with the new index committed, are shards no live row points at safe to remove.
    filesystem, root = item.cache.resolve()
    for shard in sorted((item.stale_shards | {loc["shard"] for loc in item.written.values()}) - live_shards):
        try:
            filesystem.delete_file(posixpath.join(root, shard))
        except (OSError, pa.ArrowException) as error:
            logger.warning(
                "could not remove unused shard %s", describe_error(item.cache.child(shard).uri, error)
            )
    buckets = Counter(row["bucket"] for row in live)
    # Rows, not files: identical files encoded in this build count once.
    encoded = Counter({row["key"]: row["bucket"] for row in live if row["key"] in item.written}.values())
    shared = shared_latents(live)
    shared_files = sum(len(files) for files in shared)
    notes = [shared_note(shared_files)] if shared_files else []
    report = _write_report(item, skipped, buckets, shared=shared, notes=notes)
    if skipped:
        logger.warning(
            "dataset '%s': %d file(s) skipped (listed in %s)", item.dataset.id, len(skipped), report
        )
    for note in notes:
        logger.info("dataset '%s': %s (listed in %s)", item.dataset.id, note, report)
    return DatasetSummary(
        dataset_id=item.dataset.id,
        cache=str(item.cache),
        images=len(live),
        encoded=sum(encoded.values()),
        skipped=len(skipped),
        shared=shared_files,
        bytes_written=sum(item.bytes_by_bucket.values()),
        vae_batches=len(item.vae_calls),
        buckets=tuple(
            BucketSummary(
                dataset_id=item.dataset.id,
                bucket=bucket,
                images=count,
                encoded=encoded.get(bucket, 0),
                bytes_written=item.bytes_by_bucket.get(bucket, 0),
            )
            for bucket, count in sorted(buckets.items(), key=lambda pair: _bucket_order(pair[0]))
        ),
        report=report,
    )


def _bucket_order(label: str) -> tuple[float, int]:
    width, _, height = label.partition("x")
    return (int(width), int(height)) if width.isdigit() and height.isdigit() else (math.inf, 0)


def _write_report(
    item: DatasetWork,
    skipped: Sequence[SkippedFile],
    buckets: Mapping[str, int],
    *,
    shared: Sequence[Sequence[str]],
    notes: Sequence[str],
) -> str:
    report = {
        "dataset": item.dataset.id,
        "source": str(discovery.dataset_location(item.dataset)),
        "images": sum(buckets.values()),
        "buckets": dict(sorted(buckets.items())),
        "skipped": [{"file": entry.relative, "reason": entry.reason} for entry in skipped],
        # Not skipped: identical files each train as a sample, and only share their latents.
        "notes": list(notes),
        "shared_latents": [list(files) for files in shared],
    }
    filesystem, root = item.cache.resolve()
    try:
        write_bytes_atomic(
            filesystem, posixpath.join(root, fmt.REPORT_NAME), (json.dumps(report, indent=2) + "\n").encode()
        )
    except (OSError, pa.ArrowException) as error:
        raise StorageError(describe_error(item.cache.child(fmt.REPORT_NAME).uri, error)) from None
    return str(item.cache.child(fmt.REPORT_NAME))
