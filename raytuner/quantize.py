"""Quantising the frozen base transformer: SimpleTuner's ``base_model_precision`` and ``quantize_via``.

What runs, weights only (activations stay in the base dtype, as SimpleTuner does by default):

* ``int8-quanto``, ``fp8-quanto``, ``fp8uz-quanto``, ``int4-quanto``, ``int2-quanto``: optimum-quanto
  ``quantize`` + ``freeze`` with qint8 / qfloat8 (e4m3fn) / qfloat8_e4m3fnuz / qint4 / qint2 weights;
  ``nn.Linear`` becomes ``QLinear``.
* ``int8-torchao``: torchao ``quantize_`` with ``Int8WeightOnlyConfig``; the weight becomes an
  ``Int8Tensor`` inside the same ``nn.Linear``.
* ``fp8wo-torchao``: torchao ``Float8WeightOnlyConfig`` (float8 e4m3fn weights, per row); the
  weight becomes a ``Float8Tensor``.
* ``fp8-torchao``: torchao ``Float8DynamicActivationFloat8WeightConfig``, as SimpleTuner maps it
  (weight-only float8 is SimpleTuner's ``fp8wo-torchao``): activations are cast to float8 too and
  the matmul runs in float8.

All but ``fp8-torchao`` run on the CPU as well as on CUDA GPUs (checked with optimum-quanto 0.2.7
and torchao 0.18.0): weight-only float8 dequantises and multiplies in the base dtype. torchao
refuses float8 activations below CUDA compute capability 8.9 ("Float8 dynamic quantization
requires CUDA compute capability ≥8.9"), so ``fp8-torchao`` needs an Ada or Hopper GPU or newer;
float8 weights on Apple's MPS are refused (no float8 dtype there). Every other SimpleTuner value
(sdnq, bnb, transformerengine, fp8-native, the other activation-quantising torchao modes) is
refused when the config is loaded (``raytuner/config/training.py``); :func:`quantization_problem`
finds the rest before Ray starts.

Which layers: only the ``nn.Linear`` layers of the repeated transformer blocks
(``transformer_blocks`` in ``CosmosTransformer3DModel``, ``layers`` in
``OmniGenTransformer2DModel``), which hold nearly all of the weights, minus the AdaLN modulation
linears inside those blocks (Cosmos' ``norm1``/``norm2``/``norm3``): their output scales and shifts
every activation of the block, so their rounding error is amplified, and they are small. Outside the
blocks nothing is quantised: patch and timestep embeddings, the token embedding, every norm and
``proj_out`` (which SimpleTuner also keeps) are small and sit where an error reaches the output
directly. torchao additionally skips linears whose dimensions are not multiples of 16, as
SimpleTuner's torchao filter does.

The LoKr adapter is built after quantising: quanto replaces each ``nn.Linear`` by a new
``QLinear`` object, which would drop hooks installed earlier, and ``QLinear`` still subclasses
``nn.Linear``, so LyCORIS wraps exactly the same modules. LyCORIS forces its bypass forward
(base output + LoKr output) on quanto layers; for torchao's tensor subclasses it is asked for
explicitly (:func:`adapter_spec`), since its default forward adds the delta to the base weight.
The saved adapter's keys therefore match an unquantised run and load into the unquantised model.
"""

from __future__ import annotations

import dataclasses
import importlib
import logging
from collections.abc import Sequence
from fnmatch import fnmatchcase
from typing import TypeVar

import torch

from raytuner.config import LycorisConfig
from raytuner.config.training import QUANTIZED_PRECISIONS, MemorySection, ModelSection
from raytuner.errors import RaytunerError
from raytuner.models.registry import get_family

logger = logging.getLogger(__name__)

# quantize_base hands back the module it was given (quantised in place), typed as it came.
ModuleT = TypeVar("ModuleT", bound=torch.nn.Module)

