"""A dataset's ``parquet`` block: the metadata table of ``metadata_backend: parquet``.

SimpleTuner's keys and defaults (``configure_parquet_database``): ``path`` (required; a key in
the dataset's bucket for ``type: aws``), ``filename_column`` (``id``), ``caption_column``
(``description``; a list of columns gives each image several captions),
``fallback_caption_column`` and ``identifier_includes_extension`` (false: the table names images
without their extension).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from raytuner.config.fields import problem
from raytuner.config.keys import KeyFindings, sort_block_keys

PARQUET_BLOCK = "parquet"
# The table file formats read, by file name ending; anything else is read as Parquet, as in SimpleTuner.
TABLE_FORMATS = {".csv": "csv", ".jsonl": "jsonl"}


@dataclass(frozen=True, kw_only=True)
class ParquetSettings:
    path: str
    filename_column: str = "id"
    caption_column: tuple[str, ...] = ("description",)
    fallback_caption_column: str | None = None
    identifier_includes_extension: bool = False

    @property
    def table_format(self) -> str:
        lowered = self.path.lower()
        for ending, name in TABLE_FORMATS.items():
            if lowered.endswith(ending):
                return name
        return "parquet"


PARQUET_KEYS: frozenset[str] = frozenset(
    f"{PARQUET_BLOCK}.{name}"
    for name in (
        "path",
        "filename_column",
        "caption_column",
        "fallback_caption_column",
        "identifier_includes_extension",
    )
)


def parse_parquet_block(
    value: Any, *, where: str, place: str, strict: bool, findings: KeyFindings
) -> ParquetSettings | None:
    """The typed block, or None with a problem appended for each bad value."""
    label = f"{where}: {place}"
    if not isinstance(value, dict):
        findings.problems.append(
            problem(label, PARQUET_BLOCK, value, 'an object like {"path": "captions.parquet"}')
        )
        return None
    kept = sort_block_keys(
        PARQUET_BLOCK, value, fields=PARQUET_KEYS, where=where, place=place, strict=strict, findings=findings
    )
    before = len(findings.problems)
    path = kept.get("path")
    if not isinstance(path, str) or not path.strip():
        findings.problems.append(
            problem(
                label,
                "parquet.path",
                path,
                "the metadata table's file (.parquet, .jsonl or .csv)",
                "set it beside the images' folder, or as a key in the dataset's bucket for type aws",
            )
        )
    settings: dict[str, Any] = {}
    for key in ("filename_column", "fallback_caption_column"):
        if key in kept and kept[key] is not None:
            if not isinstance(kept[key], str) or not kept[key]:
                findings.problems.append(problem(label, f"parquet.{key}", kept[key], "a column name"))
            else:
                settings[key] = kept[key]
    columns = kept.get("caption_column")
    if columns is not None:
        names = columns if isinstance(columns, list) else [columns]
        if not names or not all(isinstance(n, str) and n for n in names):
            findings.problems.append(
                problem(label, "parquet.caption_column", columns, "a column name or a list of column names")
            )
        else:
            settings["caption_column"] = tuple(names)
    flag = kept.get("identifier_includes_extension")
    if flag is not None:
        if not isinstance(flag, bool):
            findings.problems.append(
                problem(label, "parquet.identifier_includes_extension", flag, "true or false")
            )
        else:
            settings["identifier_includes_extension"] = flag
    if len(findings.problems) > before:
        return None
    assert isinstance(path, str)
    return ParquetSettings(path=path.strip(), **settings)
