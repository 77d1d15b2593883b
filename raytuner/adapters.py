"""LyCORIS LoKr adapters: build from a ``lycoris_config.json``, report what matched, save and load.

Everything goes through the ``lycoris`` package so that the file written here loads with the
recipe SimpleTuner users already have::

    wrapper, _ = create_lycoris_from_weights(scale, "pytorch_lora_weights.safetensors", pipe.transformer)
    wrapper.merge_to()

Two traps handled here:

* ``LycorisNetwork.apply_preset`` writes *class-level* state (target modules, algo maps, the key
  prefix). Building one adapter would otherwise change every adapter built after it in the same
  process, and a changed ``LORA_PREFIX`` would make saved files unloadable. :func:`build_adapter`
  builds inside ``raytuner.upstream.preserved_lycoris_class_state``, which restores that state.
* Presets name module *classes*, and LyCORIS matches class names exactly. A family maps the
  names users write (``FeedForward`` in the OmniGen seed) to diffusers' class names
  (``OmniGenFeedForward``) through its ``module_aliases``.
"""

from __future__ import annotations

import copy
import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

import torch
from lycoris import LycorisNetwork, create_lycoris, create_lycoris_from_weights
from lycoris.modules.lokr import LokrModule
from lycoris.modules.norms import NormModule

from raytuner.config import LycorisConfig
from raytuner.errors import RaytunerError
from raytuner.filenames import ADAPTER_FILENAME
from raytuner.upstream import preserved_lycoris_class_state

logger = logging.getLogger(__name__)


class AdapterError(RaytunerError, ValueError):
    """A problem with an adapter file or an adapter spec, stated in one line."""


@dataclass(frozen=True, kw_only=True)
class AdapterReport:
    """How an adapter build went: modules per preset target, parameters, warnings."""

    modules_per_target: dict[str, int]
    total_modules: int
    trainable_parameters: int
    algo_counts: dict[str, int]
    warnings: list[str] = field(default_factory=list)

    def summary(self) -> str:
        per_target = ", ".join(f"{name}: {count}" for name, count in self.modules_per_target.items())
        return (
            f"LyCORIS adapter: {self.total_modules} modules ({per_target or 'no preset targets'}), "
            f"{self.trainable_parameters:,} trainable parameters"
        )


def expand_preset_aliases(
    preset: Mapping[str, Any],
    module_aliases: Mapping[str, Sequence[str]],
    present_class_names: Sequence[str],
) -> dict[str, Any]:
    """A copy of ``preset`` naming the model's own classes for each name the user wrote.

    A name maps to itself and its aliases, keeping those the model has; a name with none present
    is kept as written, so LyCORIS and :func:`build_adapter` still report it as unmatched.
    """
    expanded = copy.deepcopy(dict(preset))
    present = set(present_class_names)

    def with_aliases(names: Sequence[str]) -> list[str]:
        result: list[str] = []
        for name in names:
            candidates = [c for c in (name, *module_aliases.get(name, ())) if c in present] or [name]
            result.extend(c for c in candidates if c not in result)
        return result

    if "target_module" in expanded:
        expanded["target_module"] = with_aliases(expanded["target_module"])
    if "module_algo_map" in expanded:
        algo_map: dict[str, Any] = {}
        for name, settings in expanded["module_algo_map"].items():
            for candidate in with_aliases([name]):
                algo_map.setdefault(candidate, copy.deepcopy(settings))
        expanded["module_algo_map"] = algo_map
    return expanded


def _module_class_names(model: torch.nn.Module) -> list[str]:
    return sorted({type(module).__name__ for module in model.modules()})


def _count_modules_per_target(
    model: torch.nn.Module,
    network: LycorisNetwork,
    targets: Sequence[str],
    module_aliases: Mapping[str, Sequence[str]],
    lora_prefix: str,
) -> dict[str, int]:
    lora_names = [lora.lora_name for lora in network.loras]
    counts: dict[str, int] = {}
    for target in targets:
        class_names = {target, *module_aliases.get(target, ())}
        prefixes = [
            f"{lora_prefix}_{name}".replace(".", "_") + "_"
            for name, module in model.named_modules()
            if type(module).__name__ in class_names
        ]
        counts[target] = sum(1 for lora_name in lora_names if any(lora_name.startswith(p) for p in prefixes))
    return counts


