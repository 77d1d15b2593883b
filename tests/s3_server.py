"""A real S3-compatible server (moto) on loopback; tests/conftest.py starts it once per session."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import pyarrow.fs


@dataclass(frozen=True)
class S3Server:
    """A real S3-compatible server (moto) on loopback, for the object-storage tests."""

    endpoint_url: str
    access_key_id: str = "raytuner-test"
    secret_access_key: str = "raytuner-test-secret"
    region: str = "us-east-1"

    def filesystem(self) -> pyarrow.fs.S3FileSystem:
        import pyarrow.fs as pafs

        host = self.endpoint_url.removeprefix("http://")
        return pafs.S3FileSystem(
            endpoint_override=host,
            scheme="http",
            access_key=self.access_key_id,
            secret_key=self.secret_access_key,
            region=self.region,
            allow_bucket_creation=True,
            allow_bucket_deletion=True,
        )

    def create_bucket(self, name: str) -> str:
        self.filesystem().create_dir(name)
        return name
