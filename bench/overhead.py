"""Per-step overhead of ``raytuner train`` (one Ray Train worker) against a bare PyTorch loop.

Both sides train the same model on the same data, one after the other: the tiny Cosmos2
checkpoint's architecture made wide and deep enough that one CPU step takes well over 0.5 s (so
the figure measures raytuner, not process start-up), the Cosmos2 quickstart's LoKr config, AdamW,
batch 2, one seed, one Parquet cache (built once by ``raytuner cache`` before either side runs).

* **raytuner**: ``raytuner train --config … --ray-num-workers 1 --ray-cpus-per-worker N`` in a fresh
  process (its own local Ray). Step times are ``step_time_s`` from ``output_dir/logs/metrics.jsonl``
  (data read + ``optimizer_step`` + scheduler, as the worker times them). The bench also stamps
  the moment each line appears in that file (polled every few ms), whose spacing is the loop's
  full period: the step plus what follows it (metrics log, Ray gauges, the ``ray.train.report``
  barrier). Ray sets the worker's ``OMP_NUM_THREADS`` from its CPUs at run time (not in the
  process's initial environment, so it cannot be read from outside); the bench counts instead the
  worker's threads that were busy between the first and last timed steps, and the CPU used by every
  other process of the run (the driver, the local Ray's daemons and actors).
* **bare**: a fresh process with ``torch.set_num_threads(N)`` that builds the model, adapter,
  optimizer and scheduler as the worker does and, per step, reads the plan's batch from the cache
  (``open_training_data(run)``: ``plan``/``batch``, as ``StepFeed.micro_batches``) and calls
  ``raytuner.train.step.optimizer_step``. No Ray.

The first ``--warmup`` steps of each side are dropped. Both sides must log the same losses (same
plan, same per-sample noise): the bench prints the largest difference.

    .venv/bin/python bench/overhead.py                  # the RESULTS.md table: 2 threads, bare raytuner bare
    .venv/bin/python bench/overhead.py --threads 1      # the same with one thread a side
    .venv/bin/python bench/overhead.py --steps 15 --layers 4 --order bare raytuner   # a quicker look
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
LYCORIS_CONFIG = ROOT / "configs" / "cosmos2image" / "lycoris_config.json"
RAYTUNER = str(Path(sys.executable).with_name("raytuner"))
POLL_S = 0.005


# ---- set-up ----------------------------------------------------------------------------------------


def _model(folder: Path, *, heads: int, head_dim: int, layers: int) -> Path:
    """The tiny Cosmos2 checkpoint with a wider, deeper transformer (same VAE, text encoder, tokenizer)."""
    import torch
    from diffusers import CosmosTransformer3DModel

    from raytuner.models.tiny import build_tiny_checkpoint

    if (folder / "bench_transformer.json").is_file():
        return folder
    build_tiny_checkpoint("cosmos2image", folder)
    config = dict(CosmosTransformer3DModel.load_config(folder, subfolder="transformer"))
    sizes = {"num_attention_heads": heads, "attention_head_dim": head_dim, "num_layers": layers}
    config.update(sizes)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        transformer = CosmosTransformer3DModel.from_config(config).eval()
    transformer.save_pretrained(folder / "transformer", safe_serialization=True)
    parameters = sum(parameter.numel() for parameter in transformer.parameters())
    (folder / "bench_transformer.json").write_text(json.dumps({**sizes, "parameters": parameters}))
    return folder


def _images(folder: Path, count: int, size: int) -> None:
    from raytuner.data.synthetic import COLOURS, SHAPES, draw_shape

    folder.mkdir(parents=True, exist_ok=True)
    colours = list(COLOURS)
    for index in range(count):
        shape, colour = SHAPES[index % len(SHAPES)], colours[index % len(colours)]
        background = colours[(index + 3) % len(colours)]
        path = folder / f"img_{index:03d}.png"
        draw_shape(shape, colour, background, width=size, height=size).save(path)
        path.with_suffix(".txt").write_text(f"a {colour} {shape} on a {background} background\n")


def _write_config(work: Path, model: Path, output_dir: Path, args: argparse.Namespace) -> Path:
    shutil.rmtree(output_dir, ignore_errors=True)  # a fresh run each time (no resume, no old lines)
    datasets = [
        {
            "id": "bench",
            "type": "local",
            "instance_data_dir": str(work / "images"),
            "caption_strategy": "textfile",
            "resolution": args.size,
            "resolution_type": "pixel",
            "crop": True,
            "crop_aspect": "square",
            "cache_dir_vae": str(work / "cache" / "vae"),
        },
        {
            "id": "text",
            "type": "local",
            "dataset_type": "text_embeds",
            "default": True,
            "cache_dir": str(work / "cache" / "text"),
        },
    ]
    (work / "multidatabackend.json").write_text(json.dumps(datasets, indent=2))
    (work / "lycoris_config.json").write_text(LYCORIS_CONFIG.read_text())
    config = {
        "model_family": "cosmos2image",
        "model_type": "lora",
        "lora_type": "lycoris",
        "pretrained_model_name_or_path": str(model),
        "lycoris_config": str(work / "lycoris_config.json"),
        "data_backend_config": str(work / "multidatabackend.json"),
        "output_dir": str(output_dir),
        "seed": 7,
        "max_train_steps": args.steps,
        "train_batch_size": args.batch,
        "vae_batch_size": 4,
        "aspect_bucket_alignment": 16,
        "mixed_precision": "no",
        "gradient_checkpointing": False,
        "optimizer": "torch-adamw",
        "learning_rate": 1e-3,
        "lr_scheduler": "constant",
        "caption_dropout_probability": 0.1,
        "validation_prompt": None,
        "checkpoint_step_interval": args.steps + 1,  # only the final checkpoint, after the last step
        "report_to": "none",
    }
    path = output_dir.with_suffix(".json")
    path.write_text(json.dumps(config, indent=2))
    return path


def _environment(ray_temp: Path) -> dict[str, str]:
    """A fresh local Ray per run, in its own temp root, and no inherited thread settings.

    With no address, ``ray.init`` first looks for a cluster recorded in
    ``<temp root>/ray/ray_current_cluster`` (``ray start`` and ``ray.cluster_utils.Cluster`` write it)
    and joins that one instead of starting its own; an own ``RAY_TMPDIR`` keeps each run on a Ray of
    its own whatever else runs on the machine.
    """
    env = {name: value for name, value in os.environ.items() if not name.startswith("RAY_")}
    env.pop("OMP_NUM_THREADS", None)
    env["HF_HUB_OFFLINE"] = "1"
    env["RAY_TMPDIR"] = str(ray_temp)
    return env


# ---- watching a run ------------------------------------------------------------------------------


def _ancestors(pid: int) -> set[int]:
    found = set()
    while pid > 1 and pid not in found:
        found.add(pid)
        try:
            pid = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            break
    return found


def _training_process(root: int, name: bytes | None) -> int | None:
    """``root`` itself, or (``name`` given) its descendant whose command line starts with ``name``."""
    if name is None:
        return root
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if (entry / "cmdline").read_bytes().startswith(name) and root in _ancestors(int(entry.name)):
                return int(entry.name)
        except OSError:
            continue
    return None


def _cpu_seconds(stat: Path) -> float:
    fields = stat.read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _tree_cpu_seconds(root: int) -> dict[int, float]:
    """CPU seconds of ``root`` and every process below it (the local Ray a run starts is all in there)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(parent, []).append(int(entry.name))
    times, queue = {}, [root]
    while queue:
        pid = queue.pop()
        try:
            times[pid] = _cpu_seconds(Path(f"/proc/{pid}/stat"))
        except (OSError, IndexError, ValueError):
            continue
        queue.extend(children.get(pid, ()))
    return times


