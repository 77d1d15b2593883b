"""The ``raytuner`` command.

Each subcommand is a thin shim over a module function that returns an exit code. Errors are
handled here, once for every command: an expected problem (a bad config, a missing folder — any
:class:`~raytuner.errors.RaytunerError`, also when Ray raised it on a worker) is one ``error:``
line per problem with exit code 2, never a traceback; anything else is a bug, said in one line
that names the exception and where its traceback was saved, with exit code 1 (``--verbose``
prints the traceback instead).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
import traceback
from collections.abc import Sequence
from typing import Any

from raytuner.logs import set_up_command

EXIT_BUG = 1
EXIT_ERROR = 2
# huggingface_hub reads this once, when it is first imported.
HUB_TELEMETRY_ENV = "HF_HUB_DISABLE_TELEMETRY"
CONFIG_HELP = (
    "config.json, config.toml or config.env (default: found as SimpleTuner finds it: config/config.json, "
    ".toml or .env, or as ENV / SIMPLETUNER_ENV, CONFIG_PATH and CONFIG_BACKEND / CONFIG_TYPE choose)"
)

logger = logging.getLogger(__name__)


def _config_path(args: argparse.Namespace) -> str:
    """``--config``, else the file SimpleTuner would read here (config/config.json, ENV, CONFIG_PATH,
    CONFIG_BACKEND), printed so the user sees which one runs."""
    if args.config is not None:
        return str(args.config)
    from raytuner.config.search import find_config

    found = find_config()
    print(found.describe(), flush=True)
    return str(found.path)


def _check_config(args: argparse.Namespace) -> int:
    from raytuner.config.check import print_keys

    if args.keys:
        return print_keys(args.format)
    from raytuner.train.preflight import check_config_main

    return check_config_main(_config_path(args), strict=args.strict)


def _tiny_model(args: argparse.Namespace) -> int:
    from raytuner.models.tiny import tiny_model_main

    return tiny_model_main(args.family, args.out, seed=args.seed)


def _demo(args: argparse.Namespace) -> int:
    from raytuner.demo import demo_main

    return demo_main(configs=args.configs, steps=args.steps, families=args.family)


def _cache(args: argparse.Namespace) -> int:
    """``raytuner cache``: exit 0 with the caches committed and the summary printed.

    The run is checked as ``raytuner train`` would check it (on the workers train would choose),
    then built; what stops it is raised as a RaytunerError.
    """
    from raytuner.batches.reader import check_batches
    from raytuner.cache.build import BuildOptions, run_cache
    from raytuner.cache.settings import cache_encoders
    from raytuner.config import ConfigError, load_config
    from raytuner.ray_runtime import cluster_connection
    from raytuner.train.preflight import preflight
    from raytuner.train.settings import read_settings

    run = load_config(_config_path(args), strict=args.strict)
    request = read_settings(run)
    with cluster_connection():
        problems = preflight(run, request.settle(), command="cache")
        if problems:
            raise ConfigError(problems)
        options = BuildOptions(encoder_actors=args.encoder_actors, rebuild=args.rebuild)
        summary = run_cache(run, options, cache_encoders(run))
    print()
    print(summary.table())
    # A PlanError here leaves the cache committed and kept: only the datasets are too small to
    # train on as configured.
    batches = check_batches(run)
    print(f"{batches} global batch(es) per epoch")
    return 0


def _train(args: argparse.Namespace) -> int:
    from raytuner.train.launcher import train_main
    from raytuner.train.settings import RayOverrides

    overrides = RayOverrides(
        num_workers=args.ray_num_workers,
        gpus_per_worker=args.ray_gpus_per_worker,
        cpus_per_worker=args.ray_cpus_per_worker,
        storage_path=args.ray_storage_path,
        max_failures=args.ray_max_failures,
    )
    return train_main(_config_path(args), strict=args.strict, overrides=overrides)


def _tune(args: argparse.Namespace) -> int:
    from raytuner.tune.command import tune_main

    return tune_main(_config_path(args), args.sweep, strict=args.strict)


def _generate(args: argparse.Namespace) -> int:
    from raytuner.generate.command import GenerateOptions, generate_main

    return generate_main(
        GenerateOptions(
            model=args.model,
            family=args.family,
            revision=args.revision,
            adapter=args.adapter,
            scale=args.scale,
            prompt=args.prompt,
            prompts=args.prompts,
            negative_prompt=args.negative_prompt,
            guidance=args.guidance,
            steps=args.steps,
            resolution=args.resolution,
            seed=args.seed,
            num_images=args.num_images,
            out=args.out,
            dtype=args.dtype,
            no_safety_checker=args.no_safety_checker,
            clip_model=args.clip_model,
            actors=args.actors,
        )
    )


def _add_ray_flags(parser: argparse.ArgumentParser) -> None:
    """The ray_* keys of config.json as flags; a flag wins over the key."""
    group = parser.add_argument_group("Ray (override the ray_* keys of config.json)")
    group.add_argument(
        "--ray-num-workers",
        type=int,
        metavar="N",
        help="Ray Train workers, one process each (default: ray_num_workers, else num_processes, else one "
        "per GPU the cluster has now when the workers use GPUs, else 1)",
    )
    group.add_argument(
        "--ray-gpus-per-worker",
        type=float,
        metavar="G",
        help="GPUs each worker requests; 0 trains on CPUs (default: ray_gpus_per_worker, else 1 when the "
        "cluster has GPUs or its autoscaler can add GPU nodes, else 0)",
    )
    group.add_argument(
        "--ray-cpus-per-worker", type=float, metavar="C", help="CPUs each worker requests (default 1)"
    )
    group.add_argument(
        "--ray-storage-path",
        metavar="PATH_OR_URI",
        help="checkpoints and, on a cluster, relative outputs and caches: a shared folder, s3:// or gs:// "
        "(default: output_dir/ray)",
    )
    group.add_argument(
        "--ray-max-failures",
        type=int,
        metavar="N",
        help="worker failures to recover from by restarting at the last checkpoint (-1: no limit; default 0)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="raytuner",
        description="LyCORIS LoKr fine-tuning of flow-matching image transformers on Ray, from SimpleTuner configs.",
    )
    verbose_help = "log at debug level, and print the traceback of an unexpected error (a bug in raytuner)"
    parser.add_argument("-v", "--verbose", action="store_true", help=verbose_help)
    # Also accepted after the command (``raytuner train --config c.json -v``). SUPPRESS leaves the
    # flag out of the namespace when it is not given there, so a -v before the command stands.
    after_command = argparse.ArgumentParser(add_help=False)
    after_command.add_argument(
        "-v", "--verbose", action="store_true", default=argparse.SUPPRESS, help=verbose_help
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add_command(name: str, **kwargs: Any) -> argparse.ArgumentParser:
        return commands.add_parser(name, parents=[after_command], **kwargs)

    check = add_command(
        "check-config",
        help="load a SimpleTuner config.json and print it resolved, or print the SimpleTuner compatibility table",
    )
    check.add_argument("--config", help=CONFIG_HELP)
    check.add_argument("--strict", action="store_true", help="make 'accepted, not yet supported' keys errors")
    check.add_argument(
        "--keys",
        action="store_true",
        help="print what raytuner does with every SimpleTuner config, dataset and lycoris key, and exit",
    )
    check.add_argument(
        "--format",
        choices=("text", "tsv", "markdown"),
        default="text",
        help="with --keys: text for people (default), tsv (key, scope, status, note, test) for scripts, "
        "markdown for docs/simpletuner-compatibility.md",
    )
    check.set_defaults(handler=_check_config)

    cache = add_command(
        "cache",
        help="encode the datasets of a config into the Parquet latent and text caches (Ray Data), and update them",
    )
    cache.add_argument("--config", help=CONFIG_HELP)
    cache.add_argument("--strict", action="store_true", help="make 'accepted, not yet supported' keys errors")
    cache.add_argument(
        "--rebuild",
        action="store_true",
        help="re-encode a cache written by another VAE or text encoder instead of refusing it (its raytuner files are deleted)",
    )
    cache.add_argument(
        "--encoder-actors",
        type=int,
        default=None,
        metavar="N",
        help="VAE actors in the encoding pool (default: one per GPU of the cluster, else 1)",
    )
    cache.set_defaults(handler=_cache)

    train = add_command(
        "train",
        help="train a LoKr adapter with Ray Train: check the config, build the cache, train, validate, write the adapter",
    )
    train.add_argument("--config", help=CONFIG_HELP)
    train.add_argument("--strict", action="store_true", help="make 'accepted, not yet supported' keys errors")
    _add_ray_flags(train)
    train.set_defaults(handler=_train)

    tune = add_command(
        "tune",
        help="sweep learning rate, LoKr factor, flow shift and more with Ray Tune + Optuna TPE + ASHA over one cache",
    )
    tune.add_argument("--config", help=f"the base config, the first point tried: {CONFIG_HELP}")
    tune.add_argument(
        "--sweep",
        required=True,
        help="path to sweep.json: parameters, fixed settings, num_samples, sampler, early_stopping, resources_per_trial",
    )
    tune.add_argument("--strict", action="store_true", help="make 'accepted, not yet supported' keys errors")
    tune.set_defaults(handler=_tune)

    generate = add_command(
        "generate",
        help="render images from a base model or a trained LoKr adapter (merged with lycoris); "
        "a prompts file renders on a Ray Data actor pool, resumably",
    )
    generate.add_argument(
        "--model", required=True, help="the base model: a diffusers pipeline folder or hub id"
    )
    generate.add_argument(
        "--adapter",
        help="LoKr adapter: a .safetensors file, an output_dir holding pytorch_lora_weights.safetensors, "
        "or a hub repo id (default: the base model alone)",
    )
    generate.add_argument(
        "--scale", type=float, default=1.0, help="adapter multiplier when merging (default 1.0)"
    )
    prompts = generate.add_mutually_exclusive_group(required=True)
    prompts.add_argument("--prompt", help="render this prompt")
    prompts.add_argument(
        "--prompts",
        metavar="FILE",
        help="render every prompt of a .txt file (one per line) or a .json file (a list, or a "
        "user_prompt_library) with Ray Data; already rendered images are skipped",
    )
    generate.add_argument("--negative-prompt", help="negative prompt (default: the family pipeline's own)")
    generate.add_argument(
        "--guidance", type=float, help="classifier-free guidance scale (default: the pipeline's)"
    )
    generate.add_argument("--steps", type=int, help="inference steps (default: the pipeline's)")
    generate.add_argument(
        "--resolution", metavar="WxH", help="image size in pixels, WxH or N (default: the pipeline's)"
    )
    generate.add_argument(
        "--seed",
        type=int,
        default=0,
        help="seed of each prompt's first image; the next ones count up (default 0)",
    )
    generate.add_argument(
        "--num-images", type=int, default=1, metavar="N", help="images per prompt (default 1)"
    )
    generate.add_argument(
        "--out", default="generated", help="folder for the images and index.json (default ./generated)"
    )
    generate.add_argument(
        "--dtype",
        choices=("auto", "bf16", "fp16", "fp32"),
        default="auto",
        help="weights' precision (default auto: bf16 on a GPU, fp32 on the CPU)",
    )
    generate.add_argument(
        "--no-safety-checker",
        action="store_true",
        help="Cosmos2: render without cosmos_guardrail's safety checker; the index records the images as "
        "not screened",
    )
    generate.add_argument(
        "--clip-model",
        metavar="PATH_OR_HUB_ID",
        help="score every image against its prompt with this CLIP model (e.g. openai/clip-vit-large-patch14)",
    )
    generate.add_argument(
        "--family",
        help="model family (default: read from the model's model_index.json; needed for an uncached hub id offline)",
    )
    generate.add_argument("--revision", help="hub revision of --model")
    generate.add_argument(
        "--actors",
        type=int,
        metavar="N",
        help="with --prompts: pipelines rendering in parallel (default: one per GPU of the cluster, else 1)",
    )
    generate.set_defaults(handler=_generate)

    tiny = add_command("tiny-model", help="write a tiny random-weight diffusers checkpoint (offline)")
    tiny.add_argument("--family", required=True, help="cosmos2image, omnigen, or clip (a tiny CLIP)")
    tiny.add_argument("--out", required=True, help="folder to write the checkpoint to")
    tiny.add_argument("--seed", type=int, default=0, help="weight seed (default 0)")
    tiny.set_defaults(handler=_tiny_model)

    demo = add_command(
        "demo",
        help="offline demo: tiny checkpoints, synthetic images, LoKr training, adapter, validation images",
    )
    demo.add_argument(
        "--configs",
        default="configs/demo",
        help="folder with one config folder per family (default configs/demo)",
    )
    demo.add_argument("--steps", type=int, default=None, help="override max_train_steps of the demo configs")
    demo.add_argument(
        "--family", action="append", help="family to run (repeatable; default: every family)", default=None
    )
    demo.set_defaults(handler=_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    set_up_command(verbose=args.verbose)
    disable_hub_telemetry()
    try:
        return int(args.handler(args))
    except Exception as error:  # KeyboardInterrupt and SystemExit keep Python's own handling
        return report_error(error, verbose=args.verbose)


def disable_hub_telemetry() -> None:
    """No command sends usage telemetry to a model hub; a value set in the environment wins.

    Set where the command starts, before anything imports huggingface_hub; a local Ray started by
    this process hands it on to its workers.
    """
    value = os.environ.setdefault(HUB_TELEMETRY_ENV, "1")
    logger.debug("%s=%s (a value set in the environment wins)", HUB_TELEMETRY_ENV, value)


def report_error(error: Exception, *, verbose: bool = False) -> int:
    """Say what went wrong on stderr and return the exit code: 2 for a RaytunerError, 1 for a bug.

    A RaytunerError's problems are ``error:`` lines (the user fixes them; its traceback is
    logged at debug level, so ``--verbose`` shows where it was raised). Anything else is a bug: one
    line with its type and message, its traceback saved to a file so that a run that failed after
    hours need not be repeated to see it — or, with ``verbose``, printed.
    """
    from raytuner.errors import find_error

    expected = find_error(error)
    if expected is not None:
        for line in expected.problems:
            print(f"error: {line}", file=sys.stderr)
        logger.debug("where the error above was raised", exc_info=error)
        return EXIT_ERROR
    bug = f"error: unexpected {describe_bug(error)} (a bug in raytuner or a library it uses)"
    if verbose:
        traceback.print_exception(error, file=sys.stderr)
        print(f"{bug}; traceback above", file=sys.stderr)
        return EXIT_BUG
    saved = save_traceback(error)
    where = f"traceback in {saved}, or run" if saved else "run"
    print(f"{bug}; {where} again with --verbose to print it", file=sys.stderr)
    return EXIT_BUG


def describe_bug(error: BaseException) -> str:
    """``Type: first line of the message`` of the exception as raised, inside Ray's wrappers."""
    seen = {id(error)}
    # A RayTaskError's own text is the remote traceback; the exception it carries is the bug.
    cause = getattr(error, "cause", None)
    while isinstance(cause, BaseException) and id(cause) not in seen:
        seen.add(id(cause))
        error, cause = cause, getattr(cause, "cause", None)
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0]}" if lines else type(error).__name__


def save_traceback(error: BaseException) -> str | None:
    """The path of a new file in the temp folder holding ``error``'s traceback; None if none could be written."""
    try:
        handle, path = tempfile.mkstemp(prefix="raytuner-traceback-", suffix=".txt")
        with os.fdopen(handle, "w", encoding="utf-8") as file:
            file.write("".join(traceback.format_exception(error)))
    except OSError:
        return None
    return path


if __name__ == "__main__":
    sys.exit(main())
