"""``load_config``: SimpleTuner's three files in, one typed ``RunConfig`` out.

The config may be config.json, config.toml or config.env (``raytuner/config/formats.py``).
Nothing is silently dropped: every key is sorted by the compatibility table
(``raytuner/config/compatibility.py``): a field, a SimpleTuner alias (mapped, with a note), a
not-yet-supported option (warning), a not-applicable one (warning saying what replaces it), or
unknown (an error for a near miss of a known key, else a warning with the closest known key); a
key set twice keeps the later value, as in SimpleTuner. ``strict=True`` refuses unknown keys one by one
and not-yet-supported ones in a single line. Problems are collected across all three files and
raised together as one ``ConfigError``.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any

from raytuner.config.datasets import DatasetConfig, default_text_embeds, parse_datasets
from raytuner.config.deepspeed import DeepSpeedConfigError, parse_deepspeed
from raytuner.config.errors import ConfigError
from raytuner.config.fields import FALSE_WORDS, TRUE_WORDS, CoercionError, build, coerce, field_names, problem
from raytuner.config.formats import read_json, read_options
from raytuner.config.keys import KeyFindings, sort_key
from raytuner.config.lycoris import LycorisConfig, parse_lycoris
from raytuner.config.paths import (
    display,
    find_input_dir,
    find_input_file,
    has_scheme,
    input_candidates,
    output_path,
)
from raytuner.config.placeholders import fill_dataset_placeholders, fill_env_placeholders
from raytuner.config.prompt_library import library_selector
from raytuner.config.redact import show_value
from raytuner.config.run import RunConfig
from raytuner.config.seed import draw_seed, read_recorded_seed, seed_file
from raytuner.config.surface import did_you_mean, flavours, key_aliases, simpletuner_families
from raytuner.config.training import ModelSection, TrainingConfig, replace_options
from raytuner.config.webhooks import read_webhook_config
from raytuner.models.registry import family_aliases, get_family, known_families

logger = logging.getLogger(__name__)


def load_config(path: str | Path, *, strict: bool = False) -> RunConfig:
    """Load ``config.json`` and the files it names into a validated ``RunConfig``.

    Never writes anything; see ``record_seed`` for the one file a run records.
    """
    config_path = Path(path).expanduser()
    if not config_path.is_file():
        read_options(config_path)  # raises the not-found / is-a-folder error
    config_path = config_path.resolve()
    where = display(config_path)
    options = read_options(config_path)
    findings = KeyFindings(
        problems=list(options.problems), warnings=list(options.warnings), notes=list(options.notes)
    )
    pairs = [(key, fill_env_placeholders(value)) for key, value in options.pairs]
    values = _sort_config_keys(pairs, where=where, strict=strict, findings=findings)
    unsupported_family = _family_problem(values.get("model_family"), where=where)
    if unsupported_family is not None:
        # Nothing else is worth reading for a family raytuner cannot train: this line alone.
        raise ConfigError(unsupported_family)
    training = build(TrainingConfig, values, where=where, problems=findings.problems)
    sources: dict[str, Path] = {"config": config_path}
    datasets: list[DatasetConfig] = []
    lycoris: LycorisConfig | None = None
    if training is not None:
        model = _check_model(training.model, explicit=set(values), where=where, findings=findings)
        training = dataclasses.replace(training, model=model)
        check_training(training, where=where, findings=findings)
        _check_flow_schedule(training, explicit=set(values), where=where, findings=findings)
        _check_attention(training, where=where, findings=findings)
        resolved = _resolve_training_paths(
            training, config_path=config_path, where=where, sources=sources, findings=findings
        )
        training = replace_options(training, resolved)
        if "data_backend_config" in sources:
            datasets = _load_datasets(
                training, sources["data_backend_config"], strict=strict, findings=findings
            )
        if "lycoris_config" in sources:
            lycoris = _load_lycoris(sources["lycoris_config"], strict=strict, findings=findings)
    findings.settle_unsupported(strict=strict)
    if findings.problems:
        raise ConfigError(findings.problems)
    assert training is not None

    seed_drawn = training.seed is None
    if seed_drawn:
        seed = _choose_seed(training.output_dir, sources=sources, findings=findings)
        training = dataclasses.replace(training, seed=seed)

    for message in findings.warnings:
        logger.warning(message)
    for message in findings.notes:
        logger.info(message)
    return RunConfig(
        training=training,
        datasets=datasets,
        lycoris=lycoris,
        sources=sources,
        warnings=findings.warnings,
        notes=findings.notes,
        seed_drawn=seed_drawn,
    )


def _latest_values(
    pairs: list[tuple[str, Any]], *, where: str, findings: KeyFindings
) -> dict[str, tuple[str, Any]]:
    """Each key (``--`` dropped) with the spelling and value set last, in first-seen order.

    SimpleTuner passes every key to argparse as ``--key=value``, which keeps the later of two;
    so does raytuner, saying so.
    """
    latest: dict[str, tuple[str, Any]] = {}
    for written, value in pairs:
        key = written.removeprefix("--")
        if key in latest:
            earlier, earlier_value = latest[key]
            findings.warnings.append(
                f"{where}: '{key}' is set twice (as '{earlier}' = {show_value(key, earlier_value)} and "
                f"'{written}' = {show_value(key, value)}); using the later one, as SimpleTuner does; "
                "remove the other to silence this warning"
            )
        latest[key] = (written, value)
    return latest


def _sort_config_keys(
    pairs: list[tuple[str, Any]], *, where: str, strict: bool, findings: KeyFindings
) -> dict[str, Any]:
    """config keys as TrainingConfig field values; everything else is noted, warned or refused."""
    fields = field_names(TrainingConfig)
    values: dict[str, Any] = {}
    aliased: list[tuple[str, str, Any]] = []
    latest = _latest_values(pairs, where=where, findings=findings)
    written_as = {key: written for key, (written, _value) in latest.items()}
    for key, (written, value) in latest.items():
        if key in key_aliases():
            alias = key_aliases()[key]
            if alias.maps_to is None:
                findings.notes.append(f"{where}: '{key}' ignored, as SimpleTuner ignores it ({alias.reason})")
                continue
            if alias.inverted:
                try:
                    value = not coerce(value, bool)
                except CoercionError as error:
                    findings.problems.append(problem(where, key, value, error.expected))
                    continue
            aliased.append((key, alias.maps_to, value))
        elif (
            key == "validation_prompt_library"
            and isinstance(value, str)
            and value.strip().lower() not in TRUE_WORDS | FALSE_WORDS
        ):
            try:
                selected = library_selector(value)
            except ValueError as error:
                findings.problems.append(problem(where, key, value, str(error)))
                continue
            if selected is not None:
                values[key] = selected
                continue
            # A path here is what SimpleTuner's user_prompt_library means; some quickstarts write it so.
            findings.notes.append(
                f"{where}: 'validation_prompt_library' names a file; read as 'user_prompt_library'"
            )
            aliased.append((key, "user_prompt_library", value))
        elif sort_key(
            key,
            value,
            scope="config",
            where=where,
            fields=fields,
            strict=strict,
            findings=findings,
            written=written,
        ):
            values[key] = value
    for old, new, value in aliased:
        if new in values or new in written_as:
            findings.warnings.append(f"{where}: '{old}' and '{new}' are both set; using '{new}'")
        elif sort_key(
            new, value, scope="config", where=where, fields=fields, strict=strict, findings=findings
        ):
            values[new] = value
            findings.notes.append(f"{where}: '{old}' read as '{new}' (SimpleTuner's older name)")
    return values


def _check_model(
    model: ModelSection, *, explicit: set[str], where: str, findings: KeyFindings
) -> ModelSection:
    """The model section with the family's alias resolved and its flavour named."""
    family = model.model_family
    aliases = family_aliases()
    if family in aliases:
        model = dataclasses.replace(model, model_family=aliases[family])
        findings.notes.append(f"{where}: model_family '{family}' read as '{model.model_family}'")
    valid = {flavour.name: flavour for flavour in flavours(model.model_family)}
    written = model.model_flavour
    if written is None:
        default = next(name for name, flavour in valid.items() if flavour.default)
        model = dataclasses.replace(model, model_flavour=default)
    elif written.lower() in valid:
        model = dataclasses.replace(model, model_flavour=written.lower())
    else:
        findings.problems.append(
            problem(
                where,
                "model_flavour",
                written,
                f"a {model.model_family} flavour: {', '.join(valid)}{did_you_mean(written, valid)}",
            )
        )
    if model.model_type != "lora":
        findings.problems.append(
            problem(
                where,
                "model_type",
                model.model_type,
                "'lora'",
                'raytuner trains LoKr adapters only; set "model_type": "lora"',
            )
        )
    if model.lora_type != "lycoris":
        shown = model.lora_type if "lora_type" in explicit else f"{model.lora_type} (SimpleTuner's default)"
        findings.problems.append(
            problem(
                where,
                "lora_type",
                shown,
                "'lycoris'",
                'raytuner trains LyCORIS LoKr adapters; set "lora_type": "lycoris" and "lycoris_config"',
            )
        )
    return model


