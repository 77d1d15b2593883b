"""Encoder identity: which VAE or text side wrote a cache, as a fingerprint of its files.

A cache row is only valid for the encoder that produced it, so every manifest and every shard
records the encoder key; a cache written by another VAE or text encoder is refused, never mixed
in. The fingerprint covers each component folder's files: small files (configs, tokenizers)
by their full SHA-256, weight files by their size and the SHA-256 of their first and last
8 MiB (hashing every byte of a 10 GB T5 would add a minute to each start, and a re-trained
checkpoint changes both ends of its tensors anyway). A hub id is resolved to its snapshot's
commit, which pins the weights; only the small files are fetched for that.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from raytuner.cache.format import CacheError

WHOLE_FILE_LIMIT = 64 * 2**20
EDGE_BYTES = 8 * 2**20
_SMALL_PATTERNS = ("*.json", "*.txt", "*.model", "*.jinja")


def _file_fingerprint(path: Path) -> str:
    size = path.stat().st_size
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        if size <= WHOLE_FILE_LIMIT:
            digest.update(handle.read())
        else:
            digest.update(handle.read(EDGE_BYTES))
            handle.seek(size - EDGE_BYTES)
            digest.update(handle.read(EDGE_BYTES))
            digest.update(str(size).encode())
    return digest.hexdigest()


def _folder_fingerprint(folder: Path) -> dict[str, str]:
    return {
        str(path.relative_to(folder)): _file_fingerprint(path)
        for path in sorted(folder.rglob("*"))
        if path.is_file() and not path.name.startswith(".")
    }


def _hub_snapshot(repo_id: str, subfolders: Sequence[str], revision: str | None) -> tuple[Path, str]:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    patterns = [
        "model_index.json",
        *(f"{sub}/{pattern}" for sub in subfolders for pattern in _SMALL_PATTERNS),
    ]
    try:
        folder = Path(snapshot_download(repo_id, revision=revision, allow_patterns=patterns))
    except (LocalEntryNotFoundError, HfHubHTTPError, OSError, ValueError) as error:
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise CacheError(
            f"pretrained_model_name_or_path '{repo_id}': cannot read the model's files to identify its encoders "
            f"({first}); log in with `hf auth login`, or point it at a local copy of the model"
        ) from None
    return folder, folder.name


def component_identity(
    model_path: str, subfolders: Sequence[str], *, revision: str | None, settings: dict[str, Any]
) -> dict[str, Any]:
    """A JSON-ready description of the components in ``subfolders`` of ``model_path``."""
    local = Path(model_path).expanduser()
    identity: dict[str, Any] = {"model": model_path, "revision": revision, "settings": settings}
    if local.is_dir():
        missing = [sub for sub in subfolders if not (local / sub).is_dir()]
        if missing:
            raise CacheError(
                f"pretrained_model_name_or_path '{model_path}': no {', '.join(missing)} folder; "
                "expected a diffusers model folder (model_index.json and one folder per component)"
            )
        identity["files"] = {sub: _folder_fingerprint(local / sub) for sub in subfolders}
    else:
        snapshot, commit = _hub_snapshot(model_path, subfolders, revision)
        identity["commit"] = commit
        identity["files"] = {
            sub: _folder_fingerprint(snapshot / sub) for sub in subfolders if (snapshot / sub).is_dir()
        }
    return identity


def encoder_key(identity: dict[str, Any]) -> str:
    """A short stable hash of an identity (what shards and rows are keyed by)."""
    canonical = json.dumps(identity, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(canonical.encode()).hexdigest()[:24]


def describe(identity: dict[str, Any]) -> str:
    """One line naming an identity for error messages."""
    model = identity.get("model", "?")
    where = f"@{identity['commit'][:10]}" if identity.get("commit") else ""
    return f"{identity.get('family', '?')} {identity.get('component', '?')} of {os.fspath(model)}{where}"
