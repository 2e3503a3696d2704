"""The run configuration: typed schema (`schema`), files and overrides (`io`), validation and loading (`load`),
preflight checks (`preflight`). Components import the dataclasses from `engine.config.schema`; entry points use
`load_config` from here."""

from engine.config.io import apply_override, reference_markdown, resolve_path, to_toml
from engine.config.load import DEFAULT_CONFIG, config_from_dict, experiment_runs, load_config, validate, variant_config
from engine.config.preflight import check_environment, check_paths
from engine.config.schema import (
    Config,
    DataConfig,
    ExperimentConfig,
    FieldConfig,
    InitConfig,
    KernelsConfig,
    ModelConfig,
    OPDConfig,
    ReportConfig,
    RolloutConfig,
    StudentConfig,
    TeacherConfig,
    TrainConfig,
)
from engine.errors import ConfigError

__all__ = [
    "DEFAULT_CONFIG", "Config", "ConfigError", "DataConfig", "ExperimentConfig", "FieldConfig", "InitConfig",
    "KernelsConfig", "ModelConfig", "OPDConfig", "ReportConfig", "RolloutConfig", "StudentConfig", "TeacherConfig",
    "TrainConfig", "apply_override", "check_environment", "check_paths", "config_from_dict", "experiment_runs",
    "load_config", "reference_markdown", "resolve_path", "to_toml", "validate", "variant_config",
]
