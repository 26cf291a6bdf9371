"""The run configuration: its schema (`schema`), loading from YAML with overrides (`loading`), and the
rules that span several keys or the file system (`checks`).

    cfg = load_config("configs/demo.yaml", ["optim.lr=3e-4", "train.epochs=2"])
"""

from distvit.config.loading import (
    MOVED_KEYS,
    all_keys,
    build_config,
    load_config,
    parse_overrides,
    parse_yaml,
    read_yaml_config,
)
from distvit.config.schema import (
    AugmentConfig,
    CheckpointConfig,
    Config,
    DataConfig,
    DistillConfig,
    EmaConfig,
    EvalConfig,
    MixConfig,
    ModelConfig,
    OptimConfig,
    RunConfig,
    SurgeryConfig,
    TrackingConfig,
    TrainConfig,
)

__all__ = [
    "MOVED_KEYS",
    "AugmentConfig",
    "CheckpointConfig",
    "Config",
    "DataConfig",
    "DistillConfig",
    "EmaConfig",
    "EvalConfig",
    "MixConfig",
    "ModelConfig",
    "OptimConfig",
    "RunConfig",
    "SurgeryConfig",
    "TrackingConfig",
    "TrainConfig",
    "all_keys",
    "build_config",
    "load_config",
    "parse_overrides",
    "parse_yaml",
    "read_yaml_config",
]