NO_CHANGE = "no_change"
# base_model_precision -> the name of optimum.quanto's weight qtype.
QUANTO_WEIGHTS: dict[str, str] = {
    "int8-quanto": "qint8",
    "fp8-quanto": "qfloat8",
    "int4-quanto": "qint4",
    "int2-quanto": "qint2",
    "fp8uz-quanto": "qfloat8_e4m3fnuz",  # the float8 variant AMD Instinct GPUs compute in
}
# base_model_precision -> the name of torchao's config class (built with its defaults).
TORCHAO_CONFIGS: dict[str, str] = {
    "int8-torchao": "Int8WeightOnlyConfig",
    "fp8wo-torchao": "Float8WeightOnlyConfig",
    "fp8-torchao": "Float8DynamicActivationFloat8WeightConfig",
}
FLOAT8_PRECISIONS: tuple[str, ...] = ("fp8-quanto", "fp8uz-quanto", "fp8wo-torchao", "fp8-torchao")
# Float8 matmuls: torchao's own requirement, checked before the model loads.
FLOAT8_MATMUL_PRECISIONS: tuple[str, ...] = ("fp8-torchao",)
FLOAT8_MATMUL_CAPABILITY = (8, 9)
# backend -> (module to import, package to pip install)
PACKAGES: dict[str, tuple[str, str]] = {
    "quanto": ("optimum.quanto", "optimum-quanto"),
    "torchao": ("torchao", "torchao"),
}
# Linears of the blocks whose name matches one of these stay unquantised (AdaLN modulation).
KEPT_LINEARS: tuple[str, ...] = ("*.norm*",)


class QuantizationError(RaytunerError, ValueError):
    """A base_model_precision that cannot run here, in one line."""


def is_quantized(model: ModelSection) -> bool:
    return model.base_model_precision != NO_CHANGE


def backend(precision: str) -> str:
    """``quanto`` or ``torchao``: the library that runs ``precision``."""
    return "quanto" if precision in QUANTO_WEIGHTS else "torchao"


def _setting(model: ModelSection) -> str:
    return f"'base_model_precision' = '{model.base_model_precision}'"


def _import_problem(precision: str) -> str | None:
    module, package = PACKAGES[backend(precision)]
    try:
        importlib.import_module(module)
    except ImportError as error:
        first = (str(error).strip().splitlines() or [type(error).__name__])[0]
        return (
            f"needs the {package} package, which cannot be imported ({first}): "
            f"pip install 'raytuner[quantization]' (or {package}), or set base_model_precision to no_change"
        )
    return None


def quantization_problem(
    model: ModelSection, memory: MemorySection, *, devices: Sequence[torch.device]
) -> str | None:
    """Why ``base_model_precision`` cannot run on ``devices`` with this memory strategy, or None."""
    return precision_problem(model, devices=devices) or _memory_problem(model, memory)


def precision_problem(model: ModelSection, *, devices: Sequence[torch.device]) -> str | None:
    """Why ``base_model_precision`` cannot run on ``devices`` (the workers' devices), or None.

    ``devices`` may be empty when the caller cannot see them (a head node without the workers'
    GPUs); each worker checks its own device again before it quantises.
    """
    precision = model.base_model_precision
    if precision == NO_CHANGE:
        return None
    if precision not in QUANTIZED_PRECISIONS:  # the config loader refuses these already
        return f"{_setting(model)}: expected one of: {', '.join((NO_CHANGE, *QUANTIZED_PRECISIONS))}"
    missing = _import_problem(precision)
    if missing:
        return f"{_setting(model)} {missing}"
    if precision in FLOAT8_PRECISIONS and any(device.type == "mps" for device in devices):
        return (
            f"{_setting(model)}: float8 weights cannot run on Apple MPS (no float8 dtype there): "
            "use int8-quanto or int8-torchao"
        )
    if precision in FLOAT8_MATMUL_PRECISIONS:
        slow = [str(device) for device in devices if not _runs_float8_matmuls(device)]
        if slow:
            return (
                f"{_setting(model)}: float8 activations need a CUDA GPU of compute capability 8.9 or newer "
                f"(Ada, Hopper), not {slow[0]}: use fp8wo-torchao (float8 weights only) or int8-quanto"
            )
    return None


