"""The typed pipeline config: one YAML document, one section per stage.

Every key here is also an MLflow param name (`section.key`). Unknown keys and bad values
are errors that name the key, so a typo never silently falls back to a default.

    from conf.schema import load_config
    cfg = load_config("conf/pipeline.yaml", ["train.epochs=3", "data.source=/data/x.csv"])
    cfg = load_config(profile="cluster")   # conf/profiles/cluster.yaml laid over the defaults

One module per concern: `catalog` (the model-family and compression-step tables), `base`,
one per group of sections (`data`, `training`, `compression`, `outcome`), `pipeline` (the
whole config and the rules that join sections), `display` (params, masking, digests) and
`loading` (YAML, profiles, overrides). This package re-exports what callers use.
"""

from conf.schema.base import Section
from conf.schema.catalog import (
    COMPRESSION_STEPS,
    MODEL_FAMILIES,
    PRUNING_STEPS,
    STRUCTURED_MODELS,
    CompressionStep,
    ModelFamily,
    converts_to_int8,
    needs_images,
    reads_images,
    recipe_problem,
)
from conf.schema.compression import (
    CompressConfig,
    CompressSearch,
    CompressSweep,
    DistillConfig,
    auto_sweep,
)
from conf.schema.data import DaskConfig, DataConfig, PartitionConfig, ReduceConfig
from conf.schema.display import config_digest, flatten, mask_secrets, mask_text
from conf.schema.loading import (
    DEFAULT_CONFIG,
    PROFILES,
    apply_override,
    load_config,
    profile_path,
    validate_config,
)
from conf.schema.outcome import (
    AlertsConfig,
    EvaluateConfig,
    MonitorConfig,
    RegistryConfig,
    ServeConfig,
    TrackingConfig,
    model_link,
    run_link,
    ui_base,
)
from conf.schema.pipeline import PipelineConfig
from conf.schema.training import UNTUNABLE, SearchDimension, TrainConfig, TuneConfig, default_space
from tasks.errors import ConfigError

__all__ = [
    "COMPRESSION_STEPS",
    "DEFAULT_CONFIG",
    "MODEL_FAMILIES",
    "PROFILES",
    "PRUNING_STEPS",
    "STRUCTURED_MODELS",
    "UNTUNABLE",
    "AlertsConfig",
    "CompressConfig",
    "DistillConfig",
    "CompressSearch",
    "CompressSweep",
    "CompressionStep",
    "ConfigError",
    "DaskConfig",
    "DataConfig",
    "EvaluateConfig",
    "ModelFamily",
    "MonitorConfig",
    "PartitionConfig",
    "PipelineConfig",
    "ReduceConfig",
    "RegistryConfig",
    "ServeConfig",
    "SearchDimension",
    "Section",
    "TrackingConfig",
    "TrainConfig",
    "TuneConfig",
    "apply_override",
    "auto_sweep",
    "converts_to_int8",
    "config_digest",
    "default_space",
    "flatten",
    "load_config",
    "mask_secrets",
    "mask_text",
    "model_link",
    "run_link",
    "ui_base",
    "needs_images",
    "profile_path",
    "reads_images",
    "recipe_problem",
    "validate_config",
]