def _family_problem(value: Any, *, where: str) -> str | None:
    """The one line refusing a model family raytuner cannot train; None for a supported family
    (or its alias) and for a value the field rules report (missing, not text)."""
    if not isinstance(value, str) or value in family_aliases() or value in known_families():
        return None
    supported_families = known_families()
    supported = ", ".join(supported_families)
    if value in simpletuner_families():
        return f"{where}: model_family '{value}' is not supported by raytuner (supported: {supported})"
    hint = did_you_mean(value, supported_families) or did_you_mean(value, simpletuner_families())
    return f"{where}: 'model_family' = {value!r}: unknown model family{hint}; raytuner supports: {supported}"


def check_training(training: TrainingConfig, *, where: str, findings: KeyFindings) -> None:
    if not training.optimization.max_train_steps and training.optimization.num_train_epochs == 0:
        findings.problems.append(
            f"{where}: 'max_train_steps' and 'num_train_epochs' are both 0 or unset: expected one of them > 0; "
            'set e.g. "max_train_steps": 10000'
        )
    if training.memory.enable_group_offload and training.memory.enable_model_cpu_offload:
        findings.problems.append(
            f"{where}: 'enable_group_offload' and 'enable_model_cpu_offload' are both true: expected at most one; "
            "keep enable_group_offload"
        )
    if (
        training.memory.enable_group_offload
        and training.memory.group_offload_type == "leaf_level"
        and training.memory.group_offload_to_disk_path is not None
    ):
        # Checked with diffusers 0.42: after the first optimiser step the leaf-level groups read
        # back from disk hold wrong weights (the loss turns to NaN); block_level from disk is exact.
        findings.problems.append(
            f"{where}: 'group_offload_type' leaf_level with 'group_offload_to_disk_path': leaf-level groups "
            "read back from disk do not train correctly; use block_level to offload to disk, or leaf_level "
            "without group_offload_to_disk_path (CPU memory)"
        )
    memory = training.memory
    if (memory.gradient_checkpointing_interval or 1) > 1 and not memory.gradient_checkpointing:
        # SimpleTuner ignores the interval without gradient_checkpointing, silently.
        findings.warnings.append(
            f"{where}: 'gradient_checkpointing_interval' = {memory.gradient_checkpointing_interval} has no "
            "effect: gradient_checkpointing is off; set gradient_checkpointing true, or remove the interval"
        )
    if training.memory.enable_group_offload and training.memory.deepspeed_config:
        findings.problems.append(
            f"{where}: 'enable_group_offload' and 'deepspeed_config' are both set: expected one memory strategy; "
            "use group offload on one small GPU, DeepSpeed ZeRO across several"
        )