def build_adapter(
    model: torch.nn.Module,
    spec: LycorisConfig,
    *,
    module_aliases: Mapping[str, Sequence[str]] | None = None,
    seed: int | None = None,
) -> tuple[LycorisNetwork, AdapterReport]:
    """Wrap ``model`` with a LyCORIS network built from a loaded ``lycoris_config.json``.

    The base model is frozen; only the adapter's parameters require gradients afterwards.
    LyCORIS initialises its weights from torch's global generator; with ``seed`` the
    initialisation is reproducible and the caller's generator state is left as it was.
    """
    aliases = module_aliases or {}
    kwargs = spec.create_kwargs()
    multiplier = float(kwargs.pop("multiplier"))
    linear_dim = int(kwargs.pop("linear_dim"))
    linear_alpha = float(kwargs.pop("linear_alpha"))
    user_preset = spec.apply_preset.to_dict() if spec.apply_preset else {}
    preset = expand_preset_aliases(user_preset, aliases, _module_class_names(model))

    model.requires_grad_(False)
    with preserved_lycoris_class_state(), torch.random.fork_rng(devices=[]):
        if seed is not None:
            torch.manual_seed(seed)
        if preset:
            LycorisNetwork.apply_preset(preset)
        network = create_lycoris(model, multiplier, linear_dim, linear_alpha, **kwargs)
        _refuse_weightless_norms(network, model)
        network.apply_to()
        # The prefix names the saved keys; read it while the preset's class state is in force.
        lora_prefix = LycorisNetwork.LORA_PREFIX
    network.requires_grad_(True)

    targets = list(user_preset.get("target_module", []))
    for name in user_preset.get("module_algo_map", {}):
        if name not in targets:
            targets.append(name)
    counts = _count_modules_per_target(model, network, targets, aliases, lora_prefix)

    warnings: list[str] = []
    unmatched = [target for target, count in counts.items() if count == 0]
    if unmatched:
        warnings.append(
            f"lycoris_config apply_preset target(s) {', '.join(unmatched)} matched no module of "
            f"{type(model).__name__}; its module classes are: {', '.join(_module_class_names(model))}"
        )
    if not network.loras:
        warnings.append(f"the LyCORIS network has no modules: nothing in {type(model).__name__} will train")
    scaled = [lora for lora in network.loras if isinstance(lora, LokrModule) and abs(lora.scale - 1) > 1e-6]
    if scaled and lokr_merge_differs_from_training():
        warnings.append(
            f"{len(scaled)} LoKr module(s) have scale linear_alpha/linear_dim = {scaled[0].scale:g}, and the "
            "installed lycoris applies that scale twice when merging (merge_to, the seeds' inference "
            "recipe) but once in training: the merged model will differ from the one trained. Set "
            "linear_alpha equal to linear_dim, or use full-matrix LoKr (linear_dim 10000, as the seeds do)"
        )

    algo_counts: dict[str, int] = {}
    for lora in network.loras:
        algo_counts[type(lora).__name__] = algo_counts.get(type(lora).__name__, 0) + 1
    report = AdapterReport(
        modules_per_target=counts,
        total_modules=len(network.loras),
        trainable_parameters=sum(p.numel() for p in network.parameters() if p.requires_grad),
        algo_counts=algo_counts,
        warnings=warnings,
    )
    logger.info(report.summary())
    for warning in warnings:
        logger.warning(warning)
    return network, report


def _refuse_weightless_norms(network: LycorisNetwork, model: torch.nn.Module) -> None:
    """train_norm on a norm without a learnable weight would fail inside lycoris on the first step."""
    weightless = [
        lora.lora_name
        for lora in network.loras
        if isinstance(lora, NormModule) and getattr(lora.org_module[0], "weight", None) is None
    ]
    if weightless:
        raise AdapterError(
            f"lycoris_config train_norm wraps {len(weightless)} norm layer(s) of {type(model).__name__} that "
            f"have no learnable weight (e.g. {weightless[0]}); lycoris cannot train them and would fail on the "
            "first step: set train_norm to false, or narrow apply_preset to modules with affine norms"
        )


