"""bench/gpu_train.py in its --tiny mode on the CPU: both sides train, without Ray, and say so."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

pytestmark = pytest.mark.slow  # trains the tiny models: seconds a test

BENCH = Path(__file__).resolve().parents[1] / "bench" / "gpu_train.py"
TINY = ("--tiny", "--device", "cpu", "--pixels", "32", "--warmup", "0", "--steps", "1")


def load_bench(monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    spec = importlib.util.spec_from_file_location("gpu_train", BENCH)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "gpu_train", module)  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def run(bench: ModuleType, out: Path, family: str, strategy: str) -> dict[str, Any]:
    argv = [*TINY, "--out", str(out), "--families", family, "--strategies", strategy]
    results = bench.main([*argv, "--checkpointing", "off", "--batches", "1"])
    assert json.loads((out / "gpu_train.json").read_text()) == results
    cells = results["cells"]
    assert [(c["family"], c["strategy"], c["side"]) for c in cells] == [
        (family, strategy, "raytuner"),
        (family, strategy, "bare"),
    ]
    for cell in cells:
        assert "error" not in cell and "skipped" not in cell, cell
        assert cell["batch"] == 1 and cell["step_s"] > 0 and cell["samples_per_s"] > 0
        assert all(math.isfinite(loss) for loss in cell["losses"])
    # Both sides train the same LoKr: the quickstart's lycoris_config.json on the same modules.
    assert cells[0]["trainable_parameters"] == cells[1]["trainable_parameters"] > 0
    assert results["flops_per_sample"][family] > 0
    assert f"| {family} | {strategy} | off | 1 |" in (out / "gpu_train.md").read_text()
    return results


def test_tiny_runs_train_both_sides_without_ray_or_deepspeed(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    # The GPU machine has neither: nothing on the benchmark's path may import them.
    monkeypatch.setitem(sys.modules, "ray", None)
    monkeypatch.setitem(sys.modules, "deepspeed", None)
    bench = load_bench(monkeypatch)
    run(bench, tmp_path / "plain", "cosmos2image", "plain")
    offloaded = run(bench, tmp_path / "offload", "omnigen", "group_offload")["cells"][0]
    # Streams need CUDA: on the CPU raytuner offloads without them and says why.
    assert offloaded["use_stream"] is False
    assert any("streams need a CUDA device" in note for note in offloaded["notes"])
