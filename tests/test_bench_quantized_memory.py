"""bench/quantized_memory.py in its --tiny mode on the CPU: the figures are there and int8 is smaller."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path
from types import ModuleType

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench" / "quantized_memory.py"
TINY = ("--tiny", "--device", "cpu", "--resolution", "32", "--warmup", "0", "--steps", "1")


def load_bench(monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    spec = importlib.util.spec_from_file_location("quantized_memory", BENCH)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    # Its dataclasses, and gpu_train's that it imports, look their modules up.
    monkeypatch.setitem(sys.modules, "quantized_memory", module)
    monkeypatch.delitem(sys.modules, "gpu_train", raising=False)
    monkeypatch.setattr(sys, "path", list(sys.path))  # the bench folder it adds goes again
    spec.loader.exec_module(module)
    return module


def test_tiny_run_measures_weights_startup_and_training(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    # The GPU machine has neither: nothing on the benchmark's path may import them.
    monkeypatch.setitem(sys.modules, "ray", None)
    monkeypatch.setitem(sys.modules, "deepspeed", None)
    bench = load_bench(monkeypatch)
    argv = [*TINY, "--out", str(tmp_path), "--families", "cosmos2image"]
    results = bench.main([*argv, "--precisions", "no_change", "int8-quanto"])
    assert json.loads((tmp_path / "quantized_memory.json").read_text()) == results
    cells = {cell["precision"]: cell for cell in results["cells"]}
    assert list(cells) == ["no_change", "int8-quanto"]
    assert cells["no_change"]["quantize_via"] == "-" and cells["int8-quanto"]["quantize_via"] == "cpu"
    for cell in cells.values():
        assert "error" not in cell and "skipped" not in cell, cell
        assert cell["weight_bytes"] > 0 and cell["startup_peak_gib"] is not None
        assert cell["step_s"] > 0 and cell["train_peak_gib"] is not None
        assert len(cell["losses"]) == 1 and all(math.isfinite(loss) for loss in cell["losses"])
        assert cell["trainable_parameters"] > 0
    assert cells["no_change"]["quantized_linears"] == 0 < cells["int8-quanto"]["quantized_linears"]
    # int8 data plus per-row scales: well under the bf16 weights, counted through quanto's tensors.
    assert cells["int8-quanto"]["weight_bytes"] < 0.8 * cells["no_change"]["weight_bytes"]
    table = (tmp_path / "quantized_memory.md").read_text()
    assert "| cosmos2image | int8-quanto | cpu |" in table


def test_quantised_tensors_are_counted_by_their_storage(monkeypatch: pytest.MonkeyPatch) -> None:
    import torch
    from optimum import quanto

    bench = load_bench(monkeypatch)
    layer = torch.nn.Linear(64, 64, bias=False).to(torch.bfloat16)
    assert bench.module_bytes(layer) == 64 * 64 * 2
    quanto.quantize(layer, weights=quanto.qint4)
    quanto.freeze(layer)
    # Packed 4-bit data (two values a byte) plus bf16 scales and shifts: under a byte per weight.
    assert bench.module_bytes(layer) < 64 * 64
