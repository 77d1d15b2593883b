"""Where a path written inside a config file points.

SimpleTuner opens paths relative to the working directory. raytuner does the same first, and
when that finds nothing it looks relative to the folder of the file that names the path, then
for the same file name in that folder — so ``configs/omnigen/config.json`` saying
``config/lycoris_config.json`` finds ``configs/omnigen/lycoris_config.json`` from any working
directory. Outputs and caches, which need not exist yet, resolve against the working directory.
"""

from __future__ import annotations

from pathlib import Path


def has_scheme(value: str) -> bool:
    """True for URIs such as ``s3://bucket/prefix`` (never made into local paths)."""
    return "://" in value


def input_candidates(value: str | Path, *, named_in: Path, by_name: bool = True) -> list[Path]:
    """The places looked at for an input path, in order, without duplicates."""
    path = Path(value).expanduser()
    if path.is_absolute():
        return [path]
    folder = named_in.resolve().parent
    candidates = [Path.cwd() / path, folder / path]
    if by_name:
        candidates.append(folder / path.name)
    unique: list[Path] = []
    for candidate in candidates:
        if candidate.resolve() not in {seen.resolve() for seen in unique}:
            unique.append(candidate)
    return unique


def find_input_file(value: str | Path, *, named_in: Path) -> Path | None:
    """The first existing file among the candidates, resolved; None when there is none."""
    for candidate in input_candidates(value, named_in=named_in):
        if candidate.is_file():
            return candidate.resolve()
    return None


def find_input_dir(value: str | Path, *, named_in: Path) -> Path:
    """An existing folder among cwd and the naming file's folder; else the cwd-relative path.

    A missing folder is not an error here: the pre-flight check reports it, naming this path.
    """
    for candidate in input_candidates(value, named_in=named_in, by_name=False):
        if candidate.is_dir():
            return candidate.resolve()
    return output_path(value)


def output_path(value: str | Path) -> Path:
    """An output or cache location, relative to the working directory."""
    return (Path.cwd() / Path(value).expanduser()).resolve()


def display(path: Path) -> str:
    """A path as shown in messages: relative to the working directory when below it."""
    try:
        return str(path.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)
