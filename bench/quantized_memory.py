"""Memory of a quantised frozen base against the unquantised one, for both families.

The models and the training step are ``bench/gpu_train.py``'s (imported, not copied): each family's
transformer at full size with random weights (nothing is downloaded), each quickstart's
``lycoris_config.json`` and optimizer settings, and ``raytuner.train.step.optimizer_step``. What
changes is the base: per cell it is built in bf16, quantised as a raytuner worker quantises it
(``quantize_load_device``, ``quantize_base``, then ``build_adapter`` on ``adapter_spec``, as in
``raytuner/train/loop.py``), and the LoKr is built on it.

Cells: family x ``base_model_precision`` {no_change, int8-quanto, fp8-quanto, int4-quanto,
int8-torchao, fp8wo-torchao, fp8-torchao} x ``quantize_via`` {accelerator, cpu} (on CUDA only; on
the CPU both are the same). A precision that ``quantization_problem`` refuses on the device
(fp8-torchao below CUDA capability 8.9, a missing package) is listed as skipped with its reason.
All ``accelerator`` cells run before the ``cpu`` ones: quantising on the CPU is the slow path, so a
run cut short by ``--budget-s`` loses those first.

Figures per cell:

* **weight bytes**: the transformer's parameters and buffers as stored. A quantised weight is a
  tensor subclass (quanto's ``WeightQBytesTensor`` / ``WeightQBitsTensor``, torchao's
  ``Int8Tensor`` / ``Float8Tensor``) whose own ``element_size`` says nothing about its storage; its
  inner tensors (``__tensor_flatten__``: int8/float8 data, scales, int4's packed uint8 data) are
  counted instead, recursively.
* **start-up peak**: load + quantise + move to the device. On CUDA ``torch.cuda.max_memory_allocated``
  after a reset (with ``quantize_via`` cpu the bf16 weights never reach the GPU); on the CPU the
  growth of the process's peak resident memory (Linux ``VmHWM``, reset through ``clear_refs``)
  over its resident memory before the cell.
* **training**: ``--steps`` timed steps at batch 1 after one warm-up step: peak memory (CUDA: over
  the timed steps, as gpu_train measures it; CPU: peak RSS growth over all steps), median step
  time and the losses (finite: it trains). ``--no-train`` measures the first two figures only.

The base is built with bf16 as the default dtype, so that start-up memory is that of loading a
bf16 checkpoint rather than of initialising float32 weights and casting them.

    python bench/quantized_memory.py --out DIR                      # GPU, 1024 px (bench/gpu_run.sh)
    python bench/quantized_memory.py --tiny --device cpu            # tiny random models (tests)
    python bench/quantized_memory.py --device cpu --no-train \\
        --precisions no_change int8-quanto int8-torchao             # full-size weights on a CPU

Results: ``DIR/quantized_memory.json`` and ``DIR/quantized_memory.md`` (a table), rewritten after
every cell so a run stopped early keeps what it measured.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import dataclasses
import importlib.metadata
import json
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import gpu_train  # bench/ is not a package: the sibling benchmark, by path

from raytuner.config.training import TrainingConfig
from raytuner.quantize import (
    NO_CHANGE,
    adapter_spec,
    quantization_problem,
    quantize_base,
    quantize_load_device,
    quantized_module_names,
)

ROOT = gpu_train.ROOT
FAMILIES = gpu_train.FAMILIES
DTYPE = gpu_train.DTYPE
GIB = gpu_train.GIB
PRECISIONS = (
    NO_CHANGE,
    "int8-quanto",
    "fp8-quanto",
    "int4-quanto",
    "int8-torchao",
    "fp8wo-torchao",
    "fp8-torchao",
)
VIAS = ("accelerator", "cpu")
NOT_APPLICABLE = "-"  # quantize_via of an unquantised base


# ---- memory ----------------------------------------------------------------------------------------


def tensor_bytes(tensor: torch.Tensor, seen: set[tuple[int, int]]) -> int:
    """Bytes ``tensor`` really stores: a tensor subclass by its inner tensors, recursively.

    ``seen`` holds (data pointer, bytes) of what was counted, so tied or shared tensors count once.
    """
    if type(tensor) not in (torch.Tensor, torch.nn.Parameter) and hasattr(tensor, "__tensor_flatten__"):
        names, _ = tensor.__tensor_flatten__()
        return sum(tensor_bytes(getattr(tensor, name), seen) for name in names)
    size = tensor.numel() * tensor.element_size()
    key = (tensor.data_ptr(), size)
    if size == 0 or key in seen:
        return 0
    seen.add(key)
    return size


def module_bytes(module: torch.nn.Module) -> int:
    seen: set[tuple[int, int]] = set()
    tensors = [*module.parameters(), *module.buffers()]
    return sum(tensor_bytes(tensor, seen) for tensor in tensors)


def _status_kib(field_name: str) -> int | None:
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(f"{field_name}:"):
                return int(line.split()[1])
    return None


def rss_bytes() -> int | None:
    kib = _status_kib("VmRSS")
    return None if kib is None else kib * 1024


def reset_rss_peak() -> bool:
    """Reset Linux's peak resident set size (``VmHWM``) to the current one."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def rss_peak_bytes() -> int | None:
    kib = _status_kib("VmHWM")
    return None if kib is None else kib * 1024


