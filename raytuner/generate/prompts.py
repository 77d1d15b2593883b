"""Prompt lists for batch generation: what a prompts file may hold, read into ``ImageRequest``s.

Accepted files:

- ``.txt``: one prompt per line; blank lines and lines starting with ``#`` are skipped.
- ``.json``: a list of prompts (strings), a list of objects, or SimpleTuner's
  ``user_prompt_library.json`` form (``{"nickname": "prompt", ...}``), so a prompt library used for
  validation during training renders as is. An object holds ``prompt`` and optionally ``name``,
  ``negative_prompt``, ``seed``, ``resolution`` (``WxH`` or ``N``) and ``num_images``.

Every image's seed is its prompt's seed (``--seed`` unless the entry has its own) plus its number
among that prompt's images: seeds never depend on where a prompt sits in the file, so editing
the file leaves the other prompts' images as they are and a resumed run skips them.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from raytuner.errors import RaytunerError

PROMPT_FILE_SUFFIXES = (".txt", ".json")
_ENTRY_KEYS = {"prompt", "name", "negative_prompt", "seed", "resolution", "num_images"}
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")
_NAME_LENGTH = 48


class PromptFileError(RaytunerError, ValueError):
    """A prompts file that cannot be read, stated in one line."""


@dataclass(frozen=True, kw_only=True)
class ImageRequest:
    """One image to render: everything that decides its pixels besides the generation settings."""

    name: str
    prompt: str
    negative_prompt: str | None  # None: the settings' negative prompt (the family's default if unset)
    seed: int
    width: int | None  # None: the settings' resolution (the pipeline's default if unset)
    height: int | None

    @property
    def file_name(self) -> str:
        """``<name>-s<seed>-<digest>.png``: the digest covers the prompt, negative prompt and size,
        so a changed entry gets a new file and never overwrites the image of the old one."""
        content = json.dumps(
            [self.prompt, self.negative_prompt, self.width, self.height], ensure_ascii=False
        ).encode("utf-8")
        digest = hashlib.sha256(content).hexdigest()[:10]
        return f"{self.name}-s{self.seed}-{digest}.png"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def safe_name(text: str, *, fallback: str = "image") -> str:
    """Letters, digits, ``.``, ``_`` and ``-`` of ``text`` (others become ``_``), at most 48 characters."""
    cleaned = _UNSAFE.sub("_", text.strip()).strip("._")[:_NAME_LENGTH].strip("._")
    return cleaned or fallback


def parse_resolution(value: str, *, multiple: int, where: str = "--resolution") -> tuple[int, int]:
    """``WxH`` or ``N`` (``NxN``) in pixels -> (width, height); each edge a multiple of ``multiple``."""
    text = str(value).strip().lower()
    match = re.fullmatch(r"(\d+)(?:x(\d+))?", text)
    if not match:
        raise ValueError(f"{where} {value!r}: expected WxH or N in pixels, e.g. 1024x768 or 1024")
    width = int(match.group(1))
    height = int(match.group(2) or match.group(1))
    if width < multiple or height < multiple or width % multiple or height % multiple:
        suggestion = f"{max(multiple, round(width / multiple) * multiple)}x{max(multiple, round(height / multiple) * multiple)}"
        raise ValueError(
            f"{where} {value!r}: width and height must be positive multiples of {multiple} pixels "
            f"for this model (e.g. {suggestion})"
        )
    return width, height


def single_prompt(
    prompt: str, *, negative_prompt: str | None, seed: int, num_images: int, name: str | None = None
) -> list[ImageRequest]:
    """The requests of ``--prompt``: ``num_images`` images of one prompt with consecutive seeds."""
    if not prompt.strip():
        raise PromptFileError("--prompt is empty: give the text to render")
    stem = safe_name(name or prompt)
    return [
        ImageRequest(
            name=stem,
            prompt=prompt,
            negative_prompt=negative_prompt,
            seed=seed + number,
            width=None,
            height=None,
        )
        for number in range(num_images)
    ]


def read_prompt_file(
    path: Path, *, seed: int, num_images: int, multiple: int, negative_prompt: str | None = None
) -> list[ImageRequest]:
    """Every image a prompts file asks for, in file order (see the module docstring for the forms)."""
    if not path.is_file():
        raise PromptFileError(f"prompts file {path} does not exist")
    if path.suffix.lower() not in PROMPT_FILE_SUFFIXES:
        raise PromptFileError(
            f"prompts file {path}: expected a .txt file (one prompt per line) or a .json file "
            "(a list of prompts or objects, or a user_prompt_library)"
        )
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise PromptFileError(f"prompts file {path} cannot be read as UTF-8 text: {error}") from None
    if path.suffix.lower() == ".txt":
        entries: list[dict[str, Any]] = [
            {"prompt": line.strip()}
            for line in text.splitlines()
            if line.strip() and not line.lstrip().startswith("#")
        ]
    else:
        entries = _json_entries(path, text)
    if not entries:
        raise PromptFileError(f"prompts file {path} holds no prompts")
    requests: list[ImageRequest] = []
    for position, entry in enumerate(entries, start=1):
        requests.extend(
            _entry_requests(
                path,
                position,
                entry,
                seed=seed,
                num_images=num_images,
                multiple=multiple,
                negative_prompt=negative_prompt,
            )
        )
    _refuse_duplicates(path, requests)
    return requests


def _json_entries(path: Path, text: str) -> list[dict[str, Any]]:
    try:
        content = json.loads(text)
    except json.JSONDecodeError as error:
        raise PromptFileError(
            f"prompts file {path}: invalid JSON at line {error.lineno} column {error.colno}: {error.msg}"
        ) from None
    if isinstance(content, dict):  # user_prompt_library: nickname -> prompt
        entries = []
        for nickname, prompt in content.items():
            if not isinstance(prompt, str):
                raise PromptFileError(
                    f"prompts file {path}: entry {nickname!r} is {type(prompt).__name__}; a prompt library "
                    "maps each nickname to its prompt text"
                )
            entries.append({"name": nickname, "prompt": prompt})
        return entries
    if not isinstance(content, list):
        raise PromptFileError(
            f"prompts file {path}: expected a JSON list of prompts or an object of nickname -> prompt, "
            f"got {type(content).__name__}"
        )
    return [{"prompt": item} if isinstance(item, str) else item for item in content]


def _entry_requests(
    path: Path,
    position: int,
    entry: Any,
    *,
    seed: int,
    num_images: int,
    multiple: int,
    negative_prompt: str | None,
) -> list[ImageRequest]:
    where = f"prompts file {path}, entry {position}"
    if not isinstance(entry, dict):
        raise PromptFileError(f"{where}: expected a prompt string or an object, got {type(entry).__name__}")
    unknown = sorted(set(entry) - _ENTRY_KEYS)
    if unknown:
        raise PromptFileError(
            f"{where}: unknown key(s) {', '.join(unknown)} (known: {', '.join(sorted(_ENTRY_KEYS))})"
        )
    prompt = entry.get("prompt")
    if not isinstance(prompt, str) or not prompt.strip():
        raise PromptFileError(f"{where}: 'prompt' must be non-empty text")
    for key in ("name", "negative_prompt"):
        if key in entry and not isinstance(entry[key], str):
            raise PromptFileError(f"{where}: {key!r} must be text, got {entry[key]!r}")
    for key in ("seed", "num_images"):
        value = entry.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
            raise PromptFileError(f"{where}: {key!r} must be a non-negative integer, got {value!r}")
    count = entry.get("num_images", num_images)
    if count < 1:
        raise PromptFileError(f"{where}: 'num_images' must be at least 1")
    width = height = None
    if entry.get("resolution") is not None:
        try:
            width, height = parse_resolution(
                str(entry["resolution"]), multiple=multiple, where=f"{where}: resolution"
            )
        except ValueError as error:
            raise PromptFileError(str(error)) from None
    first_seed = entry.get("seed", seed)
    name = safe_name(entry.get("name") or prompt)
    return [
        ImageRequest(
            name=name,
            prompt=prompt,
            negative_prompt=entry.get("negative_prompt", negative_prompt),
            seed=first_seed + number,
            width=width,
            height=height,
        )
        for number in range(count)
    ]


def _refuse_duplicates(path: Path, requests: Sequence[ImageRequest]) -> None:
    seen: set[str] = set()
    for request in requests:
        if request.file_name in seen:
            raise PromptFileError(
                f"prompts file {path}: {request.prompt[:60]!r} with seed {request.seed} is asked for twice; "
                "give the repeats their own 'seed' or use 'num_images'"
            )
        seen.add(request.file_name)