def _check_flow_schedule(
    training: TrainingConfig, *, explicit: set[str], where: str, findings: KeyFindings
) -> None:
    """Say when a sigma-schedule setting will not do what it reads as."""
    shift_set = "flow_schedule_shift" in explicit and (training.flow.flow_schedule_shift or 0) > 0
    auto_set = "flow_schedule_auto_shift" in explicit and training.flow.flow_schedule_auto_shift
    # A family with its own sigma schedule (OmniGen) ignores all of these.
    sampling_set = {
        "flow_sigmoid_scale": "flow_sigmoid_scale" in explicit and training.flow.flow_sigmoid_scale != 1.0,
        "flow_use_uniform_schedule": "flow_use_uniform_schedule" in explicit
        and training.flow.flow_use_uniform_schedule,
        "flow_use_beta_schedule": "flow_use_beta_schedule" in explicit
        and training.flow.flow_use_beta_schedule,
    }
    ignored = {"flow_schedule_shift": shift_set, "flow_schedule_auto_shift": auto_set, **sampling_set}
    if training.model.model_family not in known_families():
        return  # refused by _check_model already
    fixed_schedule = get_family(training.model.model_family).fixed_sigma_schedule
    if fixed_schedule and any(ignored.values()):
        keys = " and ".join(key for key, on in ignored.items() if on)
        findings.warnings.append(
            f"{where}: {keys} set for {training.model.model_family}: {fixed_schedule}, so this setting has no "
            "effect; remove it to silence this warning"
        )
    elif shift_set and training.flow.flow_schedule_auto_shift:
        findings.notes.append(
            f"{where}: flow_schedule_shift {training.flow.flow_schedule_shift} is not used because "
            "flow_schedule_auto_shift is on (as in SimpleTuner, the resolution-dependent shift wins)"
        )


