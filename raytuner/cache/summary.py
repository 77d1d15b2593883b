"""What a cache build did, per dataset and bucket, and the table printed at its end."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, kw_only=True)
class BucketSummary:
    dataset_id: str
    bucket: str
    images: int
    encoded: int
    bytes_written: int


@dataclass(frozen=True, kw_only=True)
class DatasetSummary:
    dataset_id: str
    cache: str
    images: int
    encoded: int
    skipped: int
    bytes_written: int
    vae_batches: int  # VAE calls this build made (vae_batch_size images each, at most)
    buckets: tuple[BucketSummary, ...]
    report: str
    # Files sharing their latent row with an identical file: still one sample each, as in SimpleTuner.
    shared: int = 0

    @property
    def notes(self) -> tuple[str, ...]:
        return (shared_note(self.shared),) if self.shared else ()


def shared_note(files: int) -> str:
    """The report's line on identical files (copies weight a file, as in SimpleTuner; none is skipped)."""
    return f"{files} files share their latents with an identical file; each trains as a sample of its own"


@dataclass(frozen=True, kw_only=True)
class CacheSummary:
    datasets: tuple[DatasetSummary, ...]
    prompts: int
    prompts_encoded: int
    text_cache: str
    seconds: float
    encode_seconds: float  # the image pipeline: read, decode and crop, VAE, shard writes

    @property
    def encoded(self) -> int:
        return sum(d.encoded for d in self.datasets)

    def table(self) -> str:
        rate = (lambda n: f"{n / self.encode_seconds:.1f}") if self.encode_seconds > 0 else (lambda n: "-")
        header = ("dataset", "bucket", "images", "encoded", "skipped", "written", "images/s")
        rows: list[tuple[str, ...]] = []
        for summary in self.datasets:
            rows.append(
                (
                    summary.dataset_id,
                    "all",
                    str(summary.images),
                    str(summary.encoded),
                    str(summary.skipped),
                    _human_bytes(summary.bytes_written),
                    rate(summary.encoded) if summary.encoded else "-",
                )
            )
            for bucket in summary.buckets:
                rows.append(
                    (
                        "",
                        bucket.bucket,
                        str(bucket.images),
                        str(bucket.encoded),
                        "",
                        _human_bytes(bucket.bytes_written),
                        "",
                    )
                )
        rows.append(("text-embeds", "", str(self.prompts), str(self.prompts_encoded), "", "", ""))
        widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
        lines = [
            "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
            for row in [header, *rows]
        ]
        lines.insert(1, "  ".join("-" * width for width in widths))
        lines.extend(
            f"note: dataset '{summary.dataset_id}': {note}"
            for summary in self.datasets
            for note in summary.notes
        )
        lines.append(
            f"{self.encoded} image(s) through the VAE in {self.encode_seconds:.1f} s, whole build {self.seconds:.1f} s; "
            f"text cache {self.text_cache}"
        )
        return "\n".join(lines)


def _human_bytes(count: int) -> str:
    if count == 0:
        return "0"
    size = float(count)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return str(size)