@cache
def lokr_merge_differs_from_training() -> bool:
    """True when the installed lycoris merges a scaled LoKr module differently from its forward pass.

    lycoris 4.1.3 multiplies the Kronecker product by ``alpha / dim`` in ``get_weight`` and again in
    ``get_diff_weight``, which ``merge_to`` uses. Probed on a small module rather than assumed from
    the version, so a fixed lycoris silences the warning by itself.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        # 64 = 8 x 8 with rank 2: both Kronecker factors low-rank, so scale = alpha / dim = 0.5.
        base = torch.nn.Linear(64, 64, bias=False)
        module = LokrModule(
            "probe", base, multiplier=1.0, lora_dim=2, alpha=1.0, factor=8, decompose_both=True
        )
        with torch.no_grad():
            for parameter in module.parameters():
                if parameter.requires_grad:
                    parameter.normal_()
        module.apply_to()
        inputs = torch.randn(4, 64)
        with torch.no_grad():
            trained = module(inputs)
            merged_weight, _ = module.get_merged_weight(multiplier=1.0)
            merged = torch.nn.functional.linear(inputs, merged_weight)
        module.restore()
    return not torch.allclose(trained, merged, atol=1e-4, rtol=1e-4)


def plain_tensors(state: Mapping[str, Any]) -> dict[str, Any]:
    """``state`` with every Parameter detached into a plain tensor, ready for ``torch.save``.

    LyCORIS's modules put their Parameter objects themselves into ``state_dict()``; DeepSpeed tags
    those with process groups, which cannot be pickled into a checkpoint.
    """
    return {
        key: value.detach() if isinstance(value, torch.nn.Parameter) else value
        for key, value in state.items()
    }


def save_adapter(
    network: LycorisNetwork,
    path: str | Path,
    *,
    dtype: torch.dtype = torch.float32,
    metadata: Mapping[str, Any] | None = None,
) -> Path:
    """Write the adapter as safetensors (``pytorch_lora_weights.safetensors`` when given a folder).

    Written to a temporary name and renamed, so a crash never leaves a truncated adapter behind.
    """
    path = Path(path)
    if path.suffix != ".safetensors":
        path = path / ADAPTER_FILENAME
    path.parent.mkdir(parents=True, exist_ok=True)
    string_metadata = {
        key: value if isinstance(value, str) else json.dumps(value, sort_keys=True)
        for key, value in (metadata or {}).items()
    }
    # lycoris picks the format from the suffix, so the temporary name keeps ".safetensors".
    partial = path.with_name(f".{path.stem}.partial.safetensors")
    network.save_weights(str(partial), dtype, string_metadata)
    partial.replace(path)
    return path


@dataclass(frozen=True, kw_only=True)
class AdapterFileInfo:
    """What an adapter file says about itself, read without loading its tensors."""

    path: Path
    module_names: frozenset[str]  # LyCORIS module names (the part of each key before the first dot)
    metadata: dict[str, str]

    @property
    def family(self) -> str | None:
        """The model family raytuner trained it for (``raytuner_family`` metadata), if recorded."""
        return self.metadata.get("raytuner_family")


_SAFETENSORS_HEADER_LIMIT = 100 * 1024 * 1024  # safetensors itself refuses larger headers


def inspect_adapter_file(path: str | Path) -> AdapterFileInfo:
    """Check that ``path`` is a whole LyCORIS safetensors file and read its module names and metadata.

    The safetensors format is an 8-byte little-endian header length, a JSON header naming every
    tensor's byte range, then the data. That layout is read here, before ``safetensors`` opens the
    file, so that a truncated download and a file of another format get messages that say so
    (safetensors' own errors read "invalid header length" or "header too large" for both).
    """
    path = Path(path)
    if not path.exists():
        raise AdapterError(f"adapter file {path} does not exist")
    if path.is_dir():
        raise AdapterError(f"adapter {path} is a folder without {ADAPTER_FILENAME}")
    size = path.stat().st_size
    with path.open("rb") as handle:
        prefix = handle.read(8)
        header_length = int.from_bytes(prefix, "little") if len(prefix) == 8 else 0
        header_bytes = handle.read(header_length) if 0 < header_length <= _SAFETENSORS_HEADER_LIMIT else b""
    try:
        header = json.loads(header_bytes.decode("utf-8")) if header_bytes else None
    except (UnicodeDecodeError, ValueError):
        header = None
    if not isinstance(header, dict):
        if header_length and 8 + header_length > size and prefix[:1] != b"{" and header_length < size * 64:
            raise AdapterError(
                f"adapter file {path} is truncated ({size:,} bytes; its header alone says {8 + header_length:,}): "
                "download or copy it again"
            )
        raise AdapterError(
            f"adapter file {path} is not a safetensors file ({size:,} bytes that do not start with a "
            f"safetensors header): raytuner reads LyCORIS adapters saved as {ADAPTER_FILENAME}"
        )
    raw_metadata = header.pop("__metadata__", None) or {}
    data_end = max(
        (int(entry["data_offsets"][1]) for entry in header.values() if isinstance(entry, dict)), default=0
    )
    if 8 + header_length + data_end > size:
        raise AdapterError(
            f"adapter file {path} is truncated ({size:,} bytes of {8 + header_length + data_end:,}): "
            "download or copy it again"
        )
    module_names = frozenset(key.split(".", 1)[0] for key in header)
    if not module_names:
        raise AdapterError(f"adapter file {path} holds no tensors")
    metadata = {str(key): str(value) for key, value in dict(raw_metadata).items()}
    return AdapterFileInfo(path=path, module_names=module_names, metadata=metadata)


def load_adapter(
    path: str | Path,
    model: torch.nn.Module,
    *,
    scale: float = 1.0,
    merge: bool = True,
    family: str | None = None,
) -> LycorisNetwork:
    """Load an adapter into ``model`` the way the seeds' inference example does.

    ``merge=True`` folds the weights into the model (``wrapper.merge_to()``); otherwise the
    modules are applied as hooks and can be removed again with ``restore()``. The file is checked
    first (:func:`inspect_adapter_file`); with ``family``, an adapter raytuner recorded as trained
    for another family is refused by name, and any adapter whose modules are not all in ``model``
    is refused, since merging part of an adapter gives a model nobody trained.
    """
    info = inspect_adapter_file(path)
    path = info.path
    if family is not None and info.family is not None and info.family != family:
        raise AdapterError(
            f"adapter file {path} was trained for {info.family} (its raytuner_family metadata), "
            f"not for this {family} model: pass the model it was trained on"
        )
    try:
        network, _ = create_lycoris_from_weights(scale, str(path), model)
    except Exception as error:  # a damaged tensor, or shapes that do not fit this model
        first_line = (str(error).strip().splitlines() or [""])[0]
        raise AdapterError(
            f"adapter file {path} does not fit {type(model).__name__} ({type(error).__name__}: {first_line}): "
            "was it trained for another model or model size?"
        ) from error
    if not network.loras:
        raise AdapterError(
            f"adapter file {path} matches no module of {type(model).__name__}: was it trained for another "
            f"model family, or is it not a LyCORIS file (keys 'lycoris_<module>.<weight>'; this one has e.g. "
            f"{sorted(info.module_names)[0]!r})?"
        )
    unmatched = info.module_names - {lora.lora_name for lora in network.loras}
    if unmatched:
        raise AdapterError(
            f"adapter file {path}: {len(unmatched)} of its {len(info.module_names)} modules are not in "
            f"{type(model).__name__} (e.g. {sorted(unmatched)[0]}): was it trained for another model?"
        )
    if merge:
        network.merge_to()
    else:
        network.apply_to()
    return network
