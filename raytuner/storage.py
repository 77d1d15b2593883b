"""Where datasets and caches live: a local folder, a shared filesystem, object storage, or a Hugging Face dataset.

A :class:`Location` is a root plus the settings needed to open it (S3 endpoint, region and
credentials), small enough to send to every Ray task so that every node opens the same place.
Local paths and ``s3://`` / ``gs://`` URIs both resolve to a ``pyarrow.fs`` filesystem.

Credentials are taken from the environment by default (pyarrow's AWS credential chain:
``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, ``AWS_SESSION_TOKEN``, profiles, instance roles).
Keys written in ``multidatabackend.json`` are honoured too, but never shown: a Location prints
as its URI, and its secrets are left out of ``repr`` and of everything raytuner writes.
"""

from __future__ import annotations

import functools
import os
import posixpath
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlparse

import pyarrow as pa
import pyarrow.fs as pafs

from raytuner.config.paths import has_scheme
from raytuner.errors import RaytunerError

SCHEMES = ("file", "s3", "gs", "gcs")


class StorageError(RaytunerError, RuntimeError):
    """A location that cannot be opened, read or written; the message names it and the fix."""


@dataclass(frozen=True, kw_only=True)
class S3Settings:
    """How to reach an S3-compatible store. ``None`` fields fall back to pyarrow's defaults."""

    endpoint_url: str | None = None
    region: str | None = None
    access_key_id: str | None = field(default=None, repr=False)
    secret_access_key: str | None = field(default=None, repr=False)
    session_token: str | None = field(default=None, repr=False)

    def filesystem(self) -> pafs.S3FileSystem:
        options: dict[str, object] = {}
        if self.endpoint_url:
            parsed = urlparse(
                self.endpoint_url if "://" in self.endpoint_url else f"https://{self.endpoint_url}"
            )
            options["endpoint_override"] = parsed.netloc or parsed.path
            options["scheme"] = parsed.scheme or "https"
            # Custom endpoints (MinIO, moto, Ceph) address buckets by path, not virtual host.
            options["force_virtual_addressing"] = False
        if self.region:
            options["region"] = self.region
        if self.access_key_id and self.secret_access_key:
            options["access_key"] = self.access_key_id
            options["secret_key"] = self.secret_access_key
            if self.session_token:
                options["session_token"] = self.session_token
        return pafs.S3FileSystem(**options)


@dataclass(frozen=True, kw_only=True)
class HubRows:
    """Where a Hugging Face dataset's rows come from and which columns hold images and captions."""

    dataset_id: str
    name: str  # Hub id, or an absolute local folder
    split: str = "train"
    revision: str | None = None
    image_column: str = "image"
    caption_columns: tuple[str, ...] = ("caption",)
    fallback_caption_column: str | None = None
    description_column: str = "description"

    def __str__(self) -> str:
        revision = f"@{self.revision}" if self.revision else ""
        return f"huggingface:{self.name}{revision}[{self.split}]"


@dataclass(frozen=True, kw_only=True)
class Location:
    """A folder: a local path, or ``s3://bucket/prefix`` / ``gs://bucket/prefix``; or the rows of a
    Hugging Face dataset (``hub``, shown as its ``uri``), read by row index rather than by path."""

    uri: str
    s3: S3Settings | None = None
    hub: HubRows | None = None

    def __str__(self) -> str:
        return self.uri

    @property
    def is_local(self) -> bool:
        return self.hub is None and (not has_scheme(self.uri) or self.uri.startswith("file://"))

    @property
    def scheme(self) -> str:
        return urlparse(self.uri).scheme if has_scheme(self.uri) else "file"

    def child(self, *parts: str) -> Location:
        return Location(uri=join(self.uri, *parts), s3=self.s3)

    def resolve(self) -> tuple[pafs.FileSystem, str]:
        """The filesystem and the path inside it (no scheme)."""
        if self.scheme not in SCHEMES:
            raise StorageError(
                f"{self.uri}: unsupported storage scheme '{self.scheme}://'; "
                "use a local path, s3://bucket/prefix or gs://bucket/prefix"
            )
        return _filesystem(self.scheme, self.s3), fs_path(self.uri)


def join(root: str, *parts: str) -> str:
    if has_scheme(root):
        return posixpath.join(root.rstrip("/"), *parts)
    return str(Path(root, *parts))


def fs_path(uri: str) -> str:
    """The path a pyarrow filesystem takes: ``bucket/prefix`` for object stores, absolute locally."""
    if not has_scheme(uri):
        return str(Path(uri).resolve())
    parsed = urlparse(uri)
    if parsed.scheme == "file":
        return parsed.path
    return f"{parsed.netloc}{parsed.path}".rstrip("/")


@functools.lru_cache(maxsize=16)
def _filesystem(scheme: str, s3: S3Settings | None) -> pafs.FileSystem:
    """One client per scheme and settings in each process, shared by every location on it."""
    if scheme == "file":
        return pafs.LocalFileSystem()
    if scheme == "s3":
        return (s3 or S3Settings(endpoint_url=os.environ.get("AWS_ENDPOINT_URL"))).filesystem()
    return pafs.GcsFileSystem()


def describe_error(location: str, error: BaseException) -> str:
    """One line for an I/O failure, without pyarrow's multi-line AWS detail."""
    text = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    return f"{location}: {text}"


def list_files(location: Location) -> Iterator[pafs.FileInfo]:
    """Every file below ``location``, recursively; a missing folder lists nothing."""
    filesystem, root = location.resolve()
    try:
        infos = filesystem.get_file_info(pafs.FileSelector(root, recursive=True, allow_not_found=True))
    except (OSError, pa.ArrowException) as error:
        raise StorageError(describe_error(location.uri, error)) from None
    for info in infos:
        if info.type == pafs.FileType.File:
            yield info


def read_bytes(filesystem: pafs.FileSystem, path: str) -> bytes:
    with filesystem.open_input_stream(path) as stream:
        return stream.read()


def write_bytes_atomic(filesystem: pafs.FileSystem, path: str, data: bytes) -> None:
    """Write ``data`` so that ``path`` holds either its old content or all of ``data``.

    Locally: a temporary file in the same folder, then a rename (atomic on POSIX). On object
    stores an object appears only once its upload completes, so a direct write is already whole.
    """
    parent = posixpath.dirname(path)
    if parent:
        filesystem.create_dir(parent, recursive=True)
    if isinstance(filesystem, pafs.LocalFileSystem):
        temporary = f"{parent}/.{posixpath.basename(path)}.{uuid.uuid4().hex}.tmp"
        with filesystem.open_output_stream(temporary) as stream:
            stream.write(data)
        os.replace(temporary, path)
    else:
        with filesystem.open_output_stream(path) as stream:
            stream.write(data)


def is_temporary(path: str) -> bool:
    """Files a killed writer may leave behind (never read, removed by the next build)."""
    return posixpath.basename(path).endswith(".tmp")
