"""The run configuration: typed sections (`sections`), loading from TOML and the command line
(`load`), the layout rules every builder shares (`rules`) and whole-config validation
(`validate`). Imports nothing of distrib beyond `distrib.errors`."""

from distrib.config.load import (
    from_dict,
    get_value,
    help_lines,
    load_config,
    parse_overrides,
    to_dict,
)
from distrib.config.sections import (
    SECTIONS,
    CheckpointConfig,
    Config,
    DataConfig,
    DebugConfig,
    DPOConfig,
    JobConfig,
    LoraConfig,
    MetricsConfig,
    ModelConfig,
    ParallelConfig,
    TrainingConfig,
)
from distrib.config.validate import validate
from distrib.errors import ConfigError

__all__ = [
    "SECTIONS",
    "CheckpointConfig",
    "ConfigError",
    "Config",
    "DataConfig",
    "DebugConfig",
    "DPOConfig",
    "JobConfig",
    "LoraConfig",
    "MetricsConfig",
    "ModelConfig",
    "ParallelConfig",
    "TrainingConfig",
    "from_dict",
    "get_value",
    "help_lines",
    "load_config",
    "parse_overrides",
    "to_dict",
    "validate",
]
