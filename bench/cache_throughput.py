"""Cache build throughput and memory: images/s with 1 and 2 VAE actors; peak memory at 1,000 vs 10,000 images.

Each measurement runs in a fresh process with its own local Ray, on the tiny Cosmos2 checkpoint
and synthetic images of a few small sizes (several aspect buckets), so it measures the pipeline
(listing, probing, decode/crop tasks, the VAE actor pool, Parquet writes, the commit), not a
full-size VAE. Memory is sampled every 0.2 s over the driver and every Ray process of the
session: the peak of their summed resident memory, and the driver's own peak.

    .venv/bin/python bench/cache_throughput.py                      # the RESULTS.md table
    .venv/bin/python bench/cache_throughput.py --images 200 --actors 1   # a quick look
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

SIZES = ((64, 64), (96, 64), (64, 96), (80, 80), (128, 64))


def _draw(folder: Path, count: int) -> None:
    from raytuner.data.synthetic import COLOURS, SHAPES, draw_shape

    folder.mkdir(parents=True, exist_ok=True)
    colours = list(COLOURS)
    for index in range(count):
        width, height = SIZES[index % len(SIZES)]
        image = draw_shape(
            SHAPES[index % 3], colours[index % 7], colours[(index + 3) % 7], width=width, height=height
        )
        # A per-image pixel keeps every file distinct (identical files share one cache row).
        image.putpixel((index % width, (index // width) % height), (index % 256, (index // 256) % 256, 7))
        path = folder / f"img_{index:05d}.png"
        image.save(path)
        path.with_suffix(".txt").write_text(f"a {colours[index % 7]} {SHAPES[index % 3]}\n")


class _MemorySampler(threading.Thread):
    """Peak summed RSS of this process and all Ray processes (raylet's descendants)."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.peak = 0
        self._done = threading.Event()

    def run(self) -> None:
        import psutil

        me = psutil.Process()
        while not self._done.is_set():
            total = me.memory_info().rss
            for process in psutil.process_iter(["name", "cmdline"]):
                try:
                    cmdline = " ".join(process.info["cmdline"] or ())
                    if process.pid != me.pid and (
                        "ray::" in cmdline
                        or "raylet" in cmdline
                        or "gcs_server" in cmdline
                        or "default_worker.py" in cmdline
                    ):
                        total += process.memory_info().rss
                except (psutil.NoSuchProcess, psutil.AccessDenied):
                    continue
            self.peak = max(self.peak, total)
            time.sleep(0.2)

    def stop(self) -> None:
        self._done.set()
        self.join()


def _one(images: int, actors: int, work: Path) -> dict[str, Any]:
    import ray

    from raytuner.cache.build import BuildOptions, run_cache
    from raytuner.config import load_config
    from raytuner.models.tiny import build_tiny_checkpoint

    model = work / "model"
    if not model.exists():
        build_tiny_checkpoint("cosmos2image", model)
    dataset = work / f"images-{images}"
    if not dataset.exists():
        _draw(dataset, images)
    run_dir = work / f"run-{images}-{actors}"
    datasets = [
        {
            "id": "bench",
            "type": "local",
            "instance_data_dir": str(dataset),
            "caption_strategy": "textfile",
            "resolution": 64,
            "resolution_type": "pixel_area",
            "cache_dir_vae": str(run_dir / "cache/vae"),
        },
        {
            "id": "text",
            "type": "local",
            "dataset_type": "text_embeds",
            "default": True,
            "cache_dir": str(run_dir / "cache/text"),
        },
    ]
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "multidatabackend.json").write_text(json.dumps(datasets))
    (run_dir / "lycoris_config.json").write_text(
        json.dumps({"algo": "lokr", "linear_dim": 10000, "factor": 4})
    )
    (run_dir / "config.json").write_text(
        json.dumps(
            {
                "model_family": "cosmos2image",
                "lora_type": "lycoris",
                "pretrained_model_name_or_path": str(model),
                "lycoris_config": str(run_dir / "lycoris_config.json"),
                "data_backend_config": str(run_dir / "multidatabackend.json"),
                "output_dir": str(run_dir / "output"),
                "max_train_steps": 1,
                "seed": 1,
                "vae_batch_size": 16,
                "aspect_bucket_alignment": 16,
            }
        )
    )
    run = load_config(run_dir / "config.json")
    ray.init(num_cpus=8, include_dashboard=False, _temp_dir=str(work / "ray"), log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    sampler = _MemorySampler()
    sampler.start()
    try:
        summary = run_cache(run, BuildOptions(encoder_actors=actors))
    finally:
        sampler.stop()
        ray.shutdown()
    encode_rate = summary.encoded / summary.encode_seconds
    return {
        "images": images,
        "actors": actors,
        "encoded": summary.encoded,
        "encode_s": round(summary.encode_seconds, 1),
        "build_s": round(summary.seconds, 1),
        "images_per_s": round(encode_rate, 1),
        "peak_total_mib": round(sampler.peak / 2**20),
        "peak_driver_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
    }


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--images", type=int, nargs="+", default=None, help="dataset sizes (default: 1000 10000)"
    )
    parser.add_argument("--actors", type=int, nargs="+", default=None, help="VAE actor counts (default: 1 2)")
    parser.add_argument(
        "--work", default=None, help="folder for models, images and caches (default: a temp dir)"
    )
    parser.add_argument("--one", nargs=2, type=int, metavar=("IMAGES", "ACTORS"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    work = Path(args.work or tempfile.mkdtemp(prefix="rt-bench-"))
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.one:
        print(json.dumps(_one(args.one[0], args.one[1], work)))
        return 0
    if args.images or args.actors:
        cases = [(n, a) for n in (args.images or [1000]) for a in (args.actors or [1])]
    else:
        # Throughput: 1 and 2 actors on 1,000 images; memory: 1 actor on 1,000 and 10,000 images.
        cases = [(1000, 1), (1000, 2), (10000, 1)]
    results = []
    for images, actors in cases:
        finished = subprocess.run(
            [sys.executable, __file__, "--one", str(images), str(actors), "--work", str(work)],
            capture_output=True,
            text=True,
            check=False,
        )
        if finished.returncode != 0:
            print(finished.stderr[-4000:], file=sys.stderr)
            return finished.returncode
        results.append(json.loads(finished.stdout.strip().splitlines()[-1]))
        print(json.dumps(results[-1]), flush=True)
    print()
    print(
        "| images | VAE actors | encoded | encode s | whole build s | images/s | peak RSS, all Ray processes (MiB) | peak RSS, driver (MiB) |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in results:
        print(
            f"| {r['images']:,} | {r['actors']} | {r['encoded']:,} | {r['encode_s']} | {r['build_s']} | "
            f"{r['images_per_s']} | {r['peak_total_mib']} | {r['peak_driver_mib']} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
