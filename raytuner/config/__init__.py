"""raytuner's configuration: SimpleTuner's config.json, multidatabackend.json and
lycoris_config.json, validated into typed dataclasses at the edge."""

from raytuner.config.datasets import DatasetConfig
from raytuner.config.errors import ConfigError
from raytuner.config.loader import load_config
from raytuner.config.lycoris import LycorisConfig, PresetConfig
from raytuner.config.preflight import check_run
from raytuner.config.redact import REDACTED, is_secret_key, redact
from raytuner.config.run import RunConfig
from raytuner.config.seed import SEED_FILE_NAME, record_seed
from raytuner.config.training import TrainingConfig

__all__ = [
    "REDACTED",
    "SEED_FILE_NAME",
    "ConfigError",
    "DatasetConfig",
    "LycorisConfig",
    "PresetConfig",
    "RunConfig",
    "TrainingConfig",
    "check_run",
    "is_secret_key",
    "load_config",
    "record_seed",
    "redact",
]