def fix_malloc() -> None:
    """Keep glibc from holding freed tensors: a fixed mmap threshold hands every large block back.

    glibc raises its threshold after large frees, after which the next model's tensors would come
    from (and stay in) the heap and every later cell would start from a higher resident size.
    """
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").mallopt(-3, 128 * 1024)  # M_MMAP_THRESHOLD


def free_memory(device: torch.device) -> None:
    gpu_train._free_memory(_Device(device))  # type: ignore[arg-type]
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


@dataclasses.dataclass
class _Device:
    """What gpu_train's memory helpers read of their Bench: the device."""

    device: torch.device


class Meter:
    """Peak memory of a span: CUDA's allocator on a GPU, the process's resident size on a CPU."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.cuda = device.type == "cuda"

    def start(self) -> int | None:
        """Reset the peak; the memory in use now (the base line of a CPU figure)."""
        if self.cuda:
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            return torch.cuda.memory_allocated(self.device)
        return rss_bytes() if reset_rss_peak() else None

    def peak(self, base: int | None) -> int | None:
        """Peak bytes since :meth:`start`: absolute on CUDA, growth over ``base`` on the CPU."""
        if self.cuda:
            torch.cuda.synchronize(self.device)
            return torch.cuda.max_memory_allocated(self.device)
        peak = rss_peak_bytes()
        return None if peak is None or base is None else max(peak - base, 0)


# ---- the model -------------------------------------------------------------------------------------


@contextlib.contextmanager
def default_dtype(dtype: torch.dtype) -> Iterator[None]:
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def training_config(family: str, settings: gpu_train.Settings, precision: str, via: str) -> TrainingConfig:
    """gpu_train's raytuner side's settings (plain, no checkpointing) with the base's precision."""
    return TrainingConfig.from_options(
        dict(
            **gpu_train.raytuner_options(family, settings),
            base_model_precision=precision,
            quantize_via="accelerator" if via == NOT_APPLICABLE else via,
        )
    )


def load_base(bench: gpu_train.Bench, family: str, training: TrainingConfig) -> torch.nn.Module:
    """The base as a worker gets it: loaded where ``quantize_via`` says, quantised, on the device."""
    load_device = quantize_load_device(training.model, bench.device)
    # gpu_train.build_transformer initialises on its Bench's device: the load device here.
    loader = dataclasses.replace(bench, device=load_device)
    with default_dtype(DTYPE):
        transformer = gpu_train.build_transformer(loader, family, on=load_device, seed=bench.args.seed)
    return quantize_base(transformer, training.model, device=bench.device).requires_grad_(False)