def _check_attention(training: TrainingConfig, *, where: str, findings: KeyFindings) -> None:
    """Refuse an attention_mechanism the family's transformer cannot run (it would be ignored)."""
    mechanism = training.memory.attention_mechanism
    if mechanism == "diffusers" or training.model.model_family not in known_families():
        return
    fixed = get_family(training.model.model_family).fixed_attention
    if fixed:
        findings.problems.append(
            problem(
                where,
                "attention_mechanism",
                mechanism,
                f"diffusers for {training.model.model_family} ({fixed})",
                "remove attention_mechanism or set it to diffusers",
            )
        )


def _resolve_input_file(
    value: Path,
    name: str,
    *,
    config_path: Path,
    where: str,
    sources: dict[str, Path],
    findings: KeyFindings,
) -> Path:
    """The file ``value`` names, found as SimpleTuner finds it; recorded in ``sources``."""
    found = find_input_file(value, named_in=config_path)
    if found is None:
        tried = ", ".join(str(candidate) for candidate in input_candidates(value, named_in=config_path))
        findings.problems.append(
            problem(
                where,
                name,
                str(value),
                f"an existing file (looked at: {tried})",
                "fix the path; relative paths are read from the working directory, then from the folder of config.json",
            )
        )
        return value
    sources[name] = found
    return found


def _resolve_training_paths(
    training: TrainingConfig,
    *,
    config_path: Path,
    where: str,
    sources: dict[str, Path],
    findings: KeyFindings,
) -> dict[str, Any]:
    """The options that name files, resolved, and the nested configs read: changes to apply."""
    changes: dict[str, Any] = {}

    def resolve(name: str, value: Path) -> None:
        changes[name] = _resolve_input_file(
            value, name, config_path=config_path, where=where, sources=sources, findings=findings
        )

    resolve("data_backend_config", training.data.data_backend_config)
    if training.model.lora_type == "lycoris":
        if training.model.lycoris_config is None:
            findings.problems.append(f"{where}: 'lycoris_config' is required when lora_type is lycoris")
        else:
            resolve("lycoris_config", training.model.lycoris_config)
    if training.validation.user_prompt_library is not None:
        resolve("user_prompt_library", training.validation.user_prompt_library)
    if training.tracking.webhook_config is not None:
        changes.update(
            _read_webhooks(
                training.tracking.webhook_config,
                config_path=config_path,
                where=where,
                sources=sources,
                findings=findings,
            )
        )
    if training.memory.deepspeed_config:
        try:
            changes["deepspeed"] = parse_deepspeed(
                training.memory.deepspeed_config,
                mixed_precision=training.model.mixed_precision,
                where=where,
                base_dir=config_path.parent,
            )
        except DeepSpeedConfigError as error:
            findings.problems.append(str(error))
    changes["output_dir"] = output_path(training.output_dir)
    if training.memory.group_offload_to_disk_path is not None:
        changes["group_offload_to_disk_path"] = output_path(training.memory.group_offload_to_disk_path)
    return changes