def _memory_problem(model: ModelSection, memory: MemorySection) -> str | None:
    if not is_quantized(model):
        return None
    if memory.deepspeed_config:
        # Checked with deepspeed 0.19.8, ZeRO-2 and ZeRO-3: deepspeed.initialize fails moving the
        # engine's module ("_apply(): Couldn't swap QLinear.weight", likewise torchao's Linear.weight).
        return (
            f"{_setting(model)} with deepspeed_config: DeepSpeed cannot hold quantised base weights; "
            "remove deepspeed_config (the quantised base already saves the memory) or set base_model_precision to no_change"
        )
    if memory.enable_group_offload and memory.group_offload_to_disk_path is not None:
        # Group offload in memory runs on a quantised base; to disk, safetensors cannot write
        # quanto's or torchao's weight tensors (diffusers refuses torchao's by name).
        return (
            f"{_setting(model)} with group_offload_to_disk_path: quantised weights cannot be offloaded "
            "to disk; remove group_offload_to_disk_path (offload to CPU memory) or set base_model_precision to no_change"
        )
    return None


def _runs_float8_matmuls(device: torch.device) -> bool:
    if device.type != "cuda":
        return False
    if torch.version.hip:  # ROCm: torchao decides (MI300 and newer have float8)
        return True
    return torch.cuda.get_device_capability(device) >= FLOAT8_MATMUL_CAPABILITY


def quantization_warnings(model: ModelSection) -> list[str]:
    """What the driver logs once about a quantised base that will run."""
    advice = get_family(model.model_family).quantized_base_advice
    if is_quantized(model) and advice is not None:
        return [f"{_setting(model)}: {advice}"]
    return []


def quantized_module_names(transformer: torch.nn.Module, precision: str) -> list[str]:
    """The ``nn.Linear`` layers :func:`quantize_base` quantises (see the module docstring)."""
    blocks = [name for name, child in transformer.named_children() if isinstance(child, torch.nn.ModuleList)]
    names = []
    for name, module in transformer.named_modules():
        if not isinstance(module, torch.nn.Linear) or not any(name.startswith(f"{b}.") for b in blocks):
            continue
        if any(fnmatchcase(name, pattern) for pattern in KEPT_LINEARS):
            continue
        # SimpleTuner's torchao filter: float8 and int8 kernels want dimensions in multiples of 16.
        if backend(precision) == "torchao" and (module.in_features % 16 or module.out_features % 16):
            continue
        names.append(name)
    return names


def quantize_load_device(model: ModelSection, device: torch.device) -> torch.device:
    """Where to load the base before quantising: the CPU for ``quantize_via`` ``cpu``, else ``device``.

    Quantising on the CPU first means the full-precision weights never reach the GPU, which avoids
    running out of memory at start-up (the OmniGen quickstart's advice for small GPUs).
    """
    if is_quantized(model) and model.quantize_via == "cpu":
        return torch.device("cpu")
    return device


def quantize_base(transformer: ModuleT, model: ModelSection, *, device: torch.device) -> ModuleT:
    """Quantise the frozen ``transformer`` in place as ``base_model_precision`` says, then move it to ``device``.

    With ``no_change`` the transformer is returned as it is. Quantising happens on whatever device
    the transformer is on (see :func:`quantize_load_device`).
    """
    precision = model.base_model_precision
    if precision == NO_CHANGE:
        return transformer
    problem = precision_problem(model, devices=[device])
    if problem:
        raise QuantizationError(problem)
    names = quantized_module_names(transformer, precision)
    if backend(precision) == "quanto":
        quanto = importlib.import_module("optimum.quanto")
        quanto.quantize(transformer, weights=getattr(quanto, QUANTO_WEIGHTS[precision]), include=names)
        quanto.freeze(transformer)
    else:
        torchao = importlib.import_module("torchao.quantization")
        config = getattr(torchao, TORCHAO_CONFIGS[precision])()
        chosen = set(names)
        torchao.quantize_(transformer, config, filter_fn=lambda module, fqn: fqn in chosen)
    # quanto's new QLinear modules create their parameters with gradients on.
    transformer.requires_grad_(False)
    logger.info("base quantised to %s: %d linear layers (via %s)", precision, len(names), model.quantize_via)
    return transformer.to(device)


def adapter_spec(spec: LycorisConfig, model: ModelSection) -> LycorisConfig:
    """The LyCORIS spec to build on the base: bypass forward when the base is quantised.

    Bypass (base output + LoKr applied to the input) never touches the quantised weight; the saved
    keys are the same either way.
    """
    if not is_quantized(model) or spec.bypass_mode:
        return spec
    return dataclasses.replace(spec, bypass_mode=True)