class QuantizedSide(gpu_train.RaytunerSide):
    """gpu_train's raytuner side on a given (quantised) base: the adapter as the worker builds it.

    The step and everything it reads are inherited; only the construction differs, because the
    adapter must be built after quantising (raytuner/quantize.py says why).
    """

    def __init__(
        self,
        bench: gpu_train.Bench,
        family: str,
        settings: gpu_train.Settings,
        training: TrainingConfig,
        transformer: torch.nn.Module,
    ) -> None:
        from raytuner.adapters import build_adapter
        from raytuner.config.lycoris import parse_lycoris
        from raytuner.models.registry import get_family
        from raytuner.train.optim import build_optimizer
        from raytuner.train.schedule import flow_schedule_from_config

        self.bench = bench
        self.training = training
        spec = parse_lycoris(settings.lycoris, where=f"configs/{family}/lycoris_config.json", strict=True)
        assert spec.config is not None, spec.problems
        device = bench.device
        self.family = get_family(family)("random weights, no checkpoint", device=device, dtype=DTYPE)
        self.transformer = transformer
        self.transformer.train()
        self.network, report = build_adapter(
            self.transformer,
            adapter_spec(spec.config, training.model),
            module_aliases=self.family.module_aliases,
            seed=bench.args.seed,
        )
        self.network.to(device=device, dtype=torch.float32)
        self.notes = [report.summary(), *report.warnings]
        self.saving = contextlib.nullcontext
        self.use_stream = None
        self.parameters = [p for p in self.network.parameters() if p.requires_grad]
        self.optimizer = build_optimizer(self.parameters, training.optimization)
        self.schedule = flow_schedule_from_config(training.flow)


# ---- cells -----------------------------------------------------------------------------------------


def cells(args: argparse.Namespace, device: torch.device) -> list[tuple[str, str, str]]:
    """(via, precision, family), accelerator first, the families side by side."""
    vias = VIAS if device.type == "cuda" else ("cpu",)
    order = []
    for via in args.quantize_via or vias:
        for precision in args.precisions:
            if precision == NO_CHANGE and via != vias[0]:
                continue  # nothing to quantise: measured once
            for family in args.families:
                order.append((NOT_APPLICABLE if precision == NO_CHANGE else via, precision, family))
    return order


def run_cell(
    bench: gpu_train.Bench, family: str, precision: str, via: str, settings: gpu_train.Settings
) -> dict[str, Any]:
    """One cell's figures, or why there are none. Never raises: the matrix goes on."""
    args, device = bench.args, bench.device
    entry: dict[str, Any] = {"family": family, "precision": precision, "quantize_via": via}
    training = training_config(family, settings, precision, via)
    problem = quantization_problem(training.model, training.memory, devices=[device])
    if problem:
        entry["skipped"] = problem
        return entry
    if bench.over_budget():
        entry["skipped"] = f"the time budget of {args.budget_s:.0f} s was spent"
        return entry
    meter = Meter(device)
    free_memory(device)
    transformer: torch.nn.Module | None = None
    side: QuantizedSide | None = None
    try:
        base = meter.start()
        start = time.perf_counter()
        transformer = load_base(bench, family, training)
        entry["startup_s"] = time.perf_counter() - start
        peak = meter.peak(base)
        entry["startup_peak_gib"] = None if peak is None else peak / GIB
        entry["weight_bytes"] = module_bytes(transformer)
        entry["weight_gib"] = entry["weight_bytes"] / GIB
        entry["parameters"] = sum(p.numel() for p in transformer.parameters())
        entry["quantized_linears"] = (
            0 if precision == NO_CHANGE else len(quantized_module_names(transformer, precision))
        )
        if device.type == "cuda":
            entry["resident_after_startup_gib"] = torch.cuda.memory_allocated(device) / GIB
        if not args.no_train:
            side = QuantizedSide(bench, family, settings, training, transformer)
            entry["trainable_parameters"] = sum(p.numel() for p in side.parameters)
            entry["adapter_bytes"] = sum(p.numel() * p.element_size() for p in side.parameters)
            entry["notes"] = side.notes
            batch = gpu_train.make_batch(bench, family, 1, seed=1)
            base = meter.start()
            timed = gpu_train.timed_steps(bench, side, batch, warmup=args.warmup, steps=args.steps)
            peak = meter.peak(base)
            # CUDA: gpu_train's figure, over the timed steps once the optimizer state exists.
            train_peak = (
                timed["peak_memory_gib"] if device.type == "cuda" else (None if peak is None else peak / GIB)
            )
            entry.update(
                batch=1,
                step_s=timed["step_s"],
                step_s_all=timed["step_s_all"],
                train_peak_gib=train_peak,
                losses=timed["losses"],
                losses_finite=timed["losses_finite"],
            )
    except Exception as error:
        entry["error"] = gpu_train._describe(error)
    finally:
        if side is not None:
            side.close()
        del side, transformer
        free_memory(device)
    return entry


