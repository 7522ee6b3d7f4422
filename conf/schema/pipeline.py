"""The whole config: one section per stage, and the rules that join sections."""

from __future__ import annotations

from typing import Any

from pydantic import (
    Field,
    ValidationError,
    model_validator,
)

from conf.schema.base import Section
from conf.schema.catalog import (
    COMPRESSION_STEPS,
    MODEL_FAMILIES,
    converts_to_int8,
    needs_images,
)
from conf.schema.compression import CompressConfig, auto_sweep
from conf.schema.data import DaskConfig, DataConfig, PartitionConfig, ReduceConfig
from conf.schema.display import config_digest, flatten, mask_secrets
from conf.schema.outcome import (
    AlertsConfig,
    EvaluateConfig,
    MonitorConfig,
    RegistryConfig,
    ServeConfig,
    TrackingConfig,
)
from conf.schema.training import UNTUNABLE, TrainConfig, TuneConfig


class PipelineConfig(Section):
    workdir: str = Field(
        ".accelflow", description="stage outputs: <workdir>/<stage>/<key>/, written atomically"
    )
    data: DataConfig = Field(default_factory=DataConfig)
    dask: DaskConfig = Field(default_factory=DaskConfig)
    partition: PartitionConfig = Field(default_factory=PartitionConfig)
    reduce: ReduceConfig = Field(default_factory=ReduceConfig)
    tune: TuneConfig = Field(default_factory=TuneConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    compress: CompressConfig = Field(default_factory=CompressConfig)
    evaluate: EvaluateConfig = Field(default_factory=EvaluateConfig)
    serve: ServeConfig = Field(default_factory=ServeConfig)
    alerts: AlertsConfig = Field(default_factory=AlertsConfig)
    monitor: MonitorConfig = Field(default_factory=MonitorConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)
    registry: RegistryConfig = Field(default_factory=RegistryConfig)

    @model_validator(mode="before")
    @classmethod
    def _renamed_sections(cls, tree: Any) -> Any:
        if isinstance(tree, dict) and "prune" in tree:
            raise ValueError(
                "the prune section is now compress: prune.method X → compress.recipe [X] "
                "(none → []), prune.cluster_bits N → compress.bits N with cluster in the "
                "recipe, prune.quantize dynamic_int8 → quantize in the recipe; sparsity, "
                "rounds, finetune_epochs and finetune_lr keep their names"
            )
        return tree

    @model_validator(mode="after")
    def _compatible_sections(self) -> PipelineConfig:
        images = self.train.model != "auto" and needs_images(self.train.model)
        if self.reduce.sweep and (self.reduce.method == "none" or images):
            raise ValueError(
                "reduce.sweep compares PCA targets, but "
                + (
                    "reduce.method is 'none'"
                    if self.reduce.method == "none"
                    else f"train.model '{self.train.model}' needs the raw images"
                )
                + ": remove reduce.sweep or change that key"
            )
        if self.train.model == "auto":  # the rest depends on the model: with_model_for
            return self
        if self.compress.recipe == "auto" and not self.compress.sweep:
            self.compress.sweep = auto_sweep(self.train.model)  # logged as the real grid
        if self.compress.finetune_epochs == "auto":  # logged as the family's number
            self.compress.finetune_epochs = MODEL_FAMILIES[self.train.model].finetune_epochs
        for key, recipe in self.compress.recipes():
            for step in recipe:
                families = COMPRESSION_STEPS[step].families
                if self.train.model not in families:
                    raise ValueError(
                        f"{key} {recipe}: {step} pruning narrows the layers of "
                        f"{' and '.join(families)} models, but train.model is "
                        f"'{self.train.model}': use magnitude instead"
                    )
        quantized = any(converts_to_int8(recipe) for _, recipe in self.compress.recipes())
        if (
            quantized
            and self.train.model == "cnn"
            and self.serve.runtime != "torch"
            and not self.compress.calibration_rows
        ):
            raise ValueError(
                "compress.calibration_rows is 0, but a recipe quantizes a cnn in onnxruntime, "
                "which calibrates its activations' int8 ranges on training rows: set "
                "compress.calibration_rows (e.g. 512), or serve.runtime to torch"
            )
        if images and self.reduce.method == "pca":
            readers = [m for m, f in MODEL_FAMILIES.items() if f.reads != "images"]
            raise ValueError(
                f"train.model '{self.train.model}' works on raw images, but reduce.method is "
                f"'pca': set reduce.method to 'auto' or 'none' ({', '.join(readers)} can read "
                "PCA features)"
            )
        return self

    def with_model_for(self, image_shape: Any) -> PipelineConfig:
        """`train.model: auto`, decided once ingest has read the data: the CNN for images
        (it reads the pixels whole: 0.92 on Fashion-MNIST where the MLP on PCA gets 0.90),
        the MLP for tables and wherever PCA features were asked for (reduce.method pca, a
        reduce.sweep). The config is validated again as if the user had named the model."""
        if self.train.model != "auto":
            return self
        pca = self.reduce.method == "pca" or bool(self.reduce.sweep)
        tree = self.model_dump(mode="json")
        tree["train"]["model"] = "cnn" if image_shape and not pca else "mlp"
        return PipelineConfig.model_validate(tree)

    @model_validator(mode="after")
    def _space_fits_train(self) -> PipelineConfig:
        """Every axis of tune.space names a train.* key and only values train.* accepts."""
        tunable = sorted(set(TrainConfig.model_fields) - set(UNTUNABLE))
        base = self.train.model_dump()
        for key, dim in self.tune.space.items():
            if key not in tunable:
                raise ValueError(
                    f"tune.space.{key}: not a train.* key a search can set; tunable keys: "
                    + ", ".join(tunable)
                )
            for value in dim.values_to_check():
                try:
                    TrainConfig.model_validate({**base, key: value})
                except ValidationError as exc:
                    reason = exc.errors()[0]["msg"].removeprefix("Value error, ")
                    raise ValueError(
                        f"tune.space.{key}: train.{key} would reject {value!r} ({reason})"
                    ) from None
        return self

    def digest(self) -> str:
        return config_digest(self.model_dump(mode="json"))

    def flat(self) -> dict[str, Any]:
        """`section.key` → value, the form MLflow params take, secrets masked."""
        return flatten(self.public())

    def public(self) -> dict[str, Any]:
        """The config as it may be shown (MLflow, Prefect, reports): secrets masked."""
        return mask_secrets(self.model_dump(mode="json"))