def _read_webhooks(
    value: str | dict[str, Any] | list[Any],
    *,
    config_path: Path,
    where: str,
    sources: dict[str, Path],
    findings: KeyFindings,
) -> dict[str, Any]:
    """Read ``webhook_config`` now, once, so a bad webhook stops the run before any work; a
    file is recorded (resolved) with the targets it held."""
    try:
        targets, source = read_webhook_config(value, where=where, named_in=config_path)
    except ConfigError as error:
        findings.problems.extend(error.problems)
        return {}
    changes: dict[str, Any] = {"webhooks": tuple(targets)}
    if source is not None:
        changes["webhook_config"] = str(source)
        sources["webhook_config"] = source
    return changes


def _load_datasets(
    training: TrainingConfig, path: Path, *, strict: bool, findings: KeyFindings
) -> list[DatasetConfig]:
    where = display(path)
    try:
        raw = read_json(path)
    except ConfigError as error:
        findings.problems.extend(error.problems)
        return []
    # SimpleTuner fills the placeholders before it reads any entry, so every rule sees the filled value.
    filled = fill_dataset_placeholders(
        raw, model_family=training.model.model_family, output_dir=str(training.output_dir), where=where
    )
    findings.problems.extend(filled.problems)
    findings.warnings.extend(filled.warnings)
    parsed = parse_datasets(filled.entries, where=where, strict=strict)
    findings.merge(parsed.findings)
    datasets = [
        _complete_dataset(dataset, training, path=path, findings=findings) for dataset in parsed.datasets
    ]
    if datasets and not parsed.findings.problems:
        _check_cache_folders(datasets, where=where, findings=findings)
        enabled_text = [d for d in datasets if d.enabled and d.dataset_type == "text_embeds"]
        if not enabled_text:
            cache_dir = str(training.output_dir / "cache" / "text" / training.model.model_family)
            added = default_text_embeds(existing_ids={d.id for d in datasets}, cache_dir=cache_dir)
            datasets.append(added)
            findings.warnings.append(
                f"{where}: no text_embeds dataset; using '{added.id}' cached at {cache_dir}, as SimpleTuner does "
                '(add {"id": "text-embeds", "type": "local", "dataset_type": "text_embeds", "default": true, '
                '"cache_dir": "cache/text"} to choose the place)'
            )
    return datasets


def _complete_dataset(
    dataset: DatasetConfig, training: TrainingConfig, *, path: Path, findings: KeyFindings
) -> DatasetConfig:
    """The dataset with what it leaves unset taken from config.json, and its local paths resolved."""
    where = display(path)
    changes: dict[str, Any] = {}
    if dataset.needs_images:
        # A dataset that leaves these unset uses config.json's values, as in SimpleTuner.
        changes["resolution"] = dataset.resolution or training.data.resolution
        changes["resolution_type"] = dataset.resolution_type or training.data.resolution_type
        if dataset.minimum_image_size is None:
            changes["minimum_image_size"] = training.data.minimum_image_size
        if dataset.delete_problematic_images is None:
            changes["delete_problematic_images"] = training.data.delete_problematic_images
    if dataset.instance_data_dir is not None and dataset.type == "local":
        changes["instance_data_dir"] = find_input_dir(dataset.instance_data_dir, named_in=path)
    if dataset.parquet is not None and dataset.type == "local" and not has_scheme(dataset.parquet.path):
        # SimpleTuner opens the table from the working directory; the dataset file's folder is tried too.
        table = find_input_file(dataset.parquet.path, named_in=path) or output_path(dataset.parquet.path)
        changes["parquet"] = dataclasses.replace(dataset.parquet, path=str(table))
    if dataset.type == "huggingface" and dataset.dataset_name:
        changes.update(_hub_folder(dataset, where=where, findings=findings))
    if dataset.encodes_latents and not dataset.cache_dir_vae:
        # SimpleTuner's default: one folder per dataset below output_dir (masks are cached
        # beside the latents of the image dataset that links them, so they need none).
        default = training.output_dir / "cache" / "vae" / training.model.model_family / dataset.id
        changes["cache_dir_vae"] = str(default)
        findings.notes.append(
            f"{where}: dataset '{dataset.id}': cache_dir_vae not set; using {display(default)}"
        )
    elif dataset.type in ("local", "huggingface"):
        for name in ("cache_dir_vae", "cache_dir"):
            value = getattr(dataset, name)
            if value and not has_scheme(value):
                changes[name] = str(output_path(value))
    return dataclasses.replace(dataset, **changes)