# ---- results ---------------------------------------------------------------------------------------


def machine(bench: gpu_train.Bench) -> dict[str, Any]:
    info = gpu_train.machine(bench)
    for package in ("optimum-quanto", "torchao"):
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            info["versions"][package] = importlib.metadata.version(package)
    return info


def write_results(bench: gpu_train.Bench) -> None:
    out = Path(bench.args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = dict(bench.results, elapsed_s=time.monotonic() - bench.started)
    (out / "quantized_memory.json").write_text(json.dumps(results, indent=2) + "\n")
    (out / "quantized_memory.md").write_text(markdown(results))


def _number(value: Any, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _scaled(value: float | None, scale: float) -> float | None:
    return None if value is None else value * scale


def markdown(results: dict[str, Any]) -> str:
    info = results["machine"]
    versions = info["versions"]
    where = info.get("gpu") or f"{info['device']}, {info['cpu_count']} cores"
    # The tiny models weigh a few MiB: GiB would print them as zero.
    unit, scale = ("MiB", 1024.0) if results["tiny"] else ("GiB", 1.0)
    training = "no training" if results["no_train"] else f"{results['resolution']} px, batch 1"
    lines = [
        f"# quantized_memory: {where}",
        "",
        f"torch {versions.get('torch')}, diffusers {versions.get('diffusers')}, optimum-quanto "
        f"{versions.get('optimum-quanto')}, torchao {versions.get('torchao')}; "
        f"{'tiny models' if results['tiny'] else 'full size'}, bf16 base; "
        f"{training}; "
        f"elapsed {results['elapsed_s']:.0f} s.",
        "Start-up and training peaks: "
        + (
            "torch.cuda.max_memory_allocated."
            if info.get("gpu")
            else "growth of the peak resident set size over the resident size before each span."
        ),
        "",
        f"| family | precision | quantize_via | quantised linears | weights {unit} | weights / no_change "
        f"| start-up peak {unit} | start-up s | training peak {unit} | s/step | losses |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    reference = {
        c["family"]: c["weight_bytes"]
        for c in results["cells"]
        if c["precision"] == NO_CHANGE and "weight_bytes" in c
    }
    for cell in results["cells"]:
        if "weight_bytes" not in cell:
            continue
        ratio = cell["weight_bytes"] / reference[cell["family"]] if cell["family"] in reference else None
        losses = ", ".join(f"{loss:.3f}" for loss in cell.get("losses", [])) or "-"
        row = [
            cell["family"],
            cell["precision"],
            cell["quantize_via"],
            str(cell["quantized_linears"]),
            _number(_scaled(cell["weight_gib"], scale), 3),
            _number(ratio),
            _number(_scaled(cell.get("startup_peak_gib"), scale), 3),
            _number(cell.get("startup_s"), 1),
            _number(_scaled(cell.get("train_peak_gib"), scale), 3),
            _number(cell.get("step_s"), 3),
            losses,
        ]
        lines.append("| " + " | ".join(row) + " |")
    problems = [c for c in results["cells"] if "error" in c or "skipped" in c]
    if problems:
        lines += ["", "Not measured:", ""]
        lines += [
            f"- {c['family']} {c['precision']} via {c['quantize_via']}: {c.get('error') or c.get('skipped')}"
            for c in problems
        ]
    return "\n".join(lines) + "\n"


def _progress(entry: dict[str, Any]) -> str:
    where = f"{entry['family']:<13} {entry['precision']:<14} via {entry['quantize_via']:<12}"
    if "weight_bytes" not in entry:
        return f"{where} {entry.get('error') or entry.get('skipped')}"
    text = f"{where} weights {entry['weight_gib']:.3f} GiB  start-up peak {_number(entry.get('startup_peak_gib'), 3)} GiB"
    if "step_s" in entry:
        text += f"  training peak {_number(entry.get('train_peak_gib'), 3)} GiB  {entry['step_s']:.3f} s/step"
    return text + (f"  {entry['error']}" if "error" in entry else "")


# ---- main ------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--tiny", action="store_true", help="tiny random configs, 64 px, few steps (CPU tests)"
    )
    parser.add_argument("--device", default=None, help="cuda (default where present) or cpu")
    parser.add_argument(
        "--out", default=None, help="results folder (default: $OUT, else bench/results/quantized_memory)"
    )
    parser.add_argument("--families", nargs="+", choices=FAMILIES, default=list(FAMILIES))
    parser.add_argument("--precisions", nargs="+", choices=PRECISIONS, default=list(PRECISIONS))
    parser.add_argument(
        "--quantize-via", nargs="+", choices=VIAS, default=None, help="default: both on CUDA, cpu on the CPU"
    )
    parser.add_argument("--steps", type=int, default=None, help="timed steps per cell (default 3; --tiny 2)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps before them")
    parser.add_argument(
        "--resolution", type=int, default=None, help="image edge in pixels (default 1024; --tiny 64)"
    )
    parser.add_argument("--no-train", action="store_true", help="weights and start-up memory only")
    parser.add_argument("--budget-s", type=float, default=480.0, help="cells starting later are skipped")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    args.resolution = args.resolution or (64 if args.tiny else 1024)
    args.pixels = args.resolution  # the name gpu_train's make_batch reads
    args.steps = args.steps or (2 if args.tiny else 3)
    args.out = args.out or os.environ.get("OUT") or str(ROOT / "bench" / "results" / "quantized_memory")
    if args.resolution % 16:
        parser.error("--resolution must be a multiple of 16 (8 pixels per latent, 2 latents per token)")
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    device = gpu_train.bench_device(args.device)
    fix_malloc()
    bench = gpu_train.Bench(
        args=args,
        device=device,
        configs=gpu_train.TINY_CONFIGS
        if args.tiny
        else {"cosmos2image": gpu_train.COSMOS2_2B, "omnigen": gpu_train.OMNIGEN_V1},
    )
    bench.results = {
        "command": " ".join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])]),
        "tiny": args.tiny,
        "no_train": args.no_train,
        "resolution": args.resolution,
        "machine": machine(bench),
        "cells": [],
    }
    print(json.dumps(bench.results["machine"]), flush=True)
    settings = {family: gpu_train.quickstart_settings(family) for family in args.families}
    for via, precision, family in cells(args, device):
        entry = run_cell(bench, family, precision, via, settings[family])
        bench.results["cells"].append(entry)
        write_results(bench)
        print(_progress(entry), flush=True)
    write_results(bench)
    print((Path(args.out) / "quantized_memory.md").read_text(), flush=True)
    return json.loads((Path(args.out) / "quantized_memory.json").read_text())


if __name__ == "__main__":
    main()