def _process_name(pid: int) -> str:
    """``raylet``, ``ray::TrainController.run``, ``dashboard.py``, ``-m ray.util.client.server`` …"""
    try:
        words = [w.decode(errors="replace") for w in Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")]
    except OSError:
        return str(pid)
    if not words or not words[0]:
        return str(pid)
    if " " in words[0]:  # a process that retitled itself: "ray::IDLE", "ray-dashboard-StateHead-0 (…)"
        return words[0].split(" (", 1)[0]
    if not Path(words[0]).name.startswith("python"):
        return Path(words[0]).name
    rest = [w for w in words[1:] if w not in ("-u", "-B")]
    if rest[:1] == ["-m"] and len(rest) > 1:
        return f"-m {rest[1]}"
    return Path(rest[0]).name if rest and not rest[0].startswith("-") else " ".join(rest[:1])


def _thread_cpu_seconds(pid: int) -> dict[int, float]:
    """CPU seconds (user + system) of each thread of ``pid``."""
    times = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            times[int(task.name)] = _cpu_seconds(task / "stat")
        except (OSError, IndexError, ValueError):
            continue
    return times


class _Watcher(threading.Thread):
    """Stamps each line of a per-step log as it appears, and samples the training process's threads.

    Between the lines of steps ``first`` and ``last`` it reads every thread's CPU time; a thread
    busy for at least a quarter of that interval is counted as a compute thread. Over the same
    interval it reads the CPU time of every other process of the run (for raytuner: the driver and
    the local Ray's daemons and workers), in cores.
    """

    def __init__(self, path: Path, root: int, name: bytes | None, first: int, last: int) -> None:
        super().__init__(daemon=True)
        self.path, self.root, self.process_name = path, root, name
        self.first, self.last = first, last
        self.arrivals: list[float] = []
        self.thread_shares: list[float] = []
        self.other_cores = 0.0
        self.other_busiest: list[tuple[str, float]] = []
        self._done = threading.Event()

    def run(self) -> None:
        seen = 0
        pid: int | None = None
        start: tuple[float, dict[int, float], dict[int, float]] | None = None
        while not self._done.is_set():
            now = time.perf_counter()
            try:
                size = self.path.stat().st_size
            except OSError:
                size = 0
            if size > seen:
                lines = self.path.read_bytes().count(b"\n")
                self.arrivals.extend([now] * (lines - len(self.arrivals)))
                seen = size
                try:
                    if pid is None:
                        pid = _training_process(self.root, self.process_name)
                    if pid is not None and start is None and len(self.arrivals) >= self.first:
                        start = (now, _thread_cpu_seconds(pid), _tree_cpu_seconds(self.root))
                    done = start is not None and len(self.arrivals) >= self.last
                    if pid is not None and start is not None and done and not self.thread_shares:
                        end, tree = _thread_cpu_seconds(pid), _tree_cpu_seconds(self.root)
                        wall = now - start[0]
                        shares = [(end[t] - start[1].get(t, 0.0)) / wall for t in end]
                        self.thread_shares = sorted(shares, reverse=True)
                        others = {p: (tree[p] - start[2].get(p, 0.0)) / wall for p in tree if p != pid}
                        self.other_cores = sum(others.values())
                        busiest = sorted(others, key=others.__getitem__, reverse=True)[:6]
                        self.other_busiest = [(_process_name(p), round(others[p], 3)) for p in busiest]
                except OSError:
                    pass
            time.sleep(POLL_S)

    def stop(self) -> None:
        self._done.set()
        self.join()

    def busy_threads(self) -> int:
        return sum(share >= 0.25 for share in self.thread_shares)


def _run_side(
    command: list[str], log: Path, name: bytes | None, work: Path, args: argparse.Namespace
) -> tuple[subprocess.CompletedProcess[str], _Watcher, float]:
    log.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        started = time.perf_counter()
        process = subprocess.Popen(command, env=_environment(work / "t"), stdout=out, stderr=err, text=True)
        watcher = _Watcher(log, process.pid, name, first=args.warmup, last=args.steps - 1)
        watcher.start()
        returncode = process.wait()
        wall = time.perf_counter() - started
        watcher.stop()
        out.seek(0)
        err.seek(0)
        finished = subprocess.CompletedProcess(command, returncode, out.read(), err.read())
    if finished.returncode != 0:
        print(finished.stdout[-3000:], finished.stderr[-6000:], sep="\n", file=sys.stderr)
        raise SystemExit(f"{command[0]} exited with {finished.returncode}")
    return finished, watcher, wall


def _periods(arrivals: list[float]) -> list[float | None]:
    """Line k's arrival minus line k-1's: step k's full period (line 1 has none)."""
    return [None] + [later - earlier for earlier, later in itertools.pairwise(arrivals)]


# ---- the two sides ---------------------------------------------------------------------------------


def run_raytuner(work: Path, model: Path, args: argparse.Namespace, index: int) -> dict[str, Any]:
    output_dir = work / f"raytuner-{index}"
    config = _write_config(work, model, output_dir, args)
    command = [
        RAYTUNER,
        "train",
        "--config",
        str(config),
        "--ray-num-workers",
        "1",
        "--ray-cpus-per-worker",
        str(args.threads),
    ]
    log = output_dir / "logs" / "metrics.jsonl"
    _, watcher, wall = _run_side(command, log, b"ray::RayTrainWorker", work, args)
    entries = [json.loads(line) for line in log.read_text().splitlines()]
    assert [entry["step"] for entry in entries] == list(range(1, args.steps + 1)), (
        "one line per step expected"
    )
    return {
        "side": "raytuner",
        "threads": f"{args.threads} (ray_cpus_per_worker); {watcher.busy_threads()} busy",
        "thread_shares": watcher.thread_shares[:6],
        "other_cores": watcher.other_cores,
        "other_busiest": watcher.other_busiest,
        "step_s": [entry["step_time_s"] for entry in entries],
        "data_s": [entry["step_time_s"] * entry["data_wait_fraction"] for entry in entries],
        "loss": [entry["loss"] for entry in entries],
        "period_s": _periods(watcher.arrivals[: len(entries)]),
        "wall_s": wall,
        "command": " ".join(["raytuner", *command[1:]]),
    }


def run_bare(work: Path, model: Path, args: argparse.Namespace, index: int) -> dict[str, Any]:
    output_dir = work / f"bare-{index}"
    config = _write_config(work, model, output_dir, args)
    log = output_dir / "steps.jsonl"
    command = [
        sys.executable,
        __file__,
        "--bare",
        str(config),
        "--threads",
        str(args.threads),
        "--log",
        str(log),
    ]
    finished, watcher, wall = _run_side(command, log, None, work, args)
    result = json.loads(finished.stdout.strip().splitlines()[-1])
    return {
        **result,
        "side": "bare",
        "threads": f"{result['threads']} (torch.set_num_threads); {watcher.busy_threads()} busy",
        "thread_shares": watcher.thread_shares[:6],
        "other_cores": watcher.other_cores,
        "other_busiest": watcher.other_busiest,
        "period_s": _periods(watcher.arrivals[: len(result["step_s"])]),
        "wall_s": wall,
    }


def bare_loop(config: str, threads: int, log: Path) -> dict[str, Any]:
    """The worker's steps without Ray: same model, adapter, optimizer, scheduler, batches and step."""
    import torch

    torch.set_num_threads(threads)
    from raytuner.adapters import build_adapter
    from raytuner.batches.plan import BatchShape, EpochPlan, sample_generators
    from raytuner.batches.reader import open_training_data
    from raytuner.config import load_config
    from raytuner.models.registry import get_family
    from raytuner.train.optim import build_lr_scheduler, build_optimizer
    from raytuner.train.schedule import flow_schedule_from_config
    from raytuner.train.step import UNCLIPPED_OPTIMIZERS, MicroBatch, optimizer_step

    run = load_config(config)
    training = run.training
    device = torch.device("cpu")
    seed = run.seed
    shape = BatchShape(
        per_worker=training.optimization.train_batch_size,
        workers=1,
        accumulation=training.optimization.gradient_accumulation_steps,
    )
    family_class = get_family(training.model.model_family)
    family = family_class(
        family_class.resolve_model_path(
            training.model.model_flavour, training.model.pretrained_model_name_or_path
        ),
        revision=training.model.revision,
        device=device,
        dtype=torch.float32,
    )
    transformer = family.load_transformer().requires_grad_(False)
    transformer.train()
    assert run.lycoris is not None
    network, _ = build_adapter(transformer, run.lycoris, module_aliases=family.module_aliases, seed=seed)
    network.to(device=device, dtype=torch.float32)
    parameters = [p for p in network.parameters() if p.requires_grad]
    optimizer = build_optimizer(parameters, training.optimization, world_size=1)
    total_steps = int(training.optimization.max_train_steps or 0)
    lr_scheduler = build_lr_scheduler(optimizer, training.optimization, total_steps=total_steps)
    schedule = flow_schedule_from_config(training.flow)
    max_grad_norm = (
        None
        if training.optimization.optimizer in UNCLIPPED_OPTIMIZERS
        else training.optimization.max_grad_norm
    )
    log.parent.mkdir(parents=True, exist_ok=True)
    data = open_training_data(run)
    steps_per_epoch = len(data.plan(shape, seed=seed, epoch=0))
    plans: dict[int, EpochPlan] = {}

    step_s, data_s, losses = [], [], []
    for step in range(total_steps):
        started = time.perf_counter()
        epoch, position = divmod(step, steps_per_epoch)
        if epoch not in plans:
            plans = {epoch: data.plan(shape, seed=seed, epoch=epoch)}
        batch = plans[epoch].batches[position]
        micro = []
        for micro_step in range(shape.accumulation):
            keys = batch.slice_for(shape, rank=0, micro_step=micro_step)
            latents, conditioning = data.batch(batch, keys, seed=seed, step=step)
            seeds = batch.seeds_for(shape, rank=0, micro_step=micro_step, seed=seed, step=step)
            micro.append(
                MicroBatch(
                    latents=latents.to(device),
                    conditioning=family.collate_conditioning(conditioning),
                    generators=sample_generators(seeds),
                    is_regularisation=batch.is_regularisation,
                )
            )
        data_seconds = time.perf_counter() - started
        float(lr_scheduler.get_last_lr()[0])
        result = optimizer_step(
            family,
            transformer,
            network,
            parameters,
            optimizer,
            micro,
            schedule,
            max_grad_norm=max_grad_norm,
            grad_clip_method=training.optimization.grad_clip_method,
            mixed_precision=training.model.mixed_precision,
        )
        lr_scheduler.step()
        step_seconds = time.perf_counter() - started
        step_s.append(step_seconds)
        data_s.append(data_seconds)
        losses.append(result.loss)
        with log.open("a", encoding="utf-8") as handle:  # one line per step, as rank 0's metrics.jsonl
            handle.write(
                json.dumps({"step": step + 1, "loss": result.loss, "step_time_s": step_seconds}) + "\n"
            )
    return {"threads": str(torch.get_num_threads()), "step_s": step_s, "data_s": data_s, "loss": losses}


# ---- the report ------------------------------------------------------------------------------------


def _median(values: list[float | None], warmup: int) -> float:
    kept = [value for value in values[warmup:] if value is not None]
    return statistics.median(kept)


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=40, help="training steps per side (default 40)")
    parser.add_argument(
        "--warmup", type=int, default=5, help="first steps left out of the medians (default 5)"
    )
    parser.add_argument(
        "--threads", type=int, default=2, help="torch threads = ray_cpus_per_worker (default 2)"
    )
    parser.add_argument("--batch", type=int, default=2, help="train_batch_size (default 2)")
    parser.add_argument("--size", type=int, default=256, help="image side in pixels (default 256)")
    parser.add_argument("--images", type=int, default=16, help="training images (default 16)")
    parser.add_argument("--heads", type=int, default=8, help="transformer attention heads (default 8)")
    parser.add_argument("--head-dim", type=int, default=64, help="transformer head width (default 64)")
    parser.add_argument("--layers", type=int, default=8, help="transformer blocks (default 8)")
    parser.add_argument(
        "--order",
        nargs="+",
        choices=("raytuner", "bare"),
        default=["bare", "raytuner", "bare"],
        help="sides to run, in order (default: bare raytuner bare, bracketing raytuner)",
    )
    parser.add_argument(
        "--work", default=None, help="folder for the model, images and cache (default: a temp dir)"
    )
    parser.add_argument("--bare", metavar="CONFIG", help=argparse.SUPPRESS)
    parser.add_argument("--log", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.bare:
        print(json.dumps(bare_loop(args.bare, args.threads, Path(args.log))))
        return 0
    os.environ["HF_HUB_OFFLINE"] = "1"
    work = Path(args.work or tempfile.mkdtemp(prefix="rt-overhead-")).resolve()
    (work / "t").mkdir(parents=True, exist_ok=True)  # RAY_TMPDIR of the runs: see _environment
    model = _model(work / "model", heads=args.heads, head_dim=args.head_dim, layers=args.layers)
    if not (work / "images").is_dir():
        _images(work / "images", args.images, args.size)
    # The cache is built once, before either side, so neither side's figure includes it.
    cache_config = _write_config(work, model, work / "cache-run", args)
    built = subprocess.run(
        [RAYTUNER, "cache", "--config", str(cache_config)],
        env=_environment(work / "t"),
        capture_output=True,
        text=True,
        check=False,
    )
    if built.returncode != 0:
        print(built.stdout[-3000:], built.stderr[-6000:], sep="\n", file=sys.stderr)
        return built.returncode

    import torch

    sizes = json.loads((model / "bench_transformer.json").read_text())
    print(
        f"{_cpu_model()}, {os.cpu_count()} cores; torch {torch.__version__}; transformer "
        f"{sizes['num_layers']} blocks x {sizes['num_attention_heads']} heads x "
        f"{sizes['attention_head_dim']}, "
        f"{sizes['parameters'] / 1e6:.1f} M parameters; {args.images} images {args.size}x{args.size}, "
        f"batch {args.batch}, {args.steps} steps (first {args.warmup} dropped); load average "
        f"{os.getloadavg()[0]:.2f} at start",
        flush=True,
    )
    runs = []
    for index, side in enumerate(args.order):
        runner = run_raytuner if side == "raytuner" else run_bare
        result = runner(work, model, args, index)
        result["load"] = os.getloadavg()[0]
        runs.append(result)
        print(
            f"{side}: median step {_median(result['step_s'], args.warmup):.3f} s, "
            f"threads {result['threads']}, "
            f"wall {result['wall_s']:.0f} s, load average {result['load']:.2f}",
            flush=True,
        )
    bare = [r for r in runs if r["side"] == "bare"]
    bare_step = statistics.median(_median(r["step_s"], args.warmup) for r in bare) if bare else None
    print()
    print(
        "| run | side | torch threads | busiest threads, share of a core | rest of the run, cores "
        "| median step s | median data s | median period s | step ratio | period ratio |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for index, r in enumerate(runs):
        step, period = _median(r["step_s"], args.warmup), _median(r["period_s"], args.warmup)
        ratios = (f"{step / bare_step:.3f}", f"{period / bare_step:.3f}") if bare_step else ("", "")
        shares = ", ".join(f"{share:.2f}" for share in r["thread_shares"][: args.threads + 1])
        print(
            f"| {index + 1} | {r['side']} | {r['threads']} | {shares} | {r['other_cores']:.2f} | "
            f"{step:.3f} | "
            f"{_median(r['data_s'], args.warmup):.3f} | {period:.3f} | {ratios[0]} | {ratios[1]} |"
        )
    for index, r in enumerate(runs):
        if r["other_busiest"]:
            busiest = ", ".join(f"{name} {cores:.3f}" for name, cores in r["other_busiest"])
            print(f"run {index + 1}, rest of the run, busiest (cores): {busiest}")
    reference = bare[0]["loss"] if bare else None
    for r in runs:
        if reference is not None and r is not bare[0]:
            difference = max(abs(a - b) for a, b in zip(r["loss"], reference, strict=True))
            print(f"largest |loss difference| vs the first bare run ({r['side']}): {difference:.2e}")
    for r in runs:
        if r["side"] == "raytuner":
            print(f"raytuner command: {r['command']}")
    (work / "overhead.json").write_text(json.dumps(runs, indent=2))
    print(f"per-step numbers: {work / 'overhead.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