def _hub_folder(dataset: DatasetConfig, *, where: str, findings: KeyFindings) -> dict[str, Any]:
    """A huggingface dataset_name that names a folder here, made absolute so every node reads the same one.

    As ``datasets.load_dataset`` does, a name that is an existing folder (relative to the working
    directory) is that folder, and any other name is a Hub id; a name that can only be a path
    (absolute, or starting with ``.`` or ``~``) must be an existing folder.
    """
    assert dataset.dataset_name is not None
    folder = Path(dataset.dataset_name).expanduser()
    path_only = folder.is_absolute() or dataset.dataset_name.startswith((".", "~"))
    if not (path_only or folder.is_dir()):
        return {}
    if dataset.revision is not None:
        findings.problems.append(
            problem(
                f"{where}: dataset '{dataset.id}'",
                "revision",
                dataset.revision,
                f"no revision: dataset_name '{dataset.dataset_name}' is a local folder, which has none",
                "remove revision, or name the Hub dataset",
            )
        )
    if not folder.is_dir():
        findings.problems.append(
            problem(
                f"{where}: dataset '{dataset.id}'",
                "dataset_name",
                dataset.dataset_name,
                "an existing folder (a datasets save_to_disk output or data files) or a Hub id (user/name)",
            )
        )
        return {}
    return {"dataset_name": str(folder.resolve())}


def _check_cache_folders(datasets: list[DatasetConfig], *, where: str, findings: KeyFindings) -> None:
    """Every enabled dataset caches into its own folder, as SimpleTuner requires."""
    owners: dict[tuple[str, str], str] = {}
    for dataset in datasets:
        if not dataset.enabled:
            continue
        value = dataset.cache_dir_vae if dataset.needs_images else dataset.cache_dir
        if not value:
            continue
        place = (
            (dataset.aws_bucket_name or "", value.rstrip("/"))
            if dataset.type == "aws"
            else ("", value.rstrip("/"))
        )
        if place in owners:
            key = "cache_dir_vae" if dataset.needs_images else "cache_dir"
            findings.problems.append(
                f"{where}: dataset '{dataset.id}': '{key}' = '{value}' is already the cache folder of dataset "
                f"'{owners[place]}'; give every dataset its own cache folder"
            )
        else:
            owners[place] = dataset.id


def _load_lycoris(path: Path, *, strict: bool, findings: KeyFindings) -> LycorisConfig | None:
    try:
        raw = read_json(path)
    except ConfigError as error:
        findings.problems.extend(error.problems)
        return None
    parsed = parse_lycoris(raw, where=display(path), strict=strict)
    findings.merge(parsed.findings)
    return parsed.config


def _choose_seed(output_dir: Path, *, sources: dict[str, Path], findings: KeyFindings) -> int:
    """The seed of a config that sets none: the one an earlier run recorded, or a new one."""
    recorded = read_recorded_seed(output_dir)
    if recorded is not None:
        sources["seed"] = seed_file(output_dir)
        findings.notes.append(f"seed not set; reusing {recorded} recorded in {display(sources['seed'])}")
        return recorded
    seed = draw_seed()
    findings.notes.append(
        f"seed not set; drew {seed} (recorded in {display(seed_file(output_dir))} when the run starts)"
    )
    return seed
