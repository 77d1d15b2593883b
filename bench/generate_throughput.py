"""What batch generation on Ray Data costs against rendering in one process, on a tiny checkpoint.

Builds a tiny random-weight checkpoint of the family (offline), then renders the same ``--images``
requests three ways: a plain loop over ``ImageRenderer.render`` in this process (pipeline built
once, as an actor builds it), and ``raytuner generate --prompts`` in a fresh process (its own local
Ray) with 1 and with 2 actors. It prints the wall time, the images per second, and the median time
per image inside the actor as the index records it; the difference is Ray start-up, actor
start-up (each actor loads the pipeline and merges the adapter) and streaming the PNGs back.

    .venv/bin/python bench/generate_throughput.py                    # the RESULTS.md table
    .venv/bin/python bench/generate_throughput.py --family omnigen --images 32 --steps 8
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--family", default="cosmos2image", choices=("cosmos2image", "omnigen"))
    parser.add_argument("--images", type=int, default=16)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--resolution", default="64x64")
    args = parser.parse_args()

    from raytuner.generate.command import GenerateOptions, _settings
    from raytuner.generate.prompts import read_prompt_file
    from raytuner.generate.render import ImageRenderer
    from raytuner.models.tiny import build_tiny_checkpoint

    work = Path(tempfile.mkdtemp(prefix="raytuner-generate-bench-"))
    model = build_tiny_checkpoint(args.family, work / "model")
    prompts = work / "prompts.txt"
    prompts.write_text(
        "\n".join(f"shape number {n} on a plain background" for n in range(args.images)) + "\n"
    )

    options = GenerateOptions(
        model=str(model), prompts=str(prompts), steps=args.steps, resolution=args.resolution, out=""
    )
    settings = _settings(options)
    requests = read_prompt_file(prompts, seed=0, num_images=1, multiple=16)
    start = time.perf_counter()
    renderer = ImageRenderer(settings, progress=False)
    loaded = time.perf_counter()
    per_image = []
    for request in requests:
        per_image.append(renderer.render(request).seconds)
    rows = [("in process", time.perf_counter() - start, loaded - start, statistics.median(per_image))]

    for actors in (1, 2):
        out = work / f"out-{actors}"
        command = [
            str(Path(sys.executable).with_name("raytuner")), "generate", "--model", str(model),
            "--prompts", str(prompts), "--steps", str(args.steps), "--resolution", args.resolution,
            "--out", str(out), "--actors", str(actors),
        ]  # fmt: skip
        env = {key: value for key, value in os.environ.items() if not key.startswith("RAY_")}
        ray_temp = tempfile.mkdtemp(prefix="rt-gen-")
        start = time.perf_counter()
        subprocess.run(
            command, env={**env, "RAY_TMPDIR": ray_temp}, check=True, capture_output=True, cwd=work
        )
        wall = time.perf_counter() - start
        entries = json.loads((out / "index.json").read_text())["images"]
        rows.append(
            (f"Ray Data, {actors} actor(s)", wall, None, statistics.median(e["seconds"] for e in entries))
        )

    print(f"{args.family}, {args.images} images of {args.resolution}, {args.steps} steps")
    print(f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch threads default")
    print()
    print("| run | wall s | images/s | pipeline load s | median s per image |")
    print("| --- | --- | --- | --- | --- |")
    for name, wall, load, median in rows:
        load_text = f"{load:.1f}" if load is not None else "in each actor"
        print(f"| {name} | {wall:.1f} | {args.images / wall:.2f} | {load_text} | {median:.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
