"""A ``type: huggingface`` dataset entry: SimpleTuner's ``huggingface`` block, its defaults and checks.

Part of reading ``multidatabackend.json`` (raytuner/config/datasets.py calls these for each entry).
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any

from raytuner.config.fields import problem
from raytuner.config.keys import KeyFindings, sort_key

if TYPE_CHECKING:
    from raytuner.config.datasets import DatasetConfig

# Keys of a type huggingface dataset that SimpleTuner reads at the top level or, when unset there,
# from its "huggingface" block; raytuner stores them as the top-level fields.
HUB_SHARED_KEYS = ("dataset_name", "split", "revision", "image_column")
# Keys read only from the "huggingface" block: the caption columns.
HUB_CAPTION_KEYS = ("caption_column", "fallback_caption_column", "description_column")


def read_hub_block(
    block: Any, values: dict[str, Any], *, where: str, place: str, strict: bool, findings: KeyFindings
) -> dict[str, Any]:
    """Read SimpleTuner's ``huggingface`` block of a dataset entry.

    Its dataset_name, split, revision and image_column fill the top-level keys left unset (the
    top level wins, as in SimpleTuner); its caption columns are returned for the derived fields;
    every other key is sorted by the compatibility table as ``huggingface.<key>``.
    """
    if block is None:
        return {}
    label = f"{where}: {place}"
    if not isinstance(block, dict):
        findings.problems.append(
            problem(
                label, "huggingface", block, "an object of Hugging Face dataset settings", "write it as {...}"
            )
        )
        return {}
    derived_values: dict[str, Any] = {}
    for key, value in block.items():
        if key in HUB_SHARED_KEYS:
            values.setdefault(key, value)
        elif key in HUB_CAPTION_KEYS:
            derived_values[key] = value
        else:
            sort_key(
                f"huggingface.{key}",
                value,
                scope="dataset",
                where=where,
                place=place,
                fields=frozenset(),
                strict=strict,
                findings=findings,
            )
    return derived_values


def hub_defaults(dataset: DatasetConfig, values: dict[str, Any], block: dict[str, Any]) -> DatasetConfig:
    """A huggingface dataset's defaults (SimpleTuner's): huggingface metadata and captions, and the
    caption columns of its ``huggingface`` block."""
    if dataset.type != "huggingface":
        return dataset
    changes: dict[str, Any] = {}
    if "metadata_backend" not in values:
        changes["metadata_backend"] = "huggingface"
    if "caption_strategy" not in values:
        changes["caption_strategy"] = "huggingface"
    columns = block.get("caption_column")
    if columns is not None:
        changes["caption_columns"] = tuple(columns) if isinstance(columns, list) else (columns,)
    if block.get("fallback_caption_column") is not None:
        changes["fallback_caption_column"] = block["fallback_caption_column"]
    if block.get("description_column") is not None:
        changes["description_column"] = block["description_column"]
    return dataclasses.replace(dataset, **changes)


def check_hub_keys_elsewhere(
    dataset: DatasetConfig, values: dict[str, Any], block: Any, *, label: str, problems: list[str]
) -> None:
    """Hugging Face keys on another type of dataset would be ignored: each is named instead."""
    if dataset.type == "huggingface":
        return
    named = [key for key in HUB_SHARED_KEYS if key in values] + (["huggingface"] if block is not None else [])
    for key in named:
        problems.append(
            f"{label}: '{key}' is read only for a dataset of type huggingface; remove it, "
            'or set "type": "huggingface"'
        )


def _check_hub_columns(dataset: DatasetConfig, *, label: str, problems: list[str]) -> None:
    names: dict[str, tuple[Any, ...]] = {
        "huggingface.caption_column": dataset.caption_columns,
        "huggingface.description_column": (dataset.description_column,),
    }
    if dataset.fallback_caption_column is not None:
        names["huggingface.fallback_caption_column"] = (dataset.fallback_caption_column,)
    for key, columns in names.items():
        if not columns or not all(isinstance(column, str) and column.strip() for column in columns):
            shown = list(columns) if len(columns) != 1 else columns[0]
            problems.append(
                problem(label, key, shown, "a column name (or, for caption_column, a list of them)")
            )


def check_hub_dataset(dataset: DatasetConfig, *, label: str, problems: list[str]) -> None:
    """The keys of a type huggingface dataset, and the huggingface values on other datasets."""
    if dataset.type != "huggingface":
        for key in ("metadata_backend", "caption_strategy"):
            if getattr(dataset, key) == "huggingface":
                problems.append(
                    problem(
                        label, key, "huggingface", "a type huggingface dataset", 'set "type": "huggingface"'
                    )
                )
        return
    if dataset.dataset_type not in ("image", "eval"):
        problems.append(
            problem(
                label,
                "type",
                "huggingface",
                f"a local or aws dataset for dataset_type {dataset.dataset_type} "
                "(huggingface datasets are read as image or eval datasets)",
            )
        )
    if not dataset.dataset_name:
        problems.append(
            f"{label}: 'dataset_name' is required for a dataset of type huggingface; set it to the Hub id "
            "(user/name) or to a folder written by datasets' save_to_disk"
        )
    if dataset.metadata_backend != "huggingface":
        problems.append(
            problem(
                label, "metadata_backend", dataset.metadata_backend, "huggingface for a huggingface dataset"
            )
        )
    if dataset.caption_strategy not in ("huggingface", "instanceprompt"):
        problems.append(
            problem(
                label,
                "caption_strategy",
                dataset.caption_strategy,
                "huggingface (the caption columns) or instanceprompt for a huggingface dataset",
            )
        )
    if dataset.conditioning_data is not None:
        problems.append(
            problem(
                label,
                "conditioning_data",
                dataset.conditioning_data,
                "no loss mask on a huggingface dataset (not implemented)",
                "use a local or aws image dataset for masked loss",
            )
        )
    _check_hub_columns(dataset, label=label, problems=problems)
