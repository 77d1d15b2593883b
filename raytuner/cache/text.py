"""The text cache: every prompt a run needs (captions, the empty and negative prompts, the
validation prompts and prompt library), encoded once each on an actor pool and committed."""

from __future__ import annotations

import functools
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypedDict

import pyarrow as pa

from raytuner.cache import format as fmt
from raytuner.cache import stages
from raytuner.cache.folders import adopt_orphans, load_committed
from raytuner.cache.format import CacheError
from raytuner.cache.keys import caption_key
from raytuner.cache.rows import DatasetWork
from raytuner.cache.settings import (
    EncoderIdentity,
    role_prompts,
    skips,
    text_batch_size,
    text_cache_location,
    text_dataset,
)
from raytuner.config.run import RunConfig
from raytuner.placement import actor_gpus, cluster_facts
from raytuner.storage import Location

if TYPE_CHECKING:
    # Only annotations name the family class: importing it would load torch and diffusers
    # into every process that only reads or writes the cache's files.
    from raytuner.models.base import ModelFamily

logger = logging.getLogger(__name__)

# Prompts per Ray Data batch handed to the encoder actor: a whole number of its forward passes
# (text_encoder_batch_size each), at least this many to keep the per-batch overhead small.
TEXT_BATCH = 64


class PromptTodo(TypedDict):
    """One prompt to encode, as the text encoder's Ray Data stage takes it."""

    key: str
    prompt: str


@dataclass(kw_only=True)
class TextWork:
    """The text cache: every prompt the run needs, what is cached already, and what to encode."""

    folder: Location
    identity: EncoderIdentity
    roles: dict[str, Any]
    prompts: dict[str, str]  # caption key -> prompt
    existing: dict[str, dict[str, Any]]  # caption key -> location (+ prompt)
    todo: list[PromptTodo]
    written: dict[str, dict[str, Any]] = field(default_factory=dict)
    encoded_before: int = 0  # the folder's lifetime count of encoded prompts, from its manifest

    @classmethod
    def open(
        cls, run: RunConfig, identity: EncoderIdentity, work: Sequence[DatasetWork], *, rebuild: bool = False
    ) -> TextWork:
        folder = text_cache_location(run)
        committed, manifest = load_committed(
            folder,
            kind="text",
            encoder=identity,
            rebuild=rebuild,
            what="the text_embeds dataset's cache_dir",
        )
        existing = {
            key: {k: row[k] for k in ("prompt", *fmt.LOCATION_KEYS)} for key, row in committed.items()
        }
        known = {row["shard"] for row in committed.values()}
        for key, location in adopt_orphans(folder, kind="text", encoder=identity, known=known).items():
            existing.setdefault(key, {**location, "prompt": None})
        roles = role_prompts(run)
        # The captions of files this build read; rows taken from a committed index unread
        # (skip_file_discovery) bring none, and their prompts must be cached already.
        prompts = {
            caption_key(caption): caption
            for item in work
            for row in item.rows.values()
            if row.file is not None
            for caption in row.file.captions
        }
        for prompt in (roles["empty"], roles["negative"], *roles["validation"].values()):
            prompts[caption_key(prompt)] = prompt
        skip = manifest is not None and any(skips(item.dataset, "text") for item in work)
        todo: list[PromptTodo] = (
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


def encode_text(
    run: RunConfig,
    family_cls: type[ModelFamily],
    model_path: str,
    text: TextWork,
) -> dict[str, dict[str, Any]]:
    """Encode ``text.todo`` on one text-encoder actor and write its shards: caption key -> location."""
    import ray

    logger.info("encoding %d prompt(s) with the %s text side", len(text.todo), family_cls.name)
    schema = fmt.text_schema(family_cls.prompt_tensors)
    build_id = fmt.new_build_id()
    write_rows = text_dataset(run).write_batch_size
    per_pass = text_batch_size(run)
    dataset = (
        ray.data.from_items(list(text.todo))
        .map_batches(
            stages.TextEncoder,
            fn_constructor_kwargs={
                "family_name": family_cls.name,
                "model_path": model_path,
                "revision": run.training.model.revision,
                "batch_size": per_pass,
            },
            batch_size=-(-TEXT_BATCH // per_pass) * per_pass,
            compute=stages.actor_pool(1),
            num_gpus=actor_gpus(cluster_facts()),
        )
        .map_batches(
            functools.partial(
                stages.write_text_shards,
                cache=text.folder,
                schema=schema,
                encoder_key_=text.identity.key,
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
